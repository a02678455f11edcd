"""Fused bias + GELU: y = gelu(x + bias), exact (erf) or tanh form, in one pass.

Forward and backward tile the (rows, N) matrix in BLOCK_M x BLOCK_N tiles. The backward
recomputes h = x + bias, writes dx = dy * gelu'(h) and keeps fp32 column sums of dx for
dbias in registers per program; the per-program partials are then summed in a fixed
order (deterministic, no atomics).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from nanogpt_kernels.triton._utils import emu_bf16, interpreting, nan_like, next_pow2, rne_bf16, sms_for

# constexpr: the only globals a @triton.jit function may read; kept right of a tensor (the interpreter needs that)
_SQRT1_2 = tl.constexpr(0.7071067811865476)
_SQRT2_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)


@triton.jit
def _tanh_parts(u):
    # (1 + tanh u, 1 - tanh^2 u) from e = exp(-2|u|), with no cancellation and no overflow for any u (the
    # CPU kernels' tanh_parts): 1 - t^2 as 1 - t*t loses the digits gelu's gradient multiplies by up to ~|h|^3
    e = tl.exp(-2.0 * tl.abs(u))
    inv = 1.0 / (1.0 + e)
    one_plus_t = tl.where(u >= 0, 2.0 * inv, 2.0 * e * inv)
    return one_plus_t, 4.0 * e * inv * inv


@triton.jit
def _gelu_fwd(h, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        opt, _ = _tanh_parts((h + 0.044715 * h * h * h) * _SQRT2_PI)
        y = 0.5 * h * opt
    else:
        y = 0.5 * h * (1.0 + tl.erf(h * _SQRT1_2))
    return y


@triton.jit
def _gelu_grad(h, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        opt, omt2 = _tanh_parts((h + 0.044715 * h * h * h) * _SQRT2_PI)
        g = 0.5 * opt + 0.5 * h * omt2 * _SQRT2_PI * (1.0 + 0.134145 * h * h)
    else:
        g = 0.5 * (1.0 + tl.erf(h * _SQRT1_2)) + h * tl.exp(-0.5 * h * h) * _INV_SQRT_2PI
    return g


@triton.jit
def _bias_gelu_fwd_kernel(X, B, Y, M, N, HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EMU_BF16: tl.constexpr = False):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = (rows[:, None] < M) & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    y = _gelu_fwd(h, APPROX_TANH)
    if EMU_BF16:
        y = rne_bf16(y, EMU_BF16)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(DY, X, B, DX, DB, M, N, rows_per_prog,
                          HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EMU_BF16: tl.constexpr = False):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_BIAS:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid_m * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r in range(row_start, row_end, BLOCK_M):
        rows = r + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < row_end) & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            h += b[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        dx = dy * _gelu_grad(h, APPROX_TANH)
        dx_out = dx
        if EMU_BF16:
            dx_out = rne_bf16(dx, EMU_BF16)
        tl.store(DX + offs, dx_out.to(DX.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            db += tl.sum(tl.where(mask, dx, 0.0), axis=0)
    if HAS_BIAS:
        tl.store(DB + pid_m * N + cols, db, mask=cmask)



BLOCK_M_FWD = 16
BLOCK_M_BWD = 8  # the backward keeps more live values per element: 8 rows keep it spill-free
BLOCK_M_INTERP = 64  # the CPU interpreter pays per operation, not per element: taller tiles


def _block_n(N):
    return min(256, max(16, next_pow2(N)))


def _check(approximate):
    if approximate not in ("none", "tanh"):
        raise ValueError(f"bias_gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


def launch_fwd(kernel, x, bias, op, **flags):
    """y = kernel(x + bias) over (rows, N) tiles; `flags` are the kernel's own constexprs (bias_relu2 shares this)."""
    N = x.shape[-1]
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}, expected ({N},)")
    x2 = x.reshape(-1, N).contiguous()
    M = x2.shape[0]
    y = nan_like((M, N), x.dtype, x.device)
    if M > 0 and N > 0:
        BN = _block_n(N)
        BM = BLOCK_M_INTERP if interpreting() else BLOCK_M_FWD
        grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
        kernel[grid](x2, bias.contiguous() if bias is not None else x2, y, M, N, HAS_BIAS=bias is not None,
                     BLOCK_M=BM, BLOCK_N=BN, EMU_BF16=emu_bf16(x.dtype), num_warps=4, **flags)
    return y.view(x.shape)


def launch_bwd(kernel, dy, x, bias, **flags):
    """(dx, dbias) from `kernel`, which writes dx and per-program fp32 column partials of it (summed here in a
    fixed order); dbias is zeros without a bias."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N).contiguous()
    dy2 = dy.reshape(-1, N).contiguous()
    M = x2.shape[0]
    dx = nan_like((M, N), x.dtype, x.device)
    has_bias = bias is not None
    BN = _block_n(N)
    n_col = triton.cdiv(N, BN)
    # enough row groups to fill the GPU (about 4 programs per SM), each a multiple of BLOCK_M rows
    target = max(1, (4 * sms_for(x)) // n_col) if x.is_cuda else 4
    BM = BLOCK_M_INTERP if interpreting() else BLOCK_M_BWD
    rows_per_prog = BM * triton.cdiv(triton.cdiv(max(M, 1), BM), target)
    n_row = triton.cdiv(max(M, 1), rows_per_prog)
    db_part = nan_like((n_row, N), torch.float32, x.device) if has_bias else dx
    if M > 0 and N > 0:
        kernel[(n_row, n_col)](dy2, x2, bias.contiguous() if has_bias else x2, dx, db_part, M, N, rows_per_prog,
                               HAS_BIAS=has_bias, BLOCK_M=BM, BLOCK_N=BN, EMU_BF16=emu_bf16(x.dtype), num_warps=4,
                               **flags)
    elif has_bias:
        db_part.zero_()
    db = db_part.sum(0).to(bias.dtype) if has_bias else x.new_zeros((N,))
    return dx.view(x.shape), db


def _fwd(x, bias, approximate):
    _check(approximate)
    return launch_fwd(_bias_gelu_fwd_kernel, x, bias, "bias_gelu", APPROX_TANH=approximate == "tanh")


def _bwd(dy, x, bias, approximate):
    return launch_bwd(_bias_gelu_bwd_kernel, dy, x, bias, APPROX_TANH=approximate == "tanh")


@torch.library.custom_op("nanogpt_triton::bias_gelu_fwd", mutates_args=())
def bias_gelu_fwd(x: torch.Tensor, bias: Optional[torch.Tensor], approximate: str) -> torch.Tensor:
    return _fwd(x, bias, approximate)


@bias_gelu_fwd.register_fake
def _(x, bias, approximate):
    _check(approximate)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("nanogpt_triton::bias_gelu_bwd", mutates_args=())
def bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor],
                  approximate: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _bwd(dy, x, bias, approximate)


@bias_gelu_bwd.register_fake
def _(dy, x, bias, approximate):
    N = x.shape[-1]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((N,), dtype=bias.dtype if bias is not None else x.dtype))


def _setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.approximate = approximate
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, bias)


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, db = bias_gelu_bwd(dy, x, bias if ctx.has_bias else None, ctx.approximate)
    return dx, (db if ctx.has_bias else None), None


bias_gelu_fwd.register_autograd(_backward, setup_context=_setup_context)


def bias_gelu(x, bias=None, approximate="none"):
    """gelu(x + bias) over the last dimension in one pass; approximate is "none" (erf) or "tanh".

    Computes in fp32, returns x's dtype; differentiable in x and bias (deterministic dbias).
    """
    return bias_gelu_fwd(x, bias, approximate)


def _compile_configs():
    out = []
    # (x / y dtype, bias dtype): same dtype, or an fp32 bias with low-precision activations (autocast)
    pairs = [("*fp32", "*fp32"), ("*fp16", "*fp16"), ("*bf16", "*bf16"), ("*fp16", "*fp32"), ("*bf16", "*fp32")]
    for BN in (16, 32, 64, 128, 256):
        for sig, bsig in pairs:
            for has_bias in (True, False):
                if not has_bias and bsig != sig:
                    continue
                for tanh in (False, True):
                    dt = sig[1:] if bsig == sig else f"{sig[1:]},b={bsig[1:]}"
                    tag = f"{dt},BN={BN},bias={int(has_bias)},{'tanh' if tanh else 'erf'}"
                    ce = {"HAS_BIAS": has_bias, "APPROX_TANH": tanh, "BLOCK_N": BN, "EMU_BF16": False}
                    flags = {"HAS_BIAS": "constexpr", "APPROX_TANH": "constexpr", "BLOCK_M": "constexpr",
                             "BLOCK_N": "constexpr", "EMU_BF16": "constexpr"}
                    out.append(dict(name=f"bias_gelu_fwd[{tag}]", fn=_bias_gelu_fwd_kernel, num_warps=4, num_stages=1,
                                    signature={"X": sig, "B": bsig, "Y": sig, "M": "i32", "N": "i32", **flags},
                                    constexprs=dict(ce, BLOCK_M=BLOCK_M_FWD), key=(BN, sig)))
                    out.append(dict(name=f"bias_gelu_bwd[{tag}]", fn=_bias_gelu_bwd_kernel, num_warps=4, num_stages=1,
                                    signature={"DY": sig, "X": sig, "B": bsig, "DX": sig, "DB": "*fp32",
                                               "M": "i32", "N": "i32", "rows_per_prog": "i32", **flags},
                                    constexprs=dict(ce, BLOCK_M=BLOCK_M_BWD), key=(BN, sig)))
    return out
