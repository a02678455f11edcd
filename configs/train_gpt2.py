# GPT-2 (124M) on OpenWebText: ~2.5 days on one 8xA100 40GB node, to a loss of ~2.85.
# nanogpt-prepare openwebtext && torchrun --standalone --nproc_per_node=8 -m nanogpt.train configs/train_gpt2.py

wandb_log = False
wandb_project = "owt"
wandb_run_name = "gpt2-124M"

# 12 batch size * 1024 block size * 5 gradaccum * 8 GPUs = 491,520 tokens per step
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

# 600,000 steps: ~300B tokens
max_iters = 600000
lr_decay_iters = 600000

eval_interval = 1000
eval_iters = 200
log_interval = 10

weight_decay = 1e-1
