"""Fused LayerNorm: Triton forward/backward kernels, launchers and the autograd custom op.

Forward: one program per row, fp32 mean / rstd saved for backward.
Backward: each program owns a contiguous range of rows, writes dx for them and keeps fp32
partial sums of dweight / dbias in registers; the partials (one row per program) are then
summed in a fixed order, so the result is deterministic (no atomics, no spin-locks).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from nanogpt_kernels.registry import add_then
from nanogpt_kernels.triton._utils import emu_bf16, interpreting, nan_like, next_pow2, rne_bf16, sms_for

MAX_N = 8192  # a row lives in registers: larger rows would spill in the backward


@triton.jit
def _ln_fwd_kernel(X, Y, W, B, Mean, Rstd, stride_x, stride_y, M, N, eps,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   EMU_BF16: tl.constexpr = False):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if EMU_BF16:
        y = rne_bf16(y, EMU_BF16)
    tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=rmask)
    tl.store(Rstd + rows, rstd, mask=rmask)


@triton.jit
def _ln_bwd_kernel(DY, X, W, Mean, Rstd, DX, DW, DB, stride_dy, stride_x, stride_dx, M, N, rows_per_prog,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   EMU_BF16: tl.constexpr = False):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r in range(row_start, row_end, BLOCK_M):
        rows = r + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=rmask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if EMU_BF16:
            dx = rne_bf16(dx, EMU_BF16)
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        if HAS_BIAS:
            db += tl.sum(dy, axis=0)
    tl.store(DW + pid * N + cols, dw, mask=cmask)
    if HAS_BIAS:
        tl.store(DB + pid * N + cols, db, mask=cmask)




def _config(N, interpret=False):
    """(fwd rows per block, bwd rows per block, BLOCK_N, num_warps) for rows of N elements.

    The same table feeds compile_check. On GPUs a forward program handles ~4096 elements
    (several rows when N is small); the backward keeps more live tensors per row, so it takes
    fewer rows per iteration (no register spills on sm_80 / sm_90). The CPU interpreter pays per
    operation, not per element, so it gets much taller blocks.
    """
    if N > MAX_N:
        raise ValueError(f"layer_norm: last dimension {N} is larger than the supported {MAX_N}; "
                         "use kernels='layer_norm:torch'")
    block = max(16, next_pow2(N))
    rows_fwd = max(1, min(16, 4096 // block))
    rows_bwd = max(1, min(8, 1024 // block))
    if interpret:
        rows_fwd = rows_bwd = max(1, min(256, 65536 // block))
    warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    return rows_fwd, rows_bwd, block, warps


def _fwd(x, weight, bias, eps, out_dtype=None):
    N = x.shape[-1]
    if weight.shape != (N,):
        raise ValueError(f"layer_norm: weight has shape {tuple(weight.shape)}, expected ({N},)")
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = nan_like((M, N), out_dtype or x.dtype, x.device)
    mean = nan_like((M,), torch.float32, x.device)
    rstd = nan_like((M,), torch.float32, x.device)
    if M > 0:
        BLOCK_M, _, BLOCK_N, warps = _config(N, interpreting())
        _ln_fwd_kernel[(triton.cdiv(M, BLOCK_M),)](x2, y, weight.contiguous(),
                                                   bias.contiguous() if bias is not None else weight,
                                                   mean, rstd, x2.stride(0), y.stride(0), M, N, eps,
                                                   HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                                   EMU_BF16=emu_bf16(y.dtype), num_warps=warps)
    return y.view(x.shape), mean, rstd


def _bwd(dy, x, weight, mean, rstd, has_bias):
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    dy2 = dy.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    M = x2.shape[0]
    dx = nan_like((M, N), x.dtype, x.device)
    _, BLOCK_M, BLOCK_N, warps = _config(N, interpreting())
    progs = max(1, min(M, 2 * sms_for(x) if x.is_cuda else 4))
    rows_per_prog = BLOCK_M * triton.cdiv(triton.cdiv(max(M, 1), progs), BLOCK_M)
    progs = triton.cdiv(max(M, 1), rows_per_prog)
    dw_part = nan_like((progs, N), torch.float32, x.device)
    db_part = nan_like((progs, N), torch.float32, x.device) if has_bias else dw_part
    if M > 0:
        _ln_bwd_kernel[(progs,)](dy2, x2, weight.contiguous(), mean, rstd, dx, dw_part, db_part,
                                 dy2.stride(0), x2.stride(0), dx.stride(0), M, N, rows_per_prog,
                                 HAS_BIAS=has_bias, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                 EMU_BF16=emu_bf16(x.dtype), num_warps=warps)
    else:
        dw_part.zero_()
        db_part.zero_()
    # second, fixed-order reduction of the per-program partials: deterministic
    dw = dw_part.sum(0).to(weight.dtype)
    db = db_part.sum(0).to(weight.dtype) if has_bias else torch.zeros_like(weight)
    return dx.view(x.shape), dw, db


# ---------------------------------------------------------------- custom ops + autograd

@torch.library.custom_op("nanogpt_triton::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
                   out_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd(x, weight, bias, eps, out_dtype)


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps, out_dtype=None):
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=torch.contiguous_format),
            x.new_empty((M,), dtype=torch.float32), x.new_empty((M,), dtype=torch.float32))


@torch.library.custom_op("nanogpt_triton::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(dy, x, weight, mean, rstd, has_bias)


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, has_bias):
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    return dx, torch.empty_like(weight), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, _ = inputs
    _, mean, rstd = output
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = layer_norm_bwd(dy, x, weight, mean, rstd, ctx.has_bias)
    return dx, dw, (db if ctx.has_bias else None), None, None


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def layer_norm(x, weight, bias=None, eps=1e-5, out_dtype=None, add=None):
    """LayerNorm over the last dimension: (x - mean) / sqrt(var + eps) * weight + bias.

    Statistics are computed in fp32 whatever the input dtype; the output has out_dtype (default x's), and its
    gradient may come in it. Differentiable in x, weight and bias (deterministic dweight / dbias reduction).
    add: (x + add, LayerNorm(x + add)), the add done by PyTorch (registry.layer_norm).
    """
    if add is not None:
        return add_then(layer_norm, x, add, weight, bias, eps, out_dtype)
    return layer_norm_fwd(x, weight, bias, float(eps), out_dtype)[0]


# (x / y / dx dtype, weight / bias dtype): same dtype, or fp32 parameters with low-precision
# activations (autocast)
_DTYPE_PAIRS = [("*fp32", "*fp32"), ("*fp16", "*fp16"), ("*bf16", "*bf16"), ("*fp16", "*fp32"), ("*bf16", "*fp32")]
# the norms' (x, weight, y): y in x's dtype, or a low-precision y from fp32 x and weight (autocast's out_dtype)
_DTYPE_TRIPLES = [(x, w, x) for x, w in _DTYPE_PAIRS] + [("*fp32", "*fp32", "*bf16"), ("*fp32", "*fp32", "*fp16")]


def _compile_configs():
    """Every (kernel, signature, constexprs, num_warps) the launchers above can produce."""
    out = []
    for N in [2 ** i for i in range(4, 14)]:
        rows, rows_bwd, block, warps = _config(N)
        for sig, wsig, ysig in _DTYPE_TRIPLES:
            tag = sig[1:] + ("" if wsig == sig else f",w={wsig[1:]}") + ("" if ysig == sig else f",y={ysig[1:]}")
            for has_bias in (True, False):
                fsig = {"X": sig, "Y": ysig, "W": wsig, "B": wsig, "Mean": "*fp32", "Rstd": "*fp32",
                        "stride_x": "i32", "stride_y": "i32", "M": "i32", "N": "i32", "eps": "fp32",
                        "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                        "EMU_BF16": "constexpr"}
                out.append(dict(name=f"ln_fwd[{tag},M={rows},N={block},bias={int(has_bias)}]", fn=_ln_fwd_kernel,
                                signature=fsig, num_warps=warps, num_stages=1, key=(block, sig),
                                constexprs={"HAS_BIAS": has_bias, "BLOCK_M": rows, "BLOCK_N": block,
                                            "EMU_BF16": False}))
                # the backward's entry has the forward's shape with its own arguments and row block
                bsig = {"DY": ysig, "X": sig, "W": wsig, "Mean": "*fp32", "Rstd": "*fp32", "DX": sig,
                        "DW": "*fp32", "DB": "*fp32", "stride_dy": "i32", "stride_x": "i32", "stride_dx": "i32",
                        "M": "i32", "N": "i32", "rows_per_prog": "i32",
                        "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
                        "EMU_BF16": "constexpr"}
                out.append(dict(name=f"ln_bwd[{tag},M={rows_bwd},N={block},bias={int(has_bias)}]", fn=_ln_bwd_kernel,
                                signature=bsig, num_warps=warps, num_stages=1, key=(block, sig),
                                constexprs={"HAS_BIAS": has_bias, "BLOCK_M": rows_bwd, "BLOCK_N": block,
                                            "EMU_BF16": False}))
    return out
