"""A tiny trained-looking run for the tests of the tools that read out_dir (export, eval)."""
import torch

from nanogpt import checkpoint
from nanogpt.model import GPT, GPTConfig


def tiny_run(out_dir, data_dir, vocab_size=50304, gelu="none", bias=False, block_size=16):
    """An out_dir holding a checkpoint of a tiny model after one optimizer step, as the trainer writes it."""
    torch.manual_seed(0)
    margs = dict(n_layer=2, n_head=2, n_embd=32, block_size=block_size, bias=bias, vocab_size=vocab_size, dropout=0.0,
                 gelu=gelu)
    model = GPT(GPTConfig(**margs, kernels="torch"), "cpu")
    # GELU inputs of order 1 and more, where its erf and tanh forms differ, and logits of order 10, so that the
    # other form would be 1e-4 off
    for block in model.transformer.h:
        torch.nn.init.normal_(block.mlp.c_fc.weight, std=1.0)
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95))
    idx = torch.randint(0, min(vocab_size, 50257), (2, 16))
    model(idx, idx)[1].backward()
    opt.step()
    config = {"dataset": "x", "data_dir": str(data_dir), "kernels": "torch"}
    checkpoint.save(str(out_dir), 7, {"model": model.state_dict(), "model_args": margs, "iter_num": 7, "config": config},
                    {"optimizer": opt.state_dict(), "iter_num": 7, "best_val_loss": 3.5, "ranks": [{}], "config": config},
                    best=True)
    return model.eval(), opt
