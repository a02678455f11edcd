"""Kernel benchmark cases shared by bench_kernels.py (pytest-benchmark) and kernel_roofline.py.

A case is one op x pass x backend at one shape preset:
  ops     layer_norm, bias_gelu, attention (causal), adamw (clip + AdamW step, the optimizer contract)
  passes  fwd, bwd (torch.autograd.grad of a retained graph), full (fwd + bwd); adamw has only "step"
and comes with the work it does, for rates:
  layer_norm, bias_gelu   bytes: the minimum DRAM traffic (fwd reads x and writes y = 2 tensors;
                          bwd reads x and dy and writes dx = 3; full = 5; weights/stats ignored)
  attention               FLOPs: fwd 4*B*H*T*T*D/2 (causal half), bwd 2.5x fwd, full 3.5x fwd
  adamw                   bytes: 32 per fp32 parameter (norm pass reads g; fused update reads g,p,m,v
                          and writes p,m,v)
"""
import os
import platform

import torch

from nanogpt import ops

OPS = ("layer_norm", "bias_gelu", "attention", "adamw")
PASSES = {"layer_norm": ("fwd", "bwd", "full"), "bias_gelu": ("fwd", "bwd", "full"),
          "attention": ("fwd", "bwd", "full"), "adamw": ("step",)}

# model shape each preset's AdamW case takes its parameter list from
_GPT2 = dict(n_layer=12, n_embd=768, vocab_size=50304, block_size=1024)
_QUICK = dict(n_layer=4, n_embd=128, vocab_size=65, block_size=64)
PRESETS = {
    # GPT-2 124M at batch 12 x block 1024
    "gpt2": dict(rows=12 * 1024, C=768, B=12, H=12, T=1024, D=64, model=_GPT2, dtype="bfloat16"),
    # CPU: big enough to leave the caches, small enough for a 2-core machine
    "cpu": dict(rows=2048, C=768, B=4, H=4, T=256, D=32, model=dict(n_layer=4, n_embd=384, vocab_size=65,
                                                                         block_size=256), dtype="float32"),
    # tests: seconds
    "tiny": dict(rows=64, C=64, B=1, H=2, T=32, D=32, model=_QUICK, dtype="float32"),
}


def default_device():
    return os.environ.get("NANOGPT_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def default_preset(device):
    return "gpt2" if torch.device(device).type == "cuda" else "cpu"


def gpt_param_shapes(n_layer, n_embd, vocab_size, block_size):
    """The parameter shapes of nanogpt.model.GPT (bias=True, tied lm_head) without building it."""
    C = n_embd
    shapes = [(vocab_size, C), (block_size, C)]
    for _ in range(n_layer):
        shapes += [(C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,),
                   (C,), (C,), (4 * C, C), (4 * C,), (C, 4 * C), (C,)]
    return shapes + [(C,), (C,)]


def backend_or_reason(name, device):
    """(module, None) or (None, why it cannot run on device)."""
    return ops._backend(name, torch.device(device).type)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def make_case(op, pass_, mod, preset, device, compile_fn=False):
    """(fn, work, unit): fn() runs the case once (not synchronized); work is FLOPs or bytes per call."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    dev = torch.device(device)
    dt = getattr(torch, p["dtype"])
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dtype=dt, grad=True, scale=1.0):
        t = (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dtype)
        return t.requires_grad_(grad)

    if op == "adamw":
        params = [rnd(*s, dtype=torch.float32, grad=False, scale=0.02) for s in gpt_param_shapes(**p["model"])]
        for q in params:
            q.grad = torch.randn(q.shape, generator=g).to(dev) * 1e-2
        groups = [{"params": [q for q in params if q.dim() >= 2], "weight_decay": 0.1},
                  {"params": [q for q in params if q.dim() < 2], "weight_decay": 0.0}]
        opt = mod.FusedAdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, max_grad_norm=1.0)
        opt.step()  # allocate state outside the timed calls
        n = sum(q.numel() for q in params)
        return opt.step, 32 * n, "byte"

    esize = torch.empty((), dtype=dt).element_size()
    if op == "layer_norm":
        x, w, b = rnd(p["rows"], p["C"]), rnd(p["C"]), rnd(p["C"])
        f = lambda: mod.layer_norm(x, w, b, 1e-5)  # noqa: E731
        inputs, elems, unit = (x, w, b), p["rows"] * p["C"], "byte"
        per_pass = {"fwd": 2 * elems * esize, "bwd": 3 * elems * esize}
    elif op == "bias_gelu":
        F4 = 4 * p["C"]
        x, b = rnd(p["rows"], F4), rnd(F4)
        f = lambda: mod.bias_gelu(x, b, "none")  # noqa: E731
        inputs, elems, unit = (x, b), p["rows"] * F4, "byte"
        per_pass = {"fwd": 2 * elems * esize, "bwd": 3 * elems * esize}
    elif op == "attention":
        shape = (p["B"], p["H"], p["T"], p["D"])
        q, k, v = rnd(*shape), rnd(*shape), rnd(*shape)
        f = lambda: mod.attention(q, k, v, causal=True)  # noqa: E731
        inputs, unit = (q, k, v), "flop"
        fwd = 4 * p["B"] * p["H"] * p["T"] * p["T"] * p["D"] // 2
        per_pass = {"fwd": fwd, "bwd": int(2.5 * fwd)}
    else:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    if compile_fn:
        f = torch.compile(f)
    per_pass["full"] = per_pass["fwd"] + per_pass["bwd"]

    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return f()
    elif pass_ == "bwd":
        out = f()
        dy = torch.randn(out.shape, generator=g).to(device=dev, dtype=out.dtype)

        def run():
            return torch.autograd.grad(out, inputs, dy, retain_graph=True)
    elif pass_ == "full":
        dy = torch.randn(f().shape, generator=g).to(device=dev, dtype=dt)

        def run():
            return torch.autograd.grad(f(), inputs, dy)
    else:
        raise ValueError(f"{op}: unknown pass {pass_!r}; passes are {', '.join(PASSES[op])}")
    return run, per_pass[pass_], unit


def device_name(device):
    """The GPU's name, or the CPU's model name from /proc/cpuinfo (else what platform knows)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
