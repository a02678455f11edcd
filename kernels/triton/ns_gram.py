"""Muon's Gram product: G[b] = X[b] @ X[b]^T over a (k, m, n) stack, the symmetric product of each
Newton-Schulz iteration (nanogpt.muon.newton_schulz), in one launch.

G is symmetric, so only the tiles on or above the diagonal are computed: the grid is (tiles, tiles, k) and a
program whose row tile is below its column tile does nothing; each other program accumulates its BLOCK x BLOCK
tile over n in fp32 (tl.dot) and stores it, and its mirror (the transposed tile) when off the diagonal: half the
FLOPs of a full product (m^2 n instead of 2 m^2 n per matrix). Rounded once to X's dtype, as torch.bmm is; the
fp32 sums run in another order than cuBLAS's, so the two agree to rounding, not bitwise.

Not a registry op: Muon measures it against torch.bmm at the stack's real shape on the GPU and keeps it only where
it is faster (nanogpt.muon.gram_backend); the tests check it against a float64 product under the interpreter.
"""
import torch
import triton
import triton.language as tl

from nanogpt_kernels.triton._utils import emu_bf16, interpreting, nan_like, rne_bf16
from nanogpt_kernels.triton.attention import _dot


@triton.jit
def _ns_gram_kernel(X, G, M, N, sxb, sxm, sxn, sgb, sgm, sgn,
                    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, EMU_BF16: tl.constexpr = False):
    i = tl.program_id(0)
    j = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    if i <= j:  # the upper triangle of tiles; the mirror store fills the lower one
        rm = i * BLOCK + tl.arange(0, BLOCK)
        rn = j * BLOCK + tl.arange(0, BLOCK)
        rk = tl.arange(0, BLOCK_K)
        xb = X + b * sxb
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, N, BLOCK_K):
            kk = k0 + rk
            a = tl.load(xb + rm[:, None] * sxm + kk[None, :] * sxn, mask=(rm[:, None] < M) & (kk[None, :] < N),
                        other=0.0)
            bt = tl.load(xb + rn[None, :] * sxm + kk[:, None] * sxn, mask=(rn[None, :] < M) & (kk[:, None] < N),
                         other=0.0)  # (BLOCK_K, BLOCK): X[rn, kk]^T
            acc = _dot(a, bt, acc, False, EMU_BF16)  # EMU_BF16: the interpreter's bf16 product needs fp32
        out = rne_bf16(acc, EMU_BF16).to(G.dtype.element_ty)
        gb = G + b * sgb
        tl.store(gb + rm[:, None] * sgm + rn[None, :] * sgn, out, mask=(rm[:, None] < M) & (rn[None, :] < M))
        if i < j:
            tl.store(gb + rn[:, None] * sgm + rm[None, :] * sgn, tl.trans(out),
                     mask=(rn[:, None] < M) & (rm[None, :] < M))


def _config(interp):
    """(BLOCK, BLOCK_K, num_warps, num_stages): 64 x 64 tiles over 64-wide k slices on a GPU, no register spill on
    sm_80/sm_90 with triton 3.6 and 3.9 (128 x 128 tiles spilled on sm_90); small tiles for the interpreter."""
    return (32, 16, 4, 1) if interp else (64, 64, 4, 3)


def ns_gram(x, out=None):
    """x @ x.mT for a (k, m, n) stack (any strides), into out (k, m, m) of x's dtype when given."""
    if x.dim() != 3:
        raise ValueError(f"ns_gram: expected a (k, m, n) stack, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16):  # fp32 would run as tf32 in tl.dot
        raise ValueError(f"ns_gram: dtype {x.dtype} is not supported (bfloat16, float16)")
    k, m, n = x.shape
    if out is None:
        out = nan_like((k, m, m), x.dtype, x.device)
    elif out.shape != (k, m, m) or out.dtype != x.dtype:
        raise ValueError(f"ns_gram: out must be {(k, m, m)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    if k == 0 or m == 0:
        return out
    if n == 0:
        return out.zero_()
    block, block_k, warps, stages = _config(interpreting())
    tiles = triton.cdiv(m, block)
    _ns_gram_kernel[(tiles, tiles, k)](x, out, m, n, *x.stride(), *out.stride(), BLOCK=block, BLOCK_K=block_k,
                                       EMU_BF16=emu_bf16(x.dtype), num_warps=warps, num_stages=stages)
    return out


def _compile_configs():
    block, block_k, warps, stages = _config(False)
    strides = {f"s{t}{d}": "i64" for t in "xg" for d in "bmn"}
    return [dict(name=f"ns_gram[{sig[1:]}]", fn=_ns_gram_kernel, num_warps=warps, num_stages=stages,
                 signature={"X": sig, "G": sig, "M": "i32", "N": "i32", **strides,
                            "BLOCK": "constexpr", "BLOCK_K": "constexpr", "EMU_BF16": "constexpr"},
                 constexprs={"BLOCK": block, "BLOCK_K": block_k, "EMU_BF16": False}, key=(sig,))
            for sig in ("*bf16", "*fp16")]
