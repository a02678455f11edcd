# GPT-2 (124M) size with the modern recipe (configs/train_shakespeare_char_modern.py's options) and Muon.
# nanogpt-prepare fineweb && torchrun --standalone --nproc_per_node=8 -m nanogpt.train configs/train_gpt2_modern.py
import os

from nanogpt.model import MODERN as _MODERN

exec(open(os.path.join(os.path.dirname(__file__), "train_gpt2.py")).read())

wandb_run_name = "gpt2-124M-modern"
out_dir = "out-gpt2-modern"
globals().update(_MODERN)  # every modern option on: pos_emb, norm, qk_norm, mlp, tie_embeddings, logit_softcap,
# zero_init_proj (their values are nanogpt.model.MODERN's, the one list of them)
optimizer = "muon"
muon_lr = 0.02  # nanochat's matrix lr
learning_rate = 3e-3  # AdamW: embeddings, head, norms
min_lr = 3e-4
warmup_iters = 0  # Muon needs no lr warmup (modded-nanogpt, nanochat); its momentum ramps over 300 iters
