# Evaluate OpenAI's gpt2-xl (n_layer=48, n_head=25, n_embd=1600 (1558M)) on OpenWebText's train and val splits.
# nanogpt-train configs/eval_gpt2_xl.py
batch_size = 8
eval_iters = 500  # use more iterations to get a good estimate
eval_only = True
wandb_log = False
init_from = "gpt2-xl"
