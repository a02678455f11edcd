# The CPU quick start with the modern recipe (modded-nanogpt, nanochat): rotary embeddings, RMSNorm, QK-norm,
# ReLU^2, an untied head, a logit softcap, zero-initialised projections, and Muon on the hidden matrices.
# nanogpt-prepare shakespeare_char && nanogpt-train configs/train_shakespeare_char_modern.py
# Against the GPT-2 recipe (configs/train_shakespeare_char_cpu.py): python benchmarks/bench_recipes.py
import os

from nanogpt.model import MODERN as _MODERN

exec(open(os.path.join(os.path.dirname(__file__), "train_shakespeare_char_cpu.py")).read())

out_dir = "out-shakespeare-char-modern"
globals().update(_MODERN)  # every modern option on: pos_emb, norm, qk_norm, mlp, tie_embeddings, logit_softcap,
# zero_init_proj (their values are nanogpt.model.MODERN's, the one list of them)
optimizer = "muon"
muon_lr = 0.02  # the hidden matrices (Muon); 0.01-0.08 gave the same val loss here (README)
learning_rate = 3e-3  # the embeddings, head, norms and biases (AdamW); 1.5e-3-6e-3 the same
min_lr = 3e-4
warmup_iters = 0  # Muon needs no lr warmup (modded-nanogpt, nanochat); its momentum ramps over 300 iters
# 1200 iters take a little less wall time than the GPT-2 recipe's 2000 here: a modern iter costs ~1.3-1.6x a GPT-2
# one on the 2-core CPU (one thread), most of the difference Muon's step (README)
max_iters = 1200
lr_decay_iters = 1200
