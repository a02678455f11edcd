"""The op registry: which backend implements which op, on which devices, and how a selector picks one.

The kernel library (source folder kernels/, import name `nanogpt_kernels`) has no __init__.py on purpose: as
a namespace package it never shadows Hugging Face's `kernels` package, even for a Python started in this
repository's root (where the folder kernels/ is on sys.path first). It imports nothing from `nanogpt`.

    op          torch (reference)                 triton                         ext (C++/CUDA, nanogpt_kernels._C)
    attention   F.scaled_dot_product_attention    triton/attention.py            csrc/attention.cpp (CPU only)
    layer_norm  F.layer_norm                      triton/layer_norm.py           csrc/cpu|cuda/layer_norm
    bias_gelu   F.gelu(x + bias)                  triton/bias_gelu.py            csrc/cpu|cuda/bias_act
    adamw       torch.optim.AdamW + clipping      triton/adamw.py                csrc/cpu|cuda/adamw
    linear_cross_entropy  chunked (below)         triton/linear_cross_entropy.py csrc/cpu/linear_cross_entropy
    rms_norm    F.rms_norm                        triton/rms_norm.py             csrc/cpu|cuda/rms_norm
    bias_relu2  F.relu(x + bias).square()         triton/bias_relu2.py           csrc/cpu|cuda/bias_act
    rope        rotate-half (below)               triton/rope.py                 csrc/cpu|cuda/rope

`REGISTRY` is the one table of that: everything else (the model, the compile check, the benchmark cases,
the tests, `python -m nanogpt_kernels`) reads it. The torch reference implementations live here, beside it.

A selector (`--kernels=...`) is one name for every op (`auto`, `torch`, `triton`, `ext`) or a per-op list
such as `attention:triton,layer_norm:torch` (ops not named take `auto`). A backend named for every op that
lacks one of them there falls back for that op, and `describe` says so; a backend named for one op that
cannot run it is a `KernelError`. An op marked `optional` also takes `none` (`linear_cross_entropy:none`):
the model then runs its unfused path. `auto` here is the fixed order `AUTO_ORDER`; the measured `auto`
(nanogpt_kernels.autotune) times and checks the same candidates instead.
"""
import importlib
import math
from dataclasses import dataclass
from typing import Optional

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
    optional: bool = False  # the selector may name "none" for it: the model then does without the op
    unfused: str = None  # for an optional op, "module:attr" computing what the model does without it: the
    #                      measured auto's baseline for that op, as torch's op is for the others
    constants: tuple = ()  # positions of a layer op's tensor arguments it is not differentiated in (rope's tables)


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
    "linear_cross_entropy": OpSpec("layer", {"torch": Impl(f"{__name__}:linear_cross_entropy"),
                                             "triton": Impl(f"{_T}.linear_cross_entropy:linear_cross_entropy"),
                                             "ext": Impl(f"{_E}:linear_cross_entropy", ("cpu",))}, optional=True,
                                   unfused=f"{__name__}:unfused_linear_cross_entropy"),
    "rms_norm": OpSpec("layer", {"torch": Impl(f"{__name__}:rms_norm"), "triton": Impl(f"{_T}.rms_norm:rms_norm"),
                                 "ext": Impl(f"{_E}:rms_norm")}),
    "bias_relu2": OpSpec("layer", {"torch": Impl(f"{__name__}:bias_relu2"),
                                   "triton": Impl(f"{_T}.bias_relu2:bias_relu2"), "ext": Impl(f"{_E}:bias_relu2")}),
    "rope": OpSpec("layer", {"torch": Impl(f"{__name__}:rope"), "triton": Impl(f"{_T}.rope:rope"),
                             "ext": Impl(f"{_E}:rope")}, constants=(2, 3)),
}
NONE = "none"
OPS = tuple(REGISTRY)


# ---------------------------------------------------------------- the torch reference backend

def attention(q, k, v, causal=True, scale=None, dropout_p=0.0):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)


def split_heads(qkv, n_head):
    """c_attn's (B, T, 3C) output as q, k, v, each (B, nh, T, hs): views, no copy."""
    B, T, C3 = qkv.shape
    return tuple(t.view(B, T, n_head, C3 // 3 // n_head).transpose(1, 2) for t in qkv.split(C3 // 3, dim=2))


def merge_heads(y):
    """(B, nh, T, hs) -> (B, T, C): every head's output side by side."""
    B, nh, T, hs = y.shape
    return y.transpose(1, 2).contiguous().view(B, T, nh * hs)


def split_attention(attention, qkv, n_head, dropout_p=0.0):
    """Causal attention over c_attn's packed (B, T, 3C) output by split, attention(q, k, v), merge: (B, T, C)."""
    return merge_heads(attention(*split_heads(qkv, n_head), causal=True, dropout_p=dropout_p))


def attention_qkv(attention, qkv, n_head, dropout_p=0.0):
    """Causal attention over c_attn's packed (B, T, 3C) output with a backend's attention, returned (B, T, C). A
    backend whose attention has a `packed` form taking qkv itself (ext on CPU: the forward makes no per-third views
    and the backward writes one packed gradient where autograd concatenated three) runs that; otherwise
    split_attention."""
    packed = getattr(attention, "packed", None)
    if packed is not None:
        return packed(qkv, n_head, dropout_p=dropout_p)
    return split_attention(attention, qkv, n_head, dropout_p)


def layer_norm(x, weight, bias=None, eps=1e-5, out_dtype=None, add=None):
    """out_dtype: the output's dtype (None: F.layer_norm's). Under autocast the model asks for the autocast dtype,
    which the matmul after every LayerNorm casts to anyway: the same values, and the kernels write it directly.
    add: normalize x + add instead, and return (x + add, y): a block's residual add before its norm, which the
    ext CPU kernel fuses (one pass, and one backward op where autograd took three)."""
    if add is not None:
        return add_then(layer_norm, x, add, weight, bias, eps, out_dtype)
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    return y if out_dtype is None else y.to(out_dtype)


def add_then(norm, x, add, *args):
    """(x + add, norm(x + add, *args)): a norm's `add` where no kernel fuses the residual add."""
    s = x + add
    return s, norm(s, *args)


def bias_gelu(x, bias=None, approximate="none"):
    return F.gelu(x if bias is None else x + bias, approximate=approximate)


def rms_norm(x, weight=None, eps=None, out_dtype=None):
    """RMSNorm over the last dimension (QK-norm is this over the head dimension); out_dtype as layer_norm's."""
    y = F.rms_norm(x, (x.shape[-1],), weight, eps)
    return y if out_dtype is None else y.to(out_dtype)


def rms_norm_eps(eps):
    """The eps our kernels use: eps=None is F.rms_norm's default, the eps of the fp32 math they all do."""
    return torch.finfo(torch.float32).eps if eps is None else float(eps)


def bias_relu2(x, bias=None):
    """relu(x + bias)^2, the modern GPT's MLP activation."""
    return F.relu(x if bias is None else x + bias).square()


def rope(q, k, cos, sin):
    """Rotary embeddings on q (B, H, T, D) and k (B, Hk, T, D) in Hugging Face's rotate-half convention: with
    x1, x2 the halves of the last dim, cat(x1 cos - x2 sin, x2 cos + x1 sin); cos, sin (T, D/2), float32. Both
    outputs have q's dtype (transformers' apply_rotary_pos_emb with cos, sin repeated to D)."""
    def rotate(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(q.dtype)
    return rotate(q), rotate(k)


def rope_check(q, k, cos, sin):
    """The shapes and dtypes our rope kernels take (a ValueError naming the problem otherwise)."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:] or q.shape[3] % 2:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, H, T, D) with one B, T and "
                         "an even D")
    T, D = q.shape[2], q.shape[3]
    if cos.shape != (T, D // 2) or sin.shape != (T, D // 2):
        raise ValueError(f"rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be (T, D/2) = {(T, D // 2)}")
    if q.dtype != k.dtype:
        raise ValueError(f"rope: q is {q.dtype} but k is {k.dtype}; cast them to one dtype")


def clip_grads(params, max_norm):
    """The total gradient norm over params' grads (a 0-d tensor, before clipping) and whether it is finite; when
    it is, the grads are clipped in place to max_norm (> 0). What the adamw backends' step returns and does (a
    non-finite norm skips the step)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    finite = bool(torch.isfinite(norm))
    if finite and max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm, finite


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
        norm, finite = clip_grads(params, self.max_grad_norm)
        if not finite:
            return norm
        super().step(closure)
        return norm


# ---------------------------------------------------------------- linear + cross-entropy, chunked

def lce_chunk_rows(n, c, v):
    """Rows per logits chunk: about as many logits as the larger of x and weight has elements, a power of 2,
    >= 32. The weight's gradient (V, C) is read and written once per chunk, and each of the 3 matmuls runs on the
    chunk's rows: Liger's size (x's elements) gives 32-128-row chunks at GPT-2's vocabulary, whose fwd+bwd took
    4.1 s against 3.7 s at 1024 rows (the ext CPU op, N=2048, C=768, V=50304, fp32, one thread, Xeon
    AVX-512). Memory beyond the outputs stays within about one weight's size."""
    rows = math.ceil(max(n, v) * c / max(v, 1))
    return max(1, min(n, max(32, 1 << max(rows - 1, 0).bit_length())))


def lce_args(x, weight, targets, bias, ignore_index, reduction, softcap):
    """The public arguments as every backend's kernel takes them: x (N, C) and targets (N,) flattened, softcap
    0.0 for none, the chunk's rows, and whether the forward should take the gradient (only when one is wanted)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"linear_cross_entropy: softcap must be None or > 0, got {softcap}")
    C = x.shape[-1]
    x2, t2 = x.reshape(-1, C), targets.reshape(-1).long()
    if weight.dim() != 2 or weight.shape[1] != C or t2.numel() != x2.shape[0] or (
            bias is not None and tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"linear_cross_entropy: x {tuple(x.shape)}, weight {tuple(weight.shape)}, targets "
                         f"{tuple(targets.shape)} and bias {None if bias is None else tuple(bias.shape)} do not fit "
                         "x (..., C), weight (V, C), targets (...), bias (V,)")
    with_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return (x2, weight, t2, bias, int(ignore_index), reduction, float(softcap or 0.0),
            lce_chunk_rows(x2.shape[0], C, weight.shape[0]), with_grad)


def _ce_pass(logits, targets, ignore_index, softcap, grad):
    """The rows' fp32 losses; with `grad`, also logits <- d loss / d logits (0 on ignored rows)."""
    z = logits.float()  # logits itself when fp32: overwritten below, after the last read
    if softcap:
        t = torch.tanh(z / softcap)
        z = t * softcap
    lse = torch.logsumexp(z, 1)
    valid = targets != ignore_index
    tgt = torch.where(valid, targets, 0).unsqueeze(1)
    loss = torch.where(valid, lse - z.gather(1, tgt).squeeze(1), 0.0)
    if grad:
        p = z.sub_(lse[:, None]).exp_()
        p.scatter_add_(1, tgt, p.new_full(tgt.shape, -1.0))
        p.mul_(valid[:, None])
        if softcap:
            p.mul_(1.0 - t * t)
        logits.copy_(p)
    return loss


def chunked_linear_cross_entropy(x, weight, targets, bias, ignore_index, reduction, softcap, chunk, with_grad,
                                 ce_pass=_ce_pass):
    """(loss, dx, dweight, dbias) with at most `chunk` rows of logits alive: per chunk, logits = x_c W^T + b in x's
    dtype, ce_pass gives the rows' losses and turns the logits into their gradient, then dx_c = dlogits W and
    dW += dlogits^T x_c (fp32). The gradient is taken here, in the forward (as Liger does), so the backward only
    scales it: the logits are computed once, 3 matmuls in all like the unfused loss (recomputing them in the
    backward would take 4). The gradients are those of the summed loss, whatever the reduction: the mean's 1/count
    joins the output's grad in the backward, so fp16 dlogits keep GradScaler's range (and the count is never
    synced to the host). Without with_grad the gradients are empty and only the loss is computed."""
    N, C = x.shape
    V = weight.shape[0]
    losses = torch.empty(N, dtype=torch.float32, device=x.device)
    g = N if with_grad else 0
    dx = x.new_empty((g, C))
    dw = weight.new_zeros((V if with_grad else 0, C), dtype=torch.float32)
    db = weight.new_zeros((V if with_grad and bias is not None else 0,), dtype=torch.float32)
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        xc, logits = x[r0:r1], F.linear(x[r0:r1], weight, bias)
        losses[r0:r1] = ce_pass(logits, targets[r0:r1], ignore_index, softcap, with_grad)
        if with_grad:
            torch.mm(logits, weight, out=dx[r0:r1])
            if logits.dtype == torch.float32:
                dw.addmm_(logits.t(), xc)
            else:  # low precision: each chunk's product rounded once, summed in fp32
                dw += logits.t() @ xc
            if bias is not None:
                db += logits.sum(0, dtype=torch.float32)
    # no row counts: the mean is 0/0 = nan, as F.cross_entropy gives
    loss = losses.sum() / (targets != ignore_index).sum() if reduction == "mean" else losses.sum()
    return loss, dx, dw.to(weight.dtype), db.to(weight.dtype if bias is None else bias.dtype)


def lce_fake(x, weight, targets, bias, ignore_index, reduction, softcap, chunk, with_grad):
    g = with_grad
    return (x.new_empty((), dtype=torch.float32), x.new_empty((x.shape[0] if g else 0, x.shape[1])),
            weight.new_empty((weight.shape[0] if g else 0, weight.shape[1])),
            weight.new_empty((weight.shape[0] if g and bias is not None else 0,)))


def _lce_setup_context(ctx, inputs, output):
    x, weight, targets, bias, ctx.ignore_index, reduction, _, _, ctx.with_grad = inputs
    ctx.has_bias, ctx.mean = bias is not None, reduction == "mean"
    ctx.save_for_backward(targets, *output[1:])


def _lce_backward(ctx, g, *_):
    if not ctx.with_grad:
        raise RuntimeError("linear_cross_entropy: the forward ran with with_grad=False; call the public function")
    targets, dx, dw, db = ctx.saved_tensors
    if ctx.mean:  # no row counts: the gradient is 0 (the sum's is), as F.cross_entropy gives
        g = g / (targets != ctx.ignore_index).sum().clamp(min=1)
    return dx * g, dw * g, None, db * g if ctx.has_bias else None, None, None, None, None, None


def define_linear_cross_entropy(qualname, ce_pass):
    """The public op over a custom op `qualname` (fake and autograd registered) that runs the chunk loop above
    with `ce_pass` for each chunk's softmax, loss and gradient (the torch and Triton backends share it)."""
    @torch.library.custom_op(qualname, mutates_args=())
    def fwd(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: Optional[torch.Tensor],
            ignore_index: int, reduction: str, softcap: float, chunk: int,
            with_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return chunked_linear_cross_entropy(x, weight, targets, bias, ignore_index, reduction, softcap, chunk,
                                            with_grad, ce_pass)

    fwd.register_fake(lce_fake)
    fwd.register_autograd(_lce_backward, setup_context=_lce_setup_context)

    def linear_cross_entropy(x, weight, targets, bias=None, ignore_index=-1, reduction="mean", softcap=None):
        """Cross-entropy of the logits x W^T + b against targets, never holding more than one chunk of them;
        softcap applies softcap * tanh(logits / softcap) first. The loss is float32."""
        return fwd(*lce_args(x, weight, targets, bias, ignore_index, reduction, softcap))[0]

    linear_cross_entropy.op = fwd
    return linear_cross_entropy


linear_cross_entropy = define_linear_cross_entropy("nanogpt_torch::linear_cross_entropy", _ce_pass)


def unfused_linear_cross_entropy(x, weight, targets, bias=None, ignore_index=-1, reduction="mean", softcap=None):
    """What GPT.forward computes with linear_cross_entropy:none: all the logits, then F.cross_entropy."""
    logits = F.linear(x, weight, bias)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


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
    if backend == NONE:
        return None if REGISTRY[op].optional else f"{op} cannot be turned off"
    impl = REGISTRY[op].impls.get(backend)
    if impl is None:
        return f"{backend} has no {op} kernel"
    if impl.devices and device_type not in impl.devices:
        return f"{backend} has no {op} kernel on {device_type}"
    why = backend_unavailable(backend, device_type)
    if why is None and get(op, backend) is None:
        return f"{backend} was built without {op} (rebuild it: pip install --no-build-isolation -e .)"
    return why


def _load(target):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def get(op, backend):
    """The function (or, for the optimizer, the class) implementing `op` in `backend`; None for "none"."""
    return None if backend == NONE else _load(REGISTRY[op].impls[backend].target)


def unfused(op):
    """An optional op's unfused equivalent (what the model computes under "none")."""
    return _load(REGISTRY[op].unfused)


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
        if name != "auto" and name not in BACKENDS and not (name == NONE and REGISTRY[op].optional):
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
