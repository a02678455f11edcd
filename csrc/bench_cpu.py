"""CPU timing of the quick-start char model (4 layers, 4 heads, n_embd 128, block 64, batch 12):
forward + backward + optimizer step, ms/iter, per kernels selector. Not a test.

    python csrc/bench_cpu.py [--iters 60] [--threads N] [--kernels torch ext ...]
"""
import argparse
import time

import torch

from nanogpt.model import GPT, GPTConfig


def make_step(kernels, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, dropout=0.0, kernels=kernels)
    model = GPT(cfg, device_type="cpu")
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu", grad_clip=1.0)
    x = torch.randint(0, 65, (12, 64))
    y = torch.randint(0, 65, (12, 64))

    def step():
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kernels", nargs="*", default=[
        "torch", "ext", "layer_norm:ext,gelu:torch,optimizer:torch,attention:torch",
        "gelu:ext,layer_norm:torch,optimizer:torch,attention:torch",
        "optimizer:ext,layer_norm:torch,gelu:torch,attention:torch"])
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{a.iters * a.rounds} interleaved iters (ms per fwd+bwd+step)")
    # every selector runs one iteration in turn (interleaved), so load from other processes
    # hits them alike; report the median and the minimum per-iteration time
    steps = {k: make_step(k) for k in a.kernels}
    times = {k: [] for k in a.kernels}
    for i in range(a.warmup + a.iters * a.rounds):
        for k, step in steps.items():
            t0 = time.perf_counter()
            step()
            if i >= a.warmup:
                times[k].append(1e3 * (time.perf_counter() - t0))
    for k in a.kernels:
        t = sorted(times[k])
        print(f"  {k:62s} {t[len(t) // 2]:7.2f} ms median  {t[0]:7.2f} ms min")

if __name__ == "__main__":
    main()
