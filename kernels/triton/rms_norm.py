"""Fused RMSNorm: Triton forward/backward kernels, launchers and the autograd custom op.

Forward: a block of rows per program, fp32 rstd = 1 / sqrt(mean(x^2) + eps) saved for backward.
Backward: each program owns a contiguous range of rows, writes dx for them and keeps fp32 partial sums of
dweight in registers; the partials (one row per program) are then summed in a fixed order, so the result is
deterministic (no atomics). The weight is optional (QK-norm has none in some recipes).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from nanogpt_kernels.registry import rms_norm_eps
from nanogpt_kernels.triton._utils import emu_bf16, interpreting, nan_like, next_pow2, rne_bf16, sms_for
from nanogpt_kernels.triton.layer_norm import _DTYPE_TRIPLES, MAX_N
from nanogpt_kernels.triton.layer_norm import _config as _ln_config


@triton.jit
def _rms_fwd_kernel(X, Y, W, Rstd, stride_x, stride_y, M, N, eps,
                    HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EMU_BF16: tl.constexpr = False):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    y = x * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if EMU_BF16:
        y = rne_bf16(y, EMU_BF16)
    tl.store(Y + r64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Rstd + rows, rstd, mask=rmask)


@triton.jit
def _rms_bwd_kernel(DY, X, W, Rstd, DX, DW, stride_dy, stride_x, stride_dx, M, N, rows_per_prog,
                    HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EMU_BF16: tl.constexpr = False):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r in range(row_start, row_end, BLOCK_M):
        rows = r + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + r64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + rows, mask=rmask, other=0.0)
        xhat = x * rstd[:, None]
        g = dy
        if HAS_W:
            g = dy * w[None, :]
        c = tl.sum(g * xhat, axis=1) / N
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        if EMU_BF16:
            dx = rne_bf16(dx, EMU_BF16)
        tl.store(DX + r64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_W:
            dw += tl.sum(dy * xhat, axis=0)
    if HAS_W:
        tl.store(DW + pid * N + cols, dw, mask=cmask)


def _config(N, interpret=False):
    """layer_norm's launch table (same row-in-registers layout, one fewer live row vector), except that the
    interpreter's backward takes at most 16 rows per tile: it sums a tile's rows one after another (numpy along
    axis 0), so tiles of 16 summed per tile, then across tiles, keep dweight's rounding near the GPU's tree sums
    (the tall tiles gave up to 4x PyTorch's error)."""
    if N > MAX_N:
        raise ValueError(f"rms_norm: last dimension {N} is larger than the supported {MAX_N}; "
                         "use kernels='rms_norm:torch'")
    rows_fwd, rows_bwd, block, warps = _ln_config(N, interpret)
    return rows_fwd, min(rows_bwd, 16), block, warps


def _rows(t, N):
    t2 = t.reshape(-1, N)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _fwd(x, weight, eps, out_dtype=None):
    N = x.shape[-1]
    if weight is not None and weight.shape != (N,):
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({N},)")
    x2 = _rows(x, N)
    M = x2.shape[0]
    y = nan_like((M, N), out_dtype or x.dtype, x.device)
    rstd = nan_like((M,), torch.float32, x.device)
    if M > 0:
        BLOCK_M, _, BLOCK_N, warps = _config(N, interpreting())
        _rms_fwd_kernel[(triton.cdiv(M, BLOCK_M),)](x2, y, weight.contiguous() if weight is not None else x2, rstd,
                                                    x2.stride(0), y.stride(0), M, N, eps, HAS_W=weight is not None,
                                                    BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, EMU_BF16=emu_bf16(y.dtype),
                                                    num_warps=warps)
    return y.view(x.shape), rstd


def _bwd(dy, x, weight, rstd):
    N = x.shape[-1]
    x2, dy2 = _rows(x, N), _rows(dy, N)
    M = x2.shape[0]
    dx = nan_like((M, N), x.dtype, x.device)
    _, BLOCK_M, BLOCK_N, warps = _config(N, interpreting())
    progs = max(1, min(M, 2 * sms_for(x) if x.is_cuda else 4))
    rows_per_prog = BLOCK_M * triton.cdiv(triton.cdiv(max(M, 1), progs), BLOCK_M)
    progs = triton.cdiv(max(M, 1), rows_per_prog)
    has_w = weight is not None
    dw_part = nan_like((progs, N), torch.float32, x.device) if has_w else dx
    if M > 0:
        _rms_bwd_kernel[(progs,)](dy2, x2, weight.contiguous() if has_w else x2, rstd, dx, dw_part,
                                  dy2.stride(0), x2.stride(0), dx.stride(0), M, N, rows_per_prog, HAS_W=has_w,
                                  BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, EMU_BF16=emu_bf16(x.dtype), num_warps=warps)
    elif has_w:
        dw_part.zero_()
    # second, fixed-order reduction of the per-program partials: deterministic
    dw = dw_part.sum(0).to(weight.dtype) if has_w else x.new_empty((0,))
    return dx.view(x.shape), dw


# ---------------------------------------------------------------- custom ops + autograd

@torch.library.custom_op("nanogpt_triton::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
                 out_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd(x, weight, eps, out_dtype)


@rms_norm_fwd.register_fake
def _(x, weight, eps, out_dtype=None):
    M = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=torch.contiguous_format),
            x.new_empty((M,), dtype=torch.float32))


@torch.library.custom_op("nanogpt_triton::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                 rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _bwd(dy, x, weight, rstd)


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd):
    dw = weight.new_empty((x.shape[-1],)) if weight is not None else x.new_empty((0,))
    return torch.empty_like(x, memory_format=torch.contiguous_format), dw


def _setup_context(ctx, inputs, output):
    x, weight, _, _ = inputs
    ctx.has_weight = weight is not None
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_bwd(dy, x, weight if ctx.has_weight else None, rstd)
    return dx, (dw if ctx.has_weight else None), None, None


rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x, weight=None, eps=None, out_dtype=None):
    """RMSNorm over the last dimension: x / sqrt(mean(x^2) + eps) * weight (eps None: float32's eps).

    Statistics in fp32 whatever the input dtype; the output has out_dtype (default x's), and its gradient may come
    in it. Differentiable in x and weight (deterministic dweight reduction).
    """
    return rms_norm_fwd(x, weight, rms_norm_eps(eps), out_dtype)[0]


def _compile_configs():
    """Every (kernel, signature, constexprs, num_warps) the launchers above can produce."""
    out = []
    for N in [2 ** i for i in range(4, 14)]:
        rows, rows_bwd, block, warps = _config(N)
        for sig, wsig, ysig in _DTYPE_TRIPLES:
            tag = sig[1:] + ("" if wsig == sig else f",w={wsig[1:]}") + ("" if ysig == sig else f",y={ysig[1:]}")
            for has_w in (True, False):
                if not has_w and wsig != sig:
                    continue
                flags = {"HAS_W": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "EMU_BF16": "constexpr"}
                ce = {"HAS_W": has_w, "BLOCK_N": block, "EMU_BF16": False}
                fsig = {"X": sig, "Y": ysig, "W": wsig, "Rstd": "*fp32", "stride_x": "i32", "stride_y": "i32",
                        "M": "i32", "N": "i32", "eps": "fp32", **flags}
                out.append(dict(name=f"rms_fwd[{tag},M={rows},N={block},w={int(has_w)}]", fn=_rms_fwd_kernel,
                                signature=fsig, num_warps=warps, num_stages=1, key=(block, sig),
                                constexprs=dict(ce, BLOCK_M=rows)))
                bsig = {"DY": ysig, "X": sig, "W": wsig, "Rstd": "*fp32", "DX": sig, "DW": "*fp32",
                        "stride_dy": "i32", "stride_x": "i32", "stride_dx": "i32", "M": "i32", "N": "i32",
                        "rows_per_prog": "i32", **flags}
                out.append(dict(name=f"rms_bwd[{tag},M={rows_bwd},N={block},w={int(has_w)}]", fn=_rms_bwd_kernel,
                                signature=bsig, num_warps=warps, num_stages=1, key=(block, sig),
                                constexprs=dict(ce, BLOCK_M=rows_bwd)))
    return out
