"""Kernel benchmark cases shared by bench_kernels.py (pytest-benchmark) and kernel_roofline.py.

A case is one op x pass x backend at one shape preset. The ops and backends are the registry's
(nanogpt_kernels.registry); the passes follow the op's kind:
  layer      fwd, bwd (torch.autograd.grad of a retained graph), full (fwd + bwd)
  optimizer  step (clip + AdamW step over a GPT's parameter list, the optimizer contract)
A layer op needs a row in LAYER_CASES (its inputs and its work, for rates); an optimizer op needs nothing.
The work is
  layer_norm, rms_norm,   bytes: the minimum DRAM traffic (fwd reads x and writes y = 2 tensors;
  bias_gelu, bias_relu2   bwd reads x and dy and writes dx = 3; full = 5; weights/stats ignored)
  rope                    bytes: fwd reads q, k and writes their turns; bwd the same for the grads
                          (2 x (q + k) each, cos/sin ignored)
  attention               FLOPs: fwd 4*B*H*T*T*D/2 (causal half), bwd 2.5x fwd, full 3.5x fwd
  linear_cross_entropy    FLOPs: fwd 2*N*V*C (the logits), full 3x fwd (plus dx and dW); no bwd pass:
                          the kernels take the gradient in the forward, the backward only scales it
  optimizer (adamw)       bytes: 32 per fp32 parameter (norm pass reads g; fused update reads g,p,m,v
                          and writes p,m,v)
"""
import os
import platform
from dataclasses import dataclass

import torch

from nanogpt_kernels import registry

OPS = registry.OPS

# model shape each preset's optimizer case takes its parameter list from
_GPT2 = dict(n_layer=12, n_embd=768, vocab_size=50304, block_size=1024)
_QUICK = dict(n_layer=4, n_embd=128, vocab_size=65, block_size=64)
PRESETS = {
    # GPT-2 124M at batch 12 x block 1024
    "gpt2": dict(rows=12 * 1024, C=768, V=50304, B=12, H=12, T=1024, D=64, model=_GPT2, dtype="bfloat16"),
    # CPU: big enough to leave the caches, small enough for a 2-core machine
    "cpu": dict(rows=2048, C=768, V=4096, B=4, H=4, T=256, D=32,
                model=dict(n_layer=4, n_embd=384, vocab_size=65, block_size=256), dtype="float32"),
    # linear_cross_entropy at the GPT-2 vocabulary, the shape its issue's goals name (fp32, CPU-sized rows)
    "lce": dict(rows=8192, C=768, V=50304, B=1, H=12, T=64, D=64, model=_QUICK, dtype="float32"),
    # tests: seconds
    "tiny": dict(rows=64, C=64, V=65, B=1, H=2, T=32, D=32, model=_QUICK, dtype="float32"),
}


@dataclass(frozen=True)
class LayerCase:
    inputs: object  # (preset, rnd) -> the input tensors (gradients are taken for the floating ones)
    call: object    # (backend's function, *inputs) -> output
    work: object    # (preset, element size) -> (unit, fwd work, bwd work)
    passes: tuple = ("fwd", "bwd", "full")


def _attention_flops(p, esize):
    fwd = 4 * p["B"] * p["H"] * p["T"] * p["T"] * p["D"] // 2
    return "flop", fwd, int(2.5 * fwd)


def _logits_flops(p, esize):
    fwd = 2 * p["rows"] * p["V"] * p["C"]
    return "flop", fwd, 2 * fwd


def _rope_bytes(p, esize):
    n = 2 * 2 * p["B"] * p["H"] * p["T"] * p["D"] * esize  # q and k in, their turns out
    return "byte", n, n


def _traffic(cols):  # memory-bound row ops: fwd moves 2 tensors of rows x cols, bwd 3
    return lambda p, esize: ("byte", 2 * p["rows"] * cols(p) * esize, 3 * p["rows"] * cols(p) * esize)


LAYER_CASES = {
    "layer_norm": LayerCase(lambda p, rnd: (rnd(p["rows"], p["C"]), rnd(p["C"]), rnd(p["C"])),
                            lambda fn, x, w, b: fn(x, w, b, 1e-5), _traffic(lambda p: p["C"])),
    "bias_gelu": LayerCase(lambda p, rnd: (rnd(p["rows"], 4 * p["C"]), rnd(4 * p["C"])),
                           lambda fn, x, b: fn(x, b, "none"), _traffic(lambda p: 4 * p["C"])),
    "rms_norm": LayerCase(lambda p, rnd: (rnd(p["rows"], p["C"]), rnd(p["C"])),
                          lambda fn, x, w: fn(x, w), _traffic(lambda p: p["C"])),
    "bias_relu2": LayerCase(lambda p, rnd: (rnd(p["rows"], 4 * p["C"]), rnd(4 * p["C"])),
                            lambda fn, x, b: fn(x, b), _traffic(lambda p: 4 * p["C"])),
    "rope": LayerCase(lambda p, rnd: (rnd(p["B"], p["H"], p["T"], p["D"]), rnd(p["B"], p["H"], p["T"], p["D"]),
                                      rnd(p["T"], p["D"] // 2, dtype=torch.float32, grad=False),
                                      rnd(p["T"], p["D"] // 2, dtype=torch.float32, grad=False)),
                      lambda fn, q, k, cos, sin: fn(q, k, cos, sin), _rope_bytes),
    "attention": LayerCase(lambda p, rnd: tuple(rnd(p["B"], p["H"], p["T"], p["D"]) for _ in range(3)),
                           lambda fn, q, k, v: fn(q, k, v, causal=True), _attention_flops),
    "linear_cross_entropy": LayerCase(
        lambda p, rnd: (rnd(p["rows"], p["C"]), rnd(p["V"], p["C"], scale=0.02), rnd(p["rows"], high=p["V"])),
        lambda fn, x, w, t: fn(x, w, t), _logits_flops, ("fwd", "full")),
}


def _passes(op, kind):
    if kind == "optimizer":
        return ("step",)
    # a layer op without a case yet keeps the usual passes: it shows up, and make_case says what is missing
    return LAYER_CASES[op].passes if op in LAYER_CASES else LayerCase.passes


PASSES = {op: _passes(op, spec.kind) for op, spec in registry.REGISTRY.items()}
CASES = [(op, p) for op in OPS for p in PASSES[op]]


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


UNFUSED = "unfused"  # a pseudo-backend: what the model computes without an optional op (its measured auto baseline)


def unavailable(op, backend, device):
    """None when `backend` runs `op` on device, else why not."""
    if backend == UNFUSED:
        return None if registry.REGISTRY[op].optional else f"{op} is not optional: it has no unfused path"
    return registry.unavailable(op, backend, torch.device(device).type)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def make_case(op, pass_, backend, preset, device, compile_fn=False):
    """(fn, work, unit): fn() runs the case once (not synchronized); work is FLOPs or bytes per call."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    dev = torch.device(device)
    dt = getattr(torch, p["dtype"])
    g = torch.Generator(device="cpu").manual_seed(0)
    impl = registry.unfused(op) if backend == UNFUSED else registry.get(op, backend)

    def rnd(*shape, dtype=dt, grad=True, scale=1.0, high=None):
        """N(0, scale^2) values (requiring grad), or integers in [0, high) when high is given."""
        if high is not None:
            return torch.randint(high, shape, generator=g).to(dev)
        t = (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dtype)
        return t.requires_grad_(grad)

    if pass_ not in PASSES[op]:
        raise ValueError(f"{op}: unknown pass {pass_!r}; passes are {', '.join(PASSES[op])}")
    if registry.REGISTRY[op].kind == "optimizer":
        params = [rnd(*s, dtype=torch.float32, grad=False, scale=0.02) for s in gpt_param_shapes(**p["model"])]
        for q in params:
            q.grad = torch.randn(q.shape, generator=g).to(dev) * 1e-2
        groups = [{"params": [q for q in params if q.dim() >= 2], "weight_decay": 0.1},
                  {"params": [q for q in params if q.dim() < 2], "weight_decay": 0.0}]
        opt = impl(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, max_grad_norm=1.0)
        opt.step()  # allocate state outside the timed calls
        n = sum(q.numel() for q in params)
        return opt.step, 32 * n, "byte"

    if op not in LAYER_CASES:
        raise NotImplementedError(f"no benchmark case for {op}: add its inputs and work to "
                                  "LAYER_CASES in benchmarks/kernel_cases.py")
    case = LAYER_CASES[op]
    inputs = case.inputs(p, rnd)
    wrt = [t for t in inputs if t.requires_grad]
    f = lambda: case.call(impl, *inputs)  # noqa: E731
    if compile_fn:
        f = torch.compile(f)
    unit, fwd, bwd = case.work(p, torch.empty((), dtype=dt).element_size())
    work = {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[pass_]

    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return f()
        return run, work, unit
    out = f()
    outs = tuple(out) if isinstance(out, tuple) else (out,)  # rope gives (q_rot, k_rot)
    dys = [torch.randn(o.shape, generator=g).to(device=dev, dtype=o.dtype) for o in outs]
    if pass_ == "bwd":
        def run():
            return torch.autograd.grad(outs, wrt, dys, retain_graph=True)
    else:
        def run():
            return torch.autograd.grad(f(), wrt, dys)
    return run, work, unit


def require_device(device):
    """A one-line error when `device` names CUDA on a machine without it (each benchmark's first check)."""
    from nanogpt.errors import UserError
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={device} but CUDA is not available; use --device=cpu")


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
