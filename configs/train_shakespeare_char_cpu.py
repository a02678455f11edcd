# The CPU quick start: a smaller char-level GPT that trains in minutes on a laptop CPU.
# nanogpt-prepare shakespeare_char && nanogpt-train configs/train_shakespeare_char_cpu.py
import os

# start from the GPU settings, then shrink
exec(open(os.path.join(os.path.dirname(__file__), "train_shakespeare_char.py")).read())

device = "cpu"
# auto: bf16 autocast where the CPU has bf16 matmul units (AVX512-BF16/AMX) and attention runs on our
# CPU kernel (same val loss, ~1.5x faster); float32 elsewhere, where bf16 is emulated or torch's CPU
# attention backward makes it slower
dtype = "auto"
compile = False
eval_iters = 20
log_interval = 50
block_size = 64
batch_size = 12
n_layer = 4
n_head = 4
n_embd = 128
max_iters = 2000
lr_decay_iters = 2000
dropout = 0.0
