"""CPU timings of the extension's kernels. Not a test.

    python csrc/bench_cpu.py ops [--isa all|x86-64-v4|x86-64-v3|default] [--reps 60] [--threads 2] [--only ...]
    python csrc/bench_cpu.py [model] [--isa NAME] [--iters 60] [--threads N] [--kernels torch ext ...]

`ops`: each ext kernel against the PyTorch op it replaces, per ISA clone of the CPU kernels, in
float32 and bfloat16, at the CPU quick-start shapes (12 x 64 tokens, C=128, 4 heads, 4 layers;
bias_gelu / bias_relu2 on 768 x 512) and GPT-2-small-ish ones (C=768, 12 heads, 3 x 256 tokens; bias_gelu /
bias_relu2 on 768 x 3072; AdamW over one GPT-2-small block); rope turns the attention's q and k. fwd is the forward call with inputs that need
grad (as in training), bwd the backward of that graph; adamw is grad_norm + adamw_ against
clip_grad_norm_ + torch.optim.AdamW (foreach). ext and torch run in turn (interleaved), so load
from other processes hits both alike; medians over --reps. --isa all runs one process per clone
with torch's ATen kernels, oneDNN and MKL capped to that clone's ISA, as on a CPU that has no
higher one; a single --isa leaves torch as it is.

`model`: the CPU quick-start model, ms per fwd+bwd+optimizer step for --kernels selectors.
"""
import argparse
import importlib
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def load_ext():
    """The compiled module (its import registers torch.ops.nanogpt_ext)."""
    for name in ("nanogpt_kernels._C", "nanogpt._C"):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError:
            continue
    raise SystemExit("the C++ extension is not built (pip install --no-build-isolation -e .)")


# ------------------------------------------------------------------------------------------ ops

SHAPES = {  # name: (rows, C, heads, batch, T, bias_gelu columns, layers whose params AdamW steps)
    "quickstart": dict(rows=768, C=128, H=4, B=12, T=64, hidden=512),
    "gpt2-ish": dict(rows=768, C=768, H=12, B=3, T=256, hidden=3072),
}


def _param_shapes(name, s):
    C = s["C"]
    block = [(C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (4 * C, C), (4 * C,), (C, 4 * C), (C,)]
    if name == "quickstart":  # the whole 4-layer char model: blocks, embeddings, final LayerNorm
        return block * 4 + [(65, C), (64, C), (C,), (C,)]
    return block  # one GPT-2-small block


def _cases(name, s, dtype):
    """[(kernel, make)]: make(backend) -> (call, dy for its backward or None), backend "ext" or "torch"."""
    ops = torch.ops.nanogpt_ext
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, grad=True):
        t = torch.randn(*shape, generator=g).to(dtype)
        return t.requires_grad_(grad)

    rows, C, H, B, T, hidden = s["rows"], s["C"], s["H"], s["B"], s["T"], s["hidden"]
    x, w, b, dy = rnd(rows, C), rnd(C), rnd(C), rnd(rows, C, grad=False)

    def layer_norm(backend):
        f = (lambda: ops.layer_norm(x, w, b, 1e-5)) if backend == "ext" else \
            (lambda: F.layer_norm(x, (C,), w, b, 1e-5))
        return f, dy

    def rms_norm(backend):
        f = (lambda: ops.rms_norm(x, w, 1e-6)) if backend == "ext" else (lambda: F.rms_norm(x, (C,), w, 1e-6))
        return f, dy

    xh, bh, dyh = rnd(rows, hidden), rnd(hidden), rnd(rows, hidden, grad=False)

    def relu2(backend):
        f = (lambda: ops.bias_relu2(xh, bh)) if backend == "ext" else (lambda: F.relu(xh + bh).square())
        return f, dyh

    def gelu(tanh):
        def make(backend):
            approx = "tanh" if tanh else "none"
            f = (lambda: ops.bias_gelu(xh, bh, tanh)) if backend == "ext" else \
                (lambda: F.gelu(xh + bh, approximate=approx))
            return f, dyh
        return make

    # q, k, v as the model makes them: (B, H, T, D) views of one (B, T, 3, H, D) buffer
    qkv = torch.randn(B, T, 3, H, C // H, generator=g).to(dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2).requires_grad_() for i in range(3))
    do = rnd(B, H, T, C // H, grad=False)

    def attention(backend):
        sc = 1.0 / math.sqrt(C // H)
        f = (lambda: ops.attention(q, k, v, True, sc, 0.0, None)) if backend == "ext" else \
            (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return f, do

    angles = torch.outer(torch.arange(T, dtype=torch.float32), 1e4 ** (-torch.arange(0, C // H, 2) / (C // H)))
    cos, sin = angles.cos(), angles.sin()

    def rope(backend):
        from nanogpt_kernels.registry import rope as torch_rope
        f = (lambda: ops.rope(q, k, cos, sin)) if backend == "ext" else (lambda: torch_rope(q, k, cos, sin))
        return f, (do, do)

    def adamw(backend):
        ps = [torch.randn(sh, generator=g).to(dtype) for sh in _param_shapes(name, s)]
        grads = [torch.randn(sh, generator=g).to(dtype) * 1e-2 for sh in _param_shapes(name, s)]
        if backend == "torch":
            for p, gr in zip(ps, grads):
                p.requires_grad_()
                p.grad = gr
            opt = torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, foreach=True)

            def step():
                torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=True)
                opt.step()
            return step, None
        m = [torch.zeros_like(p, dtype=torch.float32) for p in ps]
        vv = [torch.zeros_like(p, dtype=torch.float32) for p in ps]
        steps = [torch.zeros((), dtype=torch.float32) for _ in ps]
        lr = torch.tensor(1e-3, dtype=torch.float64)

        def step():
            norm = ops.grad_norm(grads)
            ops.adamw_(ps, grads, m, vv, steps, lr, norm, 0.9, 0.99, 1e-8, 0.1, 1.0)
        return step, None

    return [("layer_norm", layer_norm), ("rms_norm", rms_norm), ("bias_gelu erf", gelu(False)),
            ("bias_gelu tanh", gelu(True)), ("bias_relu2", relu2), ("rope", rope), ("attention causal", attention),
            ("grad_norm+adamw_", adamw)]


def _time(make, reps, warmup):
    """make: backend -> (call, dy or None). ext and torch in turn; {backend: ([fwd s], [bwd s] or None)}."""
    made = {be: make(be) for be in ("ext", "torch")}
    t = {be: ([], [] if dy is not None else None) for be, (_, dy) in made.items()}
    for i in range(warmup + reps):
        for be, (call, dy) in made.items():
            t0 = time.perf_counter()
            out = call()
            t1 = time.perf_counter()
            if dy is not None:
                torch.autograd.backward(out, dy)
            if i >= warmup:
                t[be][0].append(t1 - t0)
                if dy is not None:
                    t[be][1].append(time.perf_counter() - t1)
    return t


def _cell(ext, tor):
    """ext / torch median ms, torch/ext from the medians and (in parentheses) from the minima"""
    if ext is None:
        return " | | "
    me, mt = statistics.median(ext), statistics.median(tor)
    return f"{1e3 * me:.3f} | {1e3 * mt:.3f} | {mt / me:.2f}x ({min(tor) / min(ext):.2f}x)"


# what a CPU that runs only this clone would give torch: its ATen kernels, oneDNN and MKL capped alike
TORCH_ISA_ENV = {
    "x86-64-v4": {"ATEN_CPU_CAPABILITY": "avx512"},
    "x86-64-v3": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}


def bench_ops(args, C):
    if args.isa == "all":  # one process per clone: torch reads its ISA caps at import
        print(f"torch {torch.__version__}, {args.threads} threads, {args.reps} interleaved reps; ms medians; "
              "torch/ext > 1: ext is faster (from the minima in parentheses); torch capped to the clone's ISA")
        print("| clone | shape | kernel | dtype | ext fwd | torch fwd | torch/ext | ext bwd | torch bwd | torch/ext |")
        print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
        for isa in C.cpu_isas():
            argv = [sys.executable, __file__, "ops", "--isa", isa, "--rows-only", "--threads", str(args.threads),
                    "--reps", str(args.reps), "--warmup", str(args.warmup)] + (["--only", *args.only] if args.only else [])
            subprocess.run(argv, env={**os.environ, "NANOGPT_CPU_ISA": isa, **TORCH_ISA_ENV.get(isa, {})}, check=True)
        return
    C.set_cpu_isa(args.isa)
    if not args.rows_only:
        print(f"torch {torch.__version__} (ATen {torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} "
              f"threads, {args.reps} interleaved reps; ms medians; torch/ext > 1: ext is faster (minima in parentheses)")
        print("| clone | shape | kernel | dtype | ext fwd | torch fwd | torch/ext | ext bwd | torch bwd | torch/ext |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    for name, s in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            for kernel, make in _cases(name, s, dtype):
                row = f"| {args.isa} | {name} | {kernel} | {str(dtype)[6:]} |"
                if args.only and not any(o in row for o in args.only):
                    continue
                t = _time(make, args.reps, args.warmup)
                print(f"{row} {_cell(t['ext'][0], t['torch'][0])} | {_cell(t['ext'][1], t['torch'][1])} |", flush=True)


# ---------------------------------------------------------------------------------------- model

def make_step(kernels, seed=0):
    from nanogpt.model import GPT, GPTConfig

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


def bench_model(args, C):
    if args.isa != "all":
        C.set_cpu_isa(args.isa)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU clone {C.cpu_isa()}, "
          f"{args.iters * args.rounds} interleaved iters (ms per fwd+bwd+step)")
    # every selector runs one iteration in turn (interleaved), so load from other processes
    # hits them alike; report the median and the minimum per-iteration time
    steps = {k: make_step(k) for k in args.kernels}
    times = {k: [] for k in args.kernels}
    for i in range(args.warmup + args.iters * args.rounds):
        for k, step in steps.items():
            t0 = time.perf_counter()
            step()
            if i >= args.warmup:
                times[k].append(1e3 * (time.perf_counter() - t0))
    for k in args.kernels:
        t = sorted(times[k])
        print(f"  {k:62s} {t[len(t) // 2]:7.2f} ms median  {t[0]:7.2f} ms min")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", nargs="?", default="model", choices=["ops", "model"])
    ap.add_argument("--isa", default="all", help="ISA clone of the CPU kernels (ops: default every one this CPU runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--reps", type=int, default=60, help="ops: timed calls per backend")
    ap.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)  # a child of --isa all
    ap.add_argument("--only", nargs="*", help="ops: only the rows that contain one of these, e.g. 'tanh | bfloat16'")
    ap.add_argument("--iters", type=int, default=60, help="model: iterations per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kernels", nargs="*", default=[
        "torch", "ext", "layer_norm:ext,gelu:torch,optimizer:torch,attention:torch",
        "gelu:ext,layer_norm:torch,optimizer:torch,attention:torch",
        "optimizer:ext,layer_norm:torch,gelu:torch,attention:torch"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    C = load_ext()
    (bench_ops if a.mode == "ops" else bench_model)(a, C)


if __name__ == "__main__":
    main()
