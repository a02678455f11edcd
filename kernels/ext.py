"""The "ext" backend: the C++/CUDA extension `nanogpt_kernels._C` (sources in csrc/).

The extension registers torch custom ops in the `nanogpt_ext` namespace
(torch.ops.nanogpt_ext.*) with CPU kernels (vectorized, multi-threaded C++) and, when built
with CUDA, CUDA kernels; the layer ops carry C++ autograd formulas. This module adds fake (meta) kernels so
they work under torch.compile(fullgraph=True), and exposes the backend contract (nanogpt_kernels.contract):
layer_norm, rms_norm, bias_gelu, bias_relu2, rope, attention, linear_cross_entropy, FusedAdamW, unavailable.

Build: `pip install --no-build-isolation -e .` with torch installed (see setup.py).
"""
import importlib
import math

import torch

from nanogpt_kernels.contract import FusedAdamWBase, sdpa_fallback
from nanogpt_kernels.registry import add_then, lce_args, lce_fake, rms_norm_eps, rope_check, split_attention

_C = None
_IMPORT_ERROR = None
# ops with a CPU kernel only, under registry ops that also run on CUDA: the CPU GELU's forward that saves its
# derivative and the backward that multiplies by it (csrc/bias_act.cpp), and LayerNorm fused with the residual add
# before it (csrc/layer_norm.cpp; on CUDA layer_norm adds first). .ci/check_cuda_ext.py expects no CUDA kernel.
CPU_ONLY_OPS = ("bias_gelu_fwd_saving", "bias_act_bwd_saved", "add_layer_norm", "add_layer_norm_fwd",
                "add_layer_norm_bwd")


def _load():
    global _C, _IMPORT_ERROR
    if _C is None and _IMPORT_ERROR is None:
        try:
            mod = importlib.import_module("nanogpt_kernels._C")
        except ImportError as e:  # not built (ModuleNotFoundError), or built against another torch
            _IMPORT_ERROR = e
        else:
            _C = mod
            _register()
    return _C


def unavailable(device_type):
    """None when the extension has kernels for device_type, else why not."""
    C = _load()
    if C is None:
        if isinstance(_IMPORT_ERROR, ModuleNotFoundError):
            return ("the C++ extension nanogpt_kernels._C is not built (pip install --no-build-isolation -e . "
                    "with a C++ compiler; see README)")
        return (f"the C++ extension nanogpt_kernels._C does not load ({_IMPORT_ERROR}); rebuild it against this torch "
                "with pip install --no-build-isolation -e .")
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        return None if C.has_cuda() else ("nanogpt_kernels._C was built without CUDA (rebuild with a CUDA torch and nvcc, "
                                          "or NANOGPT_BUILD_CUDA=1 to make that an error)")
    return f"nanogpt_kernels._C has no kernels for device type {device_type!r}"


# ------------------------------------------------------------ op registration (fake + autograd)

def _register():
    ops = torch.ops.nanogpt_ext

    def norm_out(x, out_dtype):  # a norm's output: x's shape, out_dtype (default x's)
        return torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=torch.contiguous_format)

    @torch.library.register_fake("nanogpt_ext::layer_norm_fwd")
    def _(x, weight, bias, eps, out_dtype=None):
        m = x.numel() // x.shape[-1]
        return norm_out(x, out_dtype), x.new_empty((m,), dtype=torch.float32), x.new_empty((m,), dtype=torch.float32)

    @torch.library.register_fake("nanogpt_ext::layer_norm_bwd")
    def _(dy, x, weight, mean, rstd, has_bias):
        n = x.shape[-1]
        return (torch.empty_like(x, memory_format=torch.contiguous_format), weight.new_empty((n,)),
                weight.new_empty((n if has_bias else 0,)))

    @torch.library.register_fake("nanogpt_ext::bias_gelu_fwd")
    def _(x, bias, tanh):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("nanogpt_ext::bias_gelu_bwd")
    def _(dy, x, bias, tanh):
        db = bias.new_empty((x.shape[-1],)) if bias is not None else x.new_empty((0,))
        return torch.empty_like(x, memory_format=torch.contiguous_format), db

    def fake(name):  # registers a fake kernel for an op this build has (one from before it lacks the op)
        return (lambda fn: torch.library.register_fake(f"nanogpt_ext::{name}", fn)) if hasattr(ops, name) else (
            lambda fn: fn)

    def bthd(q):  # (B, H, T, D) view of a (B, T, H, D) buffer, as the CPU kernel allocates
        return q.new_empty((q.shape[0], q.shape[2], q.shape[1], q.shape[3])).transpose(1, 2)

    @torch.library.register_fake("nanogpt_ext::attention_fwd")
    def _(q, k, v, causal, scale, dropout_p, seed):
        return bthd(q), q.new_empty(q.shape[:3], dtype=torch.float32)

    @torch.library.register_fake("nanogpt_ext::attention_bwd")
    def _(dout, q, k, v, out, lse, causal, scale, dropout_p, seed):
        return bthd(q), bthd(q), bthd(q)

    @torch.library.register_fake("nanogpt_ext::attention")
    def _(q, k, v, causal, scale, dropout_p, seed):
        return bthd(q)

    @fake("attention_qkv")
    def _(qkv, n_head, causal, scale, dropout_p, seed):
        return qkv.new_empty((*qkv.shape[:2], qkv.shape[2] // 3))

    @fake("attention_qkv_bwd")
    def _(dout, qkv, out, lse, n_head, causal, scale, dropout_p, seed):
        return qkv.new_empty(qkv.shape)

    @torch.library.register_fake("nanogpt_ext::grad_norm")
    def _(grads):
        return grads[0].new_empty((), dtype=torch.float32)

    # the user-facing ops; their autograd formulas are C++ (csrc/ext.cpp)
    @torch.library.register_fake("nanogpt_ext::layer_norm")
    def _(x, weight, bias, eps, out_dtype=None):
        return norm_out(x, out_dtype)

    @torch.library.register_fake("nanogpt_ext::bias_gelu")
    def _(x, bias, tanh):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    fake("linear_cross_entropy_fwd")(lce_fake)

    @fake("linear_cross_entropy")
    def _(x, weight, targets, bias, ignore_index, reduction, softcap, chunk):
        return x.new_empty((), dtype=torch.float32)

    def like_x(x, *_):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @fake("rms_norm_fwd")
    def _(x, weight, eps, out_dtype=None):
        return norm_out(x, out_dtype), x.new_empty((x.numel() // x.shape[-1],), dtype=torch.float32)

    @fake("rms_norm")
    def _(x, weight, eps, out_dtype=None):
        return norm_out(x, out_dtype)

    @fake("rms_norm_bwd")
    def _(dy, x, weight, rstd):
        return like_x(x), (weight.new_empty((x.shape[-1],)) if weight is not None else x.new_empty((0,)))

    def bias_grads(dy, x, bias):
        return like_x(x), (bias.new_empty((x.shape[-1],)) if bias is not None else x.new_empty((0,)))

    for name in ("bias_relu2", "bias_relu2_fwd"):
        fake(name)(like_x)
    fake("bias_relu2_bwd")(bias_grads)

    @fake("add_layer_norm")
    def _(x, add, weight, bias, eps, out_dtype=None):
        return like_x(x), norm_out(x, out_dtype)

    @fake("add_layer_norm_fwd")
    def _(x, add, weight, bias, eps, out_dtype=None):
        m = x.numel() // x.shape[-1]
        return (like_x(x), norm_out(x, out_dtype), x.new_empty((m,), dtype=torch.float32),
                x.new_empty((m,), dtype=torch.float32))

    @fake("add_layer_norm_bwd")
    def _(dy, ds, s, weight, mean, rstd, has_bias, add_dtype):
        n = s.shape[-1]
        return (like_x(s), torch.empty_like(s, dtype=add_dtype, memory_format=torch.contiguous_format),
                weight.new_empty((n,)), weight.new_empty((n if has_bias else 0,)))

    @fake("bias_gelu_fwd_saving")  # y and the fp32 derivative the CPU backward multiplies by
    def _(x, bias, tanh):
        return like_x(x), torch.empty_like(x, dtype=torch.float32, memory_format=torch.contiguous_format)

    fake("bias_act_bwd_saved")(lambda dy, d, bias: bias_grads(dy, dy, bias))

    def rope_fake(q, k, cos, sin, *_):
        return like_x(q), torch.empty_like(k, dtype=q.dtype, memory_format=torch.contiguous_format)

    for name in ("rope", "rope_fwd"):
        fake(name)(rope_fake)


# ------------------------------------------------------------ the backend contract

def layer_norm(x, weight, bias=None, eps=1e-5, out_dtype=None, add=None):
    """LayerNorm over the last dim: fused kernel, fp32 statistics (x fp32/bf16, + fp16 on CUDA); the output in
    out_dtype (the CPU kernels write bf16 from an fp32 x directly; other pairs are cast). add: (x + add, LayerNorm
    of it), in one CPU kernel when add has x's shape and dtype or is bf16 with an fp32 x; else PyTorch adds first."""
    if weight is None:
        weight = x.new_ones(x.shape[-1])
    if weight.dtype not in (x.dtype, torch.float32):
        weight = weight.to(x.dtype)
    if bias is not None and bias.dtype != weight.dtype:
        bias = bias.to(weight.dtype)
    if add is None:
        return torch.ops.nanogpt_ext.layer_norm(x, weight, bias, float(eps), out_dtype)
    bf16_branch = add.dtype == torch.bfloat16 and x.dtype == torch.float32  # an autocast branch into the fp32 stream
    fused = x.device.type == "cpu" and add.device == x.device and add.shape == x.shape
    if fused and (add.dtype == x.dtype or bf16_branch):
        return torch.ops.nanogpt_ext.add_layer_norm(x, add, weight, bias, float(eps), out_dtype)
    return add_then(layer_norm, x, add, weight, bias, eps, out_dtype)


def rms_norm(x, weight=None, eps=None, out_dtype=None):
    """RMSNorm over the last dim: fused kernel, fp32 statistics (x fp32/bf16, + fp16 on CUDA); eps None is
    float32's eps (F.rms_norm's default for the fp32 math); the output in out_dtype, as layer_norm's."""
    if weight is not None and weight.dtype not in (x.dtype, torch.float32):
        weight = weight.to(x.dtype)
    return torch.ops.nanogpt_ext.rms_norm(x, weight, rms_norm_eps(eps), out_dtype)


def bias_relu2(x, bias=None):
    """relu(x + bias)^2 in one pass."""
    if bias is not None and bias.dtype not in (x.dtype, torch.float32):
        bias = bias.to(x.dtype)
    return torch.ops.nanogpt_ext.bias_relu2(x, bias)


def rope(q, k, cos, sin):
    """Rotary embeddings on q and k (B, H, T, D) in one pass (float32/bfloat16, + float16 on CUDA; q and k of one
    dtype; any strides with a contiguous last dim); cos, sin (T, D/2) float32. Returns contiguous (q_rot, k_rot)."""
    rope_check(q, k, cos, sin)
    return torch.ops.nanogpt_ext.rope(q, k, cos.float(), sin.float())


def bias_gelu(x, bias=None, approximate="none"):
    """gelu(x + bias) in one pass, exact erf ("none") or "tanh" form. On CPU, when a gradient is wanted, the forward
    also keeps gelu'(x + bias) in fp32 and the backward only multiplies by it (csrc/README.md, "GELU on CPU")."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    if bias is not None and bias.dtype not in (x.dtype, torch.float32):
        bias = bias.to(x.dtype)
    return torch.ops.nanogpt_ext.bias_gelu(x, bias, approximate == "tanh")


def linear_cross_entropy(x, weight, targets, bias=None, ignore_index=-1, reduction="mean", softcap=None):
    """Cross-entropy of x W^T + b against targets, one chunk of logits at a time (csrc/linear_cross_entropy.cpp);
    CPU, x, weight and bias in one dtype, float32 or bfloat16. The loss is float32."""
    *args, _with_grad = lce_args(x, weight, targets, bias, ignore_index, reduction, softcap)  # decided in C++
    return torch.ops.nanogpt_ext.linear_cross_entropy(*args)


def _dropout_seed(dropout_p, device):
    """The seed of a call's dropout mask, drawn from torch's generator as kernels.attention draws it; None without."""
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    return torch.randint(2**31 - 1, (), device=device) if dropout_p > 0.0 else None


def attention(q, k, v, causal=True, scale=None, dropout_p=0.0):
    """Attention on (B, H, T, D). CPU, float32/bfloat16: our kernel (csrc/attention.cpp; any T and
    D, exact softmax per query row, causal rows stop at the diagonal, output stored (B, T, H, D) so the
    transpose back is free). dropout_p in [0, 1) is applied in the kernel with the Triton kernels' mask
    (same Philox stream: a seed drawn from torch's generator gives the same mask on both backends).
    Other CPU dtypes fall back to SDPA with a one-time warning. There is no CUDA kernel: the registry
    sends CUDA attention to another backend."""
    if q.dtype not in (torch.float32, torch.bfloat16):
        return sdpa_fallback(q, k, v, causal, scale, dropout_p,
                             f"nanogpt_kernels.ext.attention: the CPU kernel takes float32/bfloat16, not {q.dtype}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.ops.nanogpt_ext.attention(q, k, v, bool(causal), float(scale), float(dropout_p),
                                           _dropout_seed(dropout_p, q.device))


def attention_packed(qkv, n_head, dropout_p=0.0):
    """Causal attention over c_attn's packed (B, T, 3C) output, returned (B, T, C) (registry.attention_qkv): on CPU
    in float32/bfloat16 one op whose q, k, v are views of qkv's thirds and whose backward returns the packed
    gradient (csrc/attention.cpp, the same kernels and values as attention on the split heads); else split first."""
    if qkv.device.type != "cpu" or qkv.dtype not in (torch.float32, torch.bfloat16) or \
            not hasattr(torch.ops.nanogpt_ext, "attention_qkv"):
        return split_attention(attention, qkv, n_head, dropout_p)
    scale = 1.0 / math.sqrt(max(qkv.shape[-1] // (3 * n_head), 1))  # a shape that does not split: the op says so
    return torch.ops.nanogpt_ext.attention_qkv(qkv, int(n_head), True, scale, float(dropout_p),
                                               _dropout_seed(dropout_p, qkv.device))


attention.packed = attention_packed


class FusedAdamW(FusedAdamWBase):
    """AdamW as one multi-tensor kernel per param group, with the gradient clip fused in.

    step(): one fused reduction gives the total gradient norm over every param with a grad
    (returned, pre-clip, as a 0-d float32 tensor on the grads' device); each group is then
    updated by one call of nanogpt_ext::adamw_ over lists of params/grads/state, which scales
    the grads by min(1, max_grad_norm / (norm + 1e-6)) when max_grad_norm > 0, applies
    decoupled weight decay and bias-corrected Adam, and does nothing at all when the norm is
    not finite (on CUDA that is decided on the device: no host sync). p.grad is not modified.
    State per param (self.state[p]): exp_avg, exp_avg_sq (float32, whatever the param dtype)
    and step (0-d float32 tensor on the param's device), as torch.optim.AdamW keeps it.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, max_grad_norm=0.0):
        super().__init__(params, lr, betas, eps, weight_decay, max_grad_norm)
        if _load() is None:
            raise RuntimeError(unavailable("cpu"))

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return torch.zeros((), dtype=torch.float32)
        if any(g.is_sparse for g in grads):
            raise RuntimeError("FusedAdamW does not support sparse gradients")
        norm = torch.ops.nanogpt_ext.grad_norm(grads)
        if norm.device.type == "cpu" and not math.isfinite(norm.item()):
            return norm  # skipped step (the CUDA kernel checks the norm on the device instead)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._init_state(p) for p in params]
            beta1, beta2 = group["betas"]
            lr = torch.full((), float(group["lr"]), dtype=torch.float64, device=params[0].device)
            torch.ops.nanogpt_ext.adamw_(
                params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states], lr, norm, float(beta1), float(beta2), float(group["eps"]),
                float(group["weight_decay"]), self.max_grad_norm)
        return norm


if _load() is not None:
    for _op in ("linear_cross_entropy", "rms_norm", "bias_relu2", "rope"):
        if not hasattr(torch.ops.nanogpt_ext, _op):
            globals()[_op] = None  # a build from before the op: registry.unavailable asks for a rebuild
