# The CPU quick start with the modern recipe (modded-nanogpt, nanochat): rotary embeddings, RMSNorm, QK-norm,
# ReLU^2, an untied head, a logit softcap, zero-initialised projections, and Muon on the hidden matrices.
# nanogpt-prepare shakespeare_char && nanogpt-train configs/train_shakespeare_char_modern.py
import os

from nanogpt.model import MODERN as _MODERN

exec(open(os.path.join(os.path.dirname(__file__), "train_shakespeare_char_cpu.py")).read())

out_dir = "out-shakespeare-char-modern"
globals().update(_MODERN)  # every modern option on: pos_emb, norm, qk_norm, mlp, tie_embeddings, logit_softcap,
# zero_init_proj (their values are nanogpt.model.MODERN's, the one list of them)
optimizer = "muon"
muon_lr = 0.02  # the hidden matrices (Muon)
learning_rate = 3e-3  # the embeddings, head, norms and biases (AdamW)
min_lr = 3e-4
