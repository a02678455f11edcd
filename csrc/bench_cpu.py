"""CPU timing of the quick-start char model (4 layers, 4 heads, n_embd 128, block 64, batch 12):
forward + backward + optimizer step, ms/iter, per kernels selector. Not a test.

    python csrc/bench_cpu.py [--iters 60] [--threads N] [--kernels torch ext ...]
"""
import argparse
import time

import torch

from nanogpt.model import GPT, GPTConfig


def bench(kernels, iters, warmup, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, dropout=0.0, kernels=kernels)
    model = GPT(cfg, device_type="cpu")
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu", grad_clip=1.0)
    x = torch.randint(0, 65, (12, 64))
    y = torch.randint(0, 65, (12, 64))
    times = []
    for i in range(warmup + iters):
        t0 = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    times = sorted(times[warmup:])
    return 1e3 * times[len(times) // 2], 1e3 * sum(times) / len(times)


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
          f"{a.iters} iters (median / mean ms per fwd+bwd+step), best of {a.rounds} rounds")
    for k in a.kernels:
        res = [bench(k, a.iters, a.warmup) for _ in range(a.rounds)]
        med = min(r[0] for r in res)
        mean = min(r[1] for r in res)
        print(f"  {k:62s} {med:7.2f} ms median  {mean:7.2f} ms mean")


if __name__ == "__main__":
    main()
