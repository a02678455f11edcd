"""The op registry: which backend implements which op, on which devices, and how a selector picks one.

    op          torch (reference)                 triton                         ext (C++/CUDA, nanogpt_kernels._C)
    attention   F.scaled_dot_product_attention    triton/attention.py            csrc/cpu/attention.cpp (CPU only)
    layer_norm  F.layer_norm                      triton/layer_norm.py           csrc/cpu|cuda/layer_norm
    bias_gelu   F.gelu(x + bias)                  triton/bias_gelu.py            csrc/cpu|cuda/bias_gelu
    adamw       torch.optim.AdamW + clipping      triton/adamw.py                csrc/cpu|cuda/adamw

`REGISTRY` is the one table of that: everything else (the model, the compile check, the benchmark cases,
the tests, `python -m nanogpt_kernels`) reads it. The torch reference implementations live here, beside it.

A selector (`--kernels=...`) is one name for every op (`auto`, `torch`, `triton`, `ext`) or a per-op list
such as `attention:triton,layer_norm:torch` (ops not named take `auto`). A backend named for every op that
lacks one of them there falls back for that op, and `describe` says so; a backend named for one op that
cannot run it is a `KernelError`. `auto` here is the fixed order `AUTO_ORDER`; the measured `auto`
(nanogpt_kernels.autotune) times and checks the same candidates instead.
"""
import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class KernelError(ValueError):
    """A backend was asked for that does not exist or cannot run here (the message names the fix)."""


BACKENDS = ("torch", "triton", "ext")
# the module holding each backend's `unavailable(device_type)`; torch's reference runs everywhere
_BACKEND_MODULES = {"torch": None, "triton": "nanogpt_kernels.triton", "ext": "nanogpt_kernels.ext"}
# names the selector took before ops had one name everywhere (checkpoints and scripts still carry them)
ALIASES = {"gelu": "bias_gelu", "optimizer": "adamw"}
# `auto` without measuring (--autotune=False): the first backend in this order that can run the op
AUTO_ORDER = {"cuda": ("triton", "ext", "torch"), "cpu": ("ext", "torch")}


@dataclass(frozen=True)
class Impl:
    target: str          # "module:attribute", imported on first use
    devices: tuple = ()  # device types it has kernels for; () = any


@dataclass(frozen=True)
class OpSpec:
    kind: str            # "layer" (forward + backward) or "optimizer" (one step)
    impls: dict          # backend -> Impl


_T, _E = "nanogpt_kernels.triton", "nanogpt_kernels.ext"
REGISTRY = {
    "attention": OpSpec("layer", {"torch": Impl(f"{__name__}:attention"), "triton": Impl(f"{_T}.attention:attention"),
                                  "ext": Impl(f"{_E}:attention", ("cpu",))}),
    "layer_norm": OpSpec("layer", {"torch": Impl(f"{__name__}:layer_norm"),
                                   "triton": Impl(f"{_T}.layer_norm:layer_norm"), "ext": Impl(f"{_E}:layer_norm")}),
    "bias_gelu": OpSpec("layer", {"torch": Impl(f"{__name__}:bias_gelu"), "triton": Impl(f"{_T}.bias_gelu:bias_gelu"),
                                  "ext": Impl(f"{_E}:bias_gelu")}),
    "adamw": OpSpec("optimizer", {"torch": Impl(f"{__name__}:FusedAdamW"), "triton": Impl(f"{_T}.adamw:FusedAdamW"),
                                  "ext": Impl(f"{_E}:FusedAdamW")}),
}
OPS = tuple(REGISTRY)


# ---------------------------------------------------------------- the torch reference backend

def attention(q, k, v, causal=True, scale=None, dropout_p=0.0):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)


def layer_norm(x, weight, bias=None, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def bias_gelu(x, bias=None, approximate="none"):
    return F.gelu(x if bias is None else x + bias, approximate=approximate)


class FusedAdamW(torch.optim.AdamW):
    """torch.optim.AdamW (fused on CUDA) with the backend contract: clip inside step, return the norm."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, max_grad_norm=0.0):
        params = list(params)
        on_cuda = all(p.is_cuda for g in params for p in (g["params"] if isinstance(g, dict) else [g]))
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=on_cuda or None)
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if not torch.isfinite(norm):
            return norm
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm)
        super().step(closure)
        return norm


# ---------------------------------------------------------------- lookup and selection

def backend_unavailable(backend, device_type):
    """None when `backend` can run on device_type at all, else why not."""
    if _BACKEND_MODULES[backend] is None:
        return None
    try:
        mod = importlib.import_module(_BACKEND_MODULES[backend])
    except Exception as e:  # a broken backend must not take the others down with it
        return f"cannot import {_BACKEND_MODULES[backend]!r} ({type(e).__name__}: {e})"
    return mod.unavailable(device_type)


def unavailable(op, backend, device_type):
    """None when `backend` runs `op` on device_type, else why not."""
    impl = REGISTRY[op].impls.get(backend)
    if impl is None:
        return f"{backend} has no {op} kernel"
    if impl.devices and device_type not in impl.devices:
        return f"{backend} has no {op} kernel on {device_type}"
    return backend_unavailable(backend, device_type)


def get(op, backend):
    """The function (or, for the optimizer, the class) implementing `op` in `backend`."""
    module, _, attr = REGISTRY[op].impls[backend].target.partition(":")
    return getattr(importlib.import_module(module), attr)


def candidates(op, device_type):
    """The backends that can run `op` here, in AUTO_ORDER (torch, the reference, always last)."""
    order = AUTO_ORDER.get(device_type, ("torch",))
    return [b for b in order if unavailable(op, b, device_type) is None]


def parse(spec):
    """The selector as {op: backend or "auto"}, with unknown ops and backends a KernelError."""
    spec = (spec or "auto").strip()
    if ":" not in spec:
        choice = dict.fromkeys(OPS, spec)
    else:
        choice = dict.fromkeys(OPS, "auto")
        for item in spec.split(","):
            op, _, name = item.partition(":")
            op, name = ALIASES.get(op.strip(), op.strip()), name.strip()
            if op not in REGISTRY:
                raise KernelError(f"kernels: unknown op {op!r} in {spec!r}; ops are {', '.join(OPS)}")
            choice[op] = name
    for op, name in choice.items():
        if name != "auto" and name not in BACKENDS:
            raise KernelError(f"kernels: unknown backend {name!r} for {op}; use one of auto, {', '.join(BACKENDS)}")
    return choice


def resolve(spec, device_type):
    """{op: backend} for the selector, `auto` taken in AUTO_ORDER; a KernelError names the problem and the fix."""
    wanted = parse(spec)
    named_for_all = ":" not in (spec or "auto")
    out = {}
    for op, name in wanted.items():
        if name == "auto":
            out[op] = candidates(op, device_type)[0]
            continue
        reason = unavailable(op, name, device_type)
        if reason is None:
            out[op] = name
        elif named_for_all and backend_unavailable(name, device_type) is None:
            out[op] = candidates(op, device_type)[0]  # the backend runs, but not this op: fall back (describe says)
        else:
            raise KernelError(f"kernels: backend {name!r} cannot run {op} on {device_type}: {reason}; "
                              f"pick another with --kernels=torch (or {op}:torch)")
    return out


def describe(choice, device_type):
    """One line naming each op's backend, plus why a backend that was not chosen could not run."""
    line = ", ".join(f"{op}={name}" for op, name in choice.items())
    notes = []
    for b in BACKENDS:
        if b in choice.values() or b == "torch":
            continue
        why = backend_unavailable(b, device_type)
        if why:
            notes.append(f"{b} unavailable: {why}")
    for op, name in choice.items():
        for b in AUTO_ORDER.get(device_type, ()):
            if b == name:
                break
            why = unavailable(op, b, device_type)
            if why and backend_unavailable(b, device_type) is None:
                notes.append(f"{op}: {why}")
    return line + "".join(f"\n  ({n})" for n in notes)
