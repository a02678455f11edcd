"""Rotary position embeddings on q and k in one launch (Hugging Face's rotate-half convention).

Each program rotates BLOCK_R rows (one (b, h, t) position each) of q or of k: the first programs take q's rows,
the rest k's, so q and k (which may have their own number of heads) cost one launch. With x1, x2 the halves of a
row, out = cat(x1 cos - x2 sin, x2 cos + x1 sin) in fp32, cos and sin (T, D/2) float32. The inputs may have any
strides with a contiguous last dim (q and k are usually transposed views); the outputs are contiguous
(B, H, T, D). The backward is the inverse rotation (sin negated), by the same kernel.
"""
import torch
import triton
import triton.language as tl

from nanogpt_kernels.registry import rope_check
from nanogpt_kernels.triton._utils import emu_bf16, interpreting, nan_like, next_pow2, rne_bf16


@triton.jit
def _rope_rows(X, O, Cos, Sin, row0, R, H, T, sb, sh, st, HALF, SIGN: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_D: tl.constexpr, EMU_BF16: tl.constexpr):
    rows = row0 + tl.arange(0, BLOCK_R)
    t = rows % T
    bh = rows // T
    xoff = (bh // H).to(tl.int64) * sb + (bh % H).to(tl.int64) * sh + t.to(tl.int64) * st
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < R)[:, None] & (cols < HALF)[None, :]
    x1 = tl.load(X + xoff[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + xoff[:, None] + HALF + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    cs = t.to(tl.int64)[:, None] * HALF + cols[None, :]
    c = tl.load(Cos + cs, mask=mask, other=0.0)
    s = tl.load(Sin + cs, mask=mask, other=0.0) * SIGN
    o1 = x1 * c - x2 * s
    o2 = x2 * c + x1 * s
    if EMU_BF16:
        o1 = rne_bf16(o1, EMU_BF16)
        o2 = rne_bf16(o2, EMU_BF16)
    ooff = rows.to(tl.int64)[:, None] * (2 * HALF) + cols[None, :]
    tl.store(O + ooff, o1.to(O.dtype.element_ty), mask=mask)
    tl.store(O + ooff + HALF, o2.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, Cos, Sin, RQ, RK, HQ, HK, T, sqb, sqh, sqt, skb, skh, skt, HALF, q_blocks,
                 SIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, EMU_BF16: tl.constexpr = False):
    pid = tl.program_id(0)
    if pid < q_blocks:
        _rope_rows(Q, QO, Cos, Sin, pid * BLOCK_R, RQ, HQ, T, sqb, sqh, sqt, HALF, SIGN, BLOCK_R, BLOCK_D, EMU_BF16)
    else:
        _rope_rows(K, KO, Cos, Sin, (pid - q_blocks) * BLOCK_R, RK, HK, T, skb, skh, skt, HALF, SIGN, BLOCK_R,
                   BLOCK_D, EMU_BF16)


def _config(half, interpret=False):
    """(rows per program, BLOCK_D): ~4096 elements of a half per program on GPUs, far more in the interpreter."""
    block = max(16, next_pow2(half))
    return max(1, min(1024, (65536 if interpret else 4096) // block)), block


def _rotate(q, k, cos, sin, inverse):
    rope_check(q, k, cos, sin)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    half = q.shape[-1] // 2
    qo, ko = nan_like(q.shape, q.dtype, q.device), nan_like(k.shape, q.dtype, k.device)
    rq, rk = q.numel() // q.shape[-1], k.numel() // k.shape[-1]
    if rq and half:
        rows, block = _config(half, interpreting())
        q_blocks = triton.cdiv(rq, rows)
        _rope_kernel[(q_blocks + triton.cdiv(rk, rows),)](
            q, k, qo, ko, cos.float().contiguous(), sin.float().contiguous(), rq, rk, q.shape[1], k.shape[1],
            q.shape[2], q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), half, q_blocks,
            SIGN=-1.0 if inverse else 1.0, BLOCK_R=rows, BLOCK_D=block, EMU_BF16=emu_bf16(q.dtype), num_warps=4)
    return qo, ko


@torch.library.custom_op("nanogpt_triton::rope_fwd", mutates_args=())
def rope_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(q, k, cos, sin, inverse)


@rope_fwd.register_fake
def _(q, k, cos, sin, inverse):
    rope_check(q, k, cos, sin)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, dtype=q.dtype, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, _ = inputs
    ctx.save_for_backward(cos, sin)
    ctx.shapes = q.shape, k.shape


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq = dq if dq is not None else cos.new_zeros(ctx.shapes[0], dtype=dk.dtype)
    dk = dk if dk is not None else cos.new_zeros(ctx.shapes[1], dtype=dq.dtype)
    dq, dk = rope_fwd(dq, dk, cos, sin, True)
    return dq, dk, None, None, None


rope_fwd.register_autograd(_backward, setup_context=_setup_context)


def rope(q, k, cos, sin):
    """Rotary embeddings on q (B, H, T, D) and k (B, Hk, T, D) in one launch; cos, sin (T, D/2) float32.
    Returns contiguous (q_rot, k_rot) in q's dtype (q and k share it); differentiable in q and k."""
    return rope_fwd(q, k, cos, sin, False)


def _compile_configs():
    out = []
    for half in (8, 16, 32, 64, 128):
        rows, block = _config(half)
        for sig in ("*fp32", "*fp16", "*bf16"):
            for sign in (1.0, -1.0):
                signature = {"Q": sig, "K": sig, "QO": sig, "KO": sig, "Cos": "*fp32", "Sin": "*fp32",
                             **dict.fromkeys(("RQ", "RK", "HQ", "HK", "T", "sqb", "sqh", "sqt", "skb", "skh", "skt",
                                              "HALF", "q_blocks"), "i32"),
                             **dict.fromkeys(("SIGN", "BLOCK_R", "BLOCK_D", "EMU_BF16"), "constexpr")}
                out.append(dict(name=f"rope[{sig[1:]},D/2={block},{'bwd' if sign < 0 else 'fwd'}]", fn=_rope_kernel,
                                signature=signature, num_warps=4, num_stages=1, key=(block, sig),
                                constexprs={"SIGN": sign, "BLOCK_R": rows, "BLOCK_D": block, "EMU_BF16": False}))
    return out
