"""Op dispatch: which backend runs each of the GPT's hot ops.

A backend is a module exposing the same functions under the same names:

    layer_norm(x, weight, bias=None, eps=1e-5) -> Tensor
    bias_gelu(x, bias=None, approximate="none") -> Tensor       # gelu(x + bias)
    attention(q, k, v, causal=True, scale=None, dropout_p=0.0)  # (B, H, T, D)
    FusedAdamW(params, lr, betas, eps, weight_decay, max_grad_norm=0.0)
    unavailable(device_type) -> str | None                      # why it can't run here

Every optimizer's `step()` returns the total gradient norm (0-d tensor) taken
before clipping, clips to `max_grad_norm` when it is > 0, and leaves parameters
and state untouched when that norm is not finite, so the trainer can count a
skipped step.

The selector string (`GPTConfig.kernels`, `--kernels=...`) is either one
backend name for every op (`torch`, `triton`, `ext`, `auto`) or a per-op list
such as `attention:triton,layer_norm:torch`; ops not named take `auto`.
"""
import importlib
import warnings

import torch
import torch.nn.functional as F

from nanogpt.errors import UserError

OPS = ("attention", "layer_norm", "gelu", "optimizer")
BACKENDS = ("torch", "triton", "ext")
_MODULES = {"torch": "nanogpt.ops", "triton": "kernels", "ext": "nanogpt.ext"}
# what `auto` tries, per device type and op, best measured first; the first that can run wins
_AUTO_ORDER = {
    "cuda": dict.fromkeys(OPS, ("triton", "ext", "torch")),
    "cpu": dict.fromkeys(OPS, ("ext", "torch")),
}


class KernelError(UserError, ValueError):
    """A backend was asked for that does not exist or cannot run here."""


# ---------------------------------------------------------------- torch backend

def layer_norm(x, weight, bias=None, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def bias_gelu(x, bias=None, approximate="none"):
    return F.gelu(x if bias is None else x + bias, approximate=approximate)


def attention(q, k, v, causal=True, scale=None, dropout_p=0.0):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)


_announced = set()


def _is_compiling():
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


def sdpa_fallback(q, k, v, causal, scale, dropout_p, why):
    """torch SDPA for a call a backend's kernels do not cover, announced once per `why`. The warning
    comes from the first eager call: inside torch.compile it would break a fullgraph graph."""
    if why not in _announced and not _is_compiling():
        _announced.add(why)
        warnings.warn(f"{why}; falling back to torch scaled_dot_product_attention", stacklevel=3)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)


class FusedAdamWBase(torch.optim.Optimizer):
    """What the fused AdamW backends share: hyperparameter checks, and state kept as torch.optim.AdamW
    names it (exp_avg, exp_avg_sq, a 0-d `step` tensor on the param's device) but always float32."""

    def __init__(self, params, lr, betas, eps, weight_decay, max_grad_norm):
        if lr < 0 or eps < 0 or not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"{type(self).__name__}: invalid lr={lr}, betas={betas} or eps={eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.max_grad_norm = float(max_grad_norm or 0.0)

    def _init_state(self, p):
        st = self.state[p]
        if "exp_avg" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        return st

    def load_state_dict(self, state_dict):
        # Optimizer.load_state_dict casts floating state to each param's dtype: put it back to float32
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        current = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, current):
            saved = state_dict["state"].get(i)
            if not saved:
                continue
            st = self.state[p]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved:
                    st[key] = saved[key].to(device=p.device, dtype=torch.float32, copy=True).contiguous()
            if "step" in saved:
                st["step"] = torch.as_tensor(saved["step"]).to(device=p.device, dtype=torch.float32).reshape(()).clone()


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


def unavailable(device_type):
    return None


def cpu_native_bf16():
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                     "_is_amx_tile_supported"))


def auto_dtype(device_type, kernels="auto"):
    """`dtype=auto`: the faster training precision here with these kernels. CUDA: bfloat16 where the GPU has
    it, else float16. CPU: bfloat16 (autocast) where the CPU multiplies bf16 in hardware and attention runs on
    the extension's CPU kernel (torch's own CPU attention backward is slow in bf16), else float32."""
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    fast = device_type == "cpu" and cpu_native_bf16() and resolve(kernels, "cpu")["attention"] == "ext"
    return "bfloat16" if fast else "float32"


# ---------------------------------------------------------------- selection

def _backend(name, device_type):
    """The backend module, or the reason it cannot run on device_type."""
    try:
        mod = importlib.import_module(_MODULES[name])
    except Exception as e:  # a broken backend must not take the others down with it
        return None, f"cannot import {_MODULES[name]!r} ({type(e).__name__}: {e})"
    reason = mod.unavailable(device_type)
    return (None, reason) if reason else (mod, None)


def resolve(spec, device_type):
    """Map every op to a backend name; raise KernelError naming the problem and the fix."""
    spec = (spec or "auto").strip()
    if ":" in spec:
        choice = dict.fromkeys(OPS, "auto")
        for item in spec.split(","):
            op, _, name = item.partition(":")
            op, name = op.strip(), name.strip()
            if op not in OPS:
                raise KernelError(f"kernels: unknown op {op!r} in {spec!r}; ops are {', '.join(OPS)}")
            choice[op] = name
    else:
        choice = dict.fromkeys(OPS, spec)
    out = {}
    for op, name in choice.items():
        if name == "auto":
            order = _AUTO_ORDER.get(device_type, {}).get(op, ("torch",))
            out[op] = next(b for b in order if _backend(b, device_type)[0] is not None)
            continue
        if name not in BACKENDS:
            raise KernelError(f"kernels: unknown backend {name!r} for {op}; use one of auto, {', '.join(BACKENDS)}")
        mod, reason = _backend(name, device_type)
        if mod is None:
            raise KernelError(f"kernels: backend {name!r} cannot run {op} on {device_type}: {reason}; "
                              f"pick another with --kernels=torch (or {op}:torch)")
        out[op] = name
    return out


def get(backend):
    """The module implementing `backend` (already checked by resolve)."""
    return importlib.import_module(_MODULES[backend])


def describe(choice, device_type):
    """One line naming each op's backend, plus why faster backends were passed over."""
    line = ", ".join(f"{op}={name}" for op, name in choice.items())
    skipped = {b: _backend(b, device_type)[1] for b in BACKENDS if b not in choice.values()}
    notes = [f"{b} unavailable: {why}" for b, why in skipped.items() if why]
    return line + "".join(f"\n  ({n})" for n in notes)
