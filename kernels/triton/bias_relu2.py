"""Fused bias + ReLU^2: y = relu(x + bias)^2 in one pass (the modern GPT's MLP activation).

The tiling and launchers are bias_gelu's (launch_fwd / launch_bwd): BLOCK_M x BLOCK_N tiles; the backward
recomputes h = x + bias, writes dx = dy * 2 relu(h) and keeps fp32 column sums of dx for dbias per program,
summed afterwards in a fixed order (deterministic, no atomics).
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from nanogpt_kernels.triton._utils import rne_bf16
from nanogpt_kernels.triton.bias_gelu import BLOCK_M_BWD, BLOCK_M_FWD, launch_bwd, launch_fwd


@triton.jit
def _bias_relu2_fwd_kernel(X, B, Y, M, N, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           EMU_BF16: tl.constexpr = False):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = (rows[:, None] < M) & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    r = tl.maximum(h, 0.0)
    y = r * r
    if EMU_BF16:
        y = rne_bf16(y, EMU_BF16)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_relu2_bwd_kernel(DY, X, B, DX, DB, M, N, rows_per_prog, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, EMU_BF16: tl.constexpr = False):
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_BIAS:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = tl.program_id(0) * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r in range(row_start, row_end, BLOCK_M):
        rows = r + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < row_end) & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            h += b[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        dx = 2.0 * tl.maximum(h, 0.0) * dy
        dx_out = dx
        if EMU_BF16:
            dx_out = rne_bf16(dx, EMU_BF16)
        tl.store(DX + offs, dx_out.to(DX.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            db += tl.sum(tl.where(mask, dx, 0.0), axis=0)
    if HAS_BIAS:
        tl.store(DB + tl.program_id(0) * N + cols, db, mask=cmask)


@torch.library.custom_op("nanogpt_triton::bias_relu2_fwd", mutates_args=())
def bias_relu2_fwd(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return launch_fwd(_bias_relu2_fwd_kernel, x, bias, "bias_relu2")


@bias_relu2_fwd.register_fake
def _(x, bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("nanogpt_triton::bias_relu2_bwd", mutates_args=())
def bias_relu2_bwd(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_bwd(_bias_relu2_bwd_kernel, dy, x, bias)


@bias_relu2_bwd.register_fake
def _(dy, x, bias):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((x.shape[-1],), dtype=bias.dtype if bias is not None else x.dtype))


def _setup_context(ctx, inputs, output):
    x, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, bias)


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, db = bias_relu2_bwd(dy, x, bias if ctx.has_bias else None)
    return dx, (db if ctx.has_bias else None)


bias_relu2_fwd.register_autograd(_backward, setup_context=_setup_context)


def bias_relu2(x, bias=None):
    """relu(x + bias)^2 over the last dimension in one pass; fp32 math, x's dtype out; differentiable in x and
    bias (deterministic dbias)."""
    return bias_relu2_fwd(x, bias)


def _compile_configs():
    out = []
    # (x / y dtype, bias dtype): same dtype, or an fp32 bias with low-precision activations (autocast)
    pairs = [("*fp32", "*fp32"), ("*fp16", "*fp16"), ("*bf16", "*bf16"), ("*fp16", "*fp32"), ("*bf16", "*fp32")]
    flags = {"HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "EMU_BF16": "constexpr"}
    for BN in (16, 32, 64, 128, 256):
        for sig, bsig in pairs:
            for has_bias in (True, False):
                if not has_bias and bsig != sig:
                    continue
                tag = f"{sig[1:] if bsig == sig else f'{sig[1:]},b={bsig[1:]}'},BN={BN},bias={int(has_bias)}"
                ce = {"HAS_BIAS": has_bias, "BLOCK_N": BN, "EMU_BF16": False}
                out.append(dict(name=f"bias_relu2_fwd[{tag}]", fn=_bias_relu2_fwd_kernel, num_warps=4, num_stages=1,
                                signature={"X": sig, "B": bsig, "Y": sig, "M": "i32", "N": "i32", **flags},
                                constexprs=dict(ce, BLOCK_M=BLOCK_M_FWD), key=(BN, sig)))
                out.append(dict(name=f"bias_relu2_bwd[{tag}]", fn=_bias_relu2_bwd_kernel, num_warps=4, num_stages=1,
                                signature={"DY": sig, "X": sig, "B": bsig, "DX": sig, "DB": "*fp32", "M": "i32",
                                           "N": "i32", "rows_per_prog": "i32", **flags},
                                constexprs=dict(ce, BLOCK_M=BLOCK_M_BWD), key=(BN, sig)))
    return out
