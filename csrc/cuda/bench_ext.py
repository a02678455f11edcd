#!/usr/bin/env python
"""Check and time the CUDA kernels of nanogpt_kernels._C (the "ext" backend) on a GPU.

For each op (layer_norm fwd/bwd, bias_gelu fwd/bwd in both forms, multi-tensor AdamW) and
dtype (fp32, bf16, fp16): checks the result against a float64 reference (nanogpt_kernels.contract's
budget: at most 2x PyTorch's same-dtype error, plus an ulp), then times ours and PyTorch's with CUDA
events and reports GB/s against the measured device-to-device copy bandwidth.

    python csrc/cuda/bench_ext.py [--rows 16384] [--iters 50] [--quick]

Prints a message and exits 0 when there is no CUDA device; exits 1 when a check fails.
"""
import argparse
import sys

import torch
import torch.nn.functional as F

from nanogpt_kernels import ext  # loads nanogpt_kernels._C lazily: importing never fails
from nanogpt_kernels.contract import within_budget


def _time(fn, iters):
    """Median milliseconds of fn() over iters runs (CUDA events)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(iters):
    n = 256 * 1024 * 1024 // 4
    src, dst = torch.empty(n, device="cuda"), torch.empty(n, device="cuda")
    ms = _time(lambda: dst.copy_(src), iters)
    return 2 * n * 4 / ms / 1e6  # GB/s (read + write)


def _ok(name, ours, theirs, ref, failures):
    """The kernels' one correctness rule (nanogpt_kernels.contract): at most 2x PyTorch's error, plus an ulp."""
    good, e_o, tol = within_budget(ours, theirs, ref, ours.dtype)
    if not good:
        failures.append(f"{name}: error {e_o:.3g} vs budget {tol:.3g}")
    return f"err {e_o:.2g} (budget {tol:.2g})" + ("" if good else "  <-- FAIL")


def _report(name, nbytes, bw, t_fwd, t_fwd_t, t_bwd, t_bwd_t, checks):
    """One row op's line: fwd (reads x, writes y) and bwd (reads dy and x, writes dx) in us, GB/s and the share
    of the measured copy bandwidth `bw`, beside torch's times; then its correctness checks."""
    def gbs(nb, ms):
        return nb / ms / 1e6
    print(f"{name}: fwd {t_fwd * 1e3:7.1f} us {gbs(2 * nbytes, t_fwd):6.0f} GB/s ({gbs(2 * nbytes, t_fwd) / bw:4.0%}) "
          f"| torch {t_fwd_t * 1e3:7.1f} us; bwd {t_bwd * 1e3:7.1f} us {gbs(3 * nbytes, t_bwd):6.0f} GB/s "
          f"({gbs(3 * nbytes, t_bwd) / bw:4.0%}) | torch {t_bwd_t * 1e3:7.1f} us")
    print("    " + "; ".join(checks))


def bench_layer_norm(rows, cols, dtype, iters, bw, failures):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, cols, device="cuda", generator=g).to(dtype)
    w = (torch.randn(cols, device="cuda", generator=g) * 0.5 + 1).to(dtype)
    b = torch.randn(cols, device="cuda", generator=g).to(dtype)
    dy = torch.randn(rows, cols, device="cuda", generator=g).to(dtype)
    # correctness
    xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
    yr = F.layer_norm(xr, (cols,), wr, br)
    yr.backward(dy.double())
    res = {}
    for name, fn in (("ext", ext.layer_norm), ("torch", lambda x_, w_, b_: F.layer_norm(x_, (cols,), w_, b_))):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y = fn(xs, ws, bs)
        y.backward(dy)
        res[name] = (y, xs.grad, ws.grad, bs.grad)
    checks = [_ok(f"layer_norm {n} {dtype} {rows}x{cols}", o, t, r, failures)
              for n, o, t, r in zip(("y", "dx", "dw", "db"), res["ext"], res["torch"],
                                    (yr.detach(), xr.grad, wr.grad, br.grad))]
    # timing (kernels only, no autograd)
    nbytes = x.element_size() * rows * cols
    E = torch.ops.nanogpt_ext
    _, mean, rstd = E.layer_norm_fwd(x, w, b, 1e-5)
    _, tmean, trstd = torch.native_layer_norm(x, (cols,), w, b, 1e-5)
    t_fwd = _time(lambda: E.layer_norm_fwd(x, w, b, 1e-5), iters)
    t_fwd_t = _time(lambda: torch.native_layer_norm(x, (cols,), w, b, 1e-5), iters)
    t_bwd = _time(lambda: E.layer_norm_bwd(dy, x, w, mean, rstd, True), iters)
    t_bwd_t = _time(lambda: torch.ops.aten.native_layer_norm_backward(dy, x, (cols,), tmean, trstd, w, b,
                                                                        [True, True, True]), iters)
    _report(f"layer_norm {str(dtype):15s} {rows}x{cols}", nbytes, bw, t_fwd, t_fwd_t, t_bwd, t_bwd_t, checks)


def bench_bias_gelu(rows, cols, dtype, approximate, iters, bw, failures):
    g = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randn(rows, cols, device="cuda", generator=g) * 2).to(dtype)
    b = torch.randn(cols, device="cuda", generator=g).to(dtype)
    dy = torch.randn(rows, cols, device="cuda", generator=g).to(dtype)
    xr, br = x.double().requires_grad_(), b.double().requires_grad_()
    yr = F.gelu(xr + br, approximate=approximate)
    yr.backward(dy.double())
    res = {}
    for name, fn in (("ext", lambda x_, b_: ext.bias_gelu(x_, b_, approximate)),
                     ("torch", lambda x_, b_: F.gelu(x_ + b_, approximate=approximate))):
        xs, bs = x.clone().requires_grad_(), b.clone().requires_grad_()
        y = fn(xs, bs)
        y.backward(dy)
        res[name] = (y, xs.grad, bs.grad)
    checks = [_ok(f"bias_gelu({approximate}) {n} {dtype} {rows}x{cols}", o, t, r, failures)
              for n, o, t, r in zip(("y", "dx", "db"), res["ext"], res["torch"], (yr.detach(), xr.grad, br.grad))]
    nbytes = x.element_size() * rows * cols
    E = torch.ops.nanogpt_ext
    tanh = approximate == "tanh"
    t_fwd = _time(lambda: E.bias_gelu_fwd(x, b, tanh), iters)
    t_fwd_t = _time(lambda: F.gelu(x + b, approximate=approximate), iters)
    t_bwd = _time(lambda: E.bias_gelu_bwd(dy, x, b, tanh), iters)
    t_bwd_t = _time(lambda: (torch.ops.aten.gelu_backward(dy, x + b, approximate=approximate).sum(0)), iters)
    _report(f"bias_gelu({approximate}) {str(dtype):15s} {rows}x{cols}", nbytes, bw, t_fwd, t_fwd_t, t_bwd, t_bwd_t,
            checks)


def bench_adamw(dtype, iters, bw, failures):
    torch.manual_seed(0)
    shapes = [(50304, 768), (1024, 768)] + [(768, 2304), (2304,), (768, 768), (768,), (768,), (768,),
                                             (768, 3072), (3072,), (3072, 768), (768,), (768,), (768,)] * 12
    ps = [torch.randn(s, device="cuda").to(dtype) for s in shapes]
    grads = [torch.randn_like(p) * 1e-2 for p in ps]

    def make(kind):
        params = [p.clone().requires_grad_() for p in ps]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        if kind == "ext":
            opt = ext.FusedAdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=1.0)
            return params, opt, opt.step
        opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)

        def step():
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
        return params, opt, step

    # correctness: 10 steps, ours vs torch (fp32 state in both for fp32 params)
    p_e, _, step_e = make("ext")
    p_t, _, step_t = make("torch")
    for _ in range(10):
        for p, gr in zip(p_e, grads):
            p.grad.copy_(gr)
        for p, gr in zip(p_t, grads):
            p.grad.copy_(gr)
        step_e()
        step_t()
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(p_e, p_t))
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps * max(p.abs().max().item() for p in ps)
    ok = diff <= tol
    if not ok:
        failures.append(f"adamw {dtype}: max param difference {diff:.3g} after 10 steps (tol {tol:.2g})")
    n = sum(p.numel() for p in ps)
    es = ps[0].element_size()
    nbytes = n * (3 * es + 16)  # p read+write, g read, m and v read+write (fp32)
    t_e = _time(step_e, iters)
    t_t = _time(step_t, iters)
    print(f"adamw {str(dtype):15s} {n / 1e6:.0f}M params, {len(ps)} tensors: ext {t_e * 1e3:8.1f} us "
          f"{nbytes / t_e / 1e6:6.0f} GB/s ({nbytes / t_e / 1e6 / bw:4.0%}) | torch fused+clip {t_t * 1e3:8.1f} us"
          f"   max|diff| vs torch {diff:.2g}" + ("" if ok else "  <-- FAIL"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_ext: no CUDA device visible to torch (torch.cuda.is_available() is False); "
              "nothing to check or time. Run this on a GPU machine.")
        return 0
    reason = ext.unavailable("cuda")
    if reason:
        print(f"bench_ext: the ext backend cannot run on CUDA: {reason}")
        return 1
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    bw = copy_bandwidth(a.iters)
    print(f"device-to-device copy: {bw:.0f} GB/s (read + write); percentages below are of this\n")
    failures = []
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    ln_cols = (768, 1023) if a.quick else (768, 1023, 1024, 4096)
    for dtype in dtypes:
        for cols in ln_cols:
            bench_layer_norm(a.rows, cols, dtype, a.iters, bw, failures)
    for dtype in dtypes:
        for approximate in ("none", "tanh"):
            for cols in ((3072,) if a.quick else (3072, 3071)):
                bench_bias_gelu(a.rows, cols, dtype, approximate, a.iters, bw, failures)
    for dtype in (torch.float32, torch.bfloat16):
        bench_adamw(dtype, a.iters, bw, failures)
    print()
    if failures:
        print(f"{len(failures)} check(s) FAILED:")
        for f in failures:
            print("  " + f)
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
