"""Fused linear + cross-entropy: the loss of x W^T + b without the (N, V) logits.

The chunk loop, the gradient-in-the-forward design and the autograd are the torch backend's
(nanogpt_kernels.registry.define_linear_cross_entropy); the matmuls stay on cuBLAS per chunk. What is Triton
here is the pass over each chunk of logits: one program per row takes the online max / sum of exp over the
vocabulary (softcap applied on the fly), writes the row's loss and, when the gradient is wanted, a second
sweep overwrites the logits with softmax - onehot (times the softcap's derivative), so the chunk's
logits are read twice and written once in all.
"""
import torch
import triton
import triton.language as tl

from nanogpt_kernels.registry import define_linear_cross_entropy
from nanogpt_kernels.triton._utils import emu_bf16, interpreting, nan_like, next_pow2, rne_bf16


@triton.jit
def _tanh(u):
    # Cephes tanhf: odd polynomial below |u| = 0.625 (small logits keep their relative precision), else
    # 1 - 2 / (exp(2|u|) + 1), which cannot overflow into NaN
    a = tl.abs(u)
    z = u * u
    small = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
             - 3.33332819422e-1) * z * u + u
    big = 1.0 - 2.0 / (tl.exp(2.0 * tl.minimum(a, 40.0)) + 1.0)
    return tl.where(a < 0.625, small, tl.where(u < 0, -big, big))


@triton.jit
def _ce_rows_kernel(L, T, LOSS, V, ignore_index, softcap,
                    CAP: tl.constexpr, GRAD: tl.constexpr, BLOCK_V: tl.constexpr, EMU_BF16: tl.constexpr = False):
    row = tl.program_id(0)
    lrow = L + row.to(tl.int64) * V
    t = tl.load(T + row)
    valid = t != ignore_index
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):  # per-lane online max and sum of exp
        mask = v0 + cols < V
        z = tl.load(lrow + v0 + cols, mask=mask, other=0.0).to(tl.float32)
        if CAP:
            z = softcap * _tanh(z / softcap)
        z = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, z)
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane with nothing yet: no -inf - -inf
        s = s * tl.exp(m - ref) + tl.exp(z - ref)
        m = m_new
    mx = tl.max(m, 0)
    lse = mx + tl.log(tl.sum(s * tl.exp(m - mx), 0))
    tc = tl.where(valid, t, 0)
    zt = tl.load(lrow + tc).to(tl.float32)
    if CAP:
        zt = softcap * _tanh(zt / softcap)
    tl.store(LOSS + row, tl.where(valid, lse - zt, 0.0))
    if GRAD:
        keep = tl.where(valid, 1.0, 0.0)  # an ignored row's gradient is 0
        for v0 in range(0, V, BLOCK_V):
            c = v0 + cols
            mask = c < V
            z = tl.load(lrow + c, mask=mask, other=0.0).to(tl.float32)
            d = keep
            if CAP:
                u = _tanh(z / softcap)
                z = softcap * u
                d = keep * (1.0 - u * u)
            g = (tl.exp(z - lse) - tl.where(c == tc, 1.0, 0.0)) * d
            if EMU_BF16:
                g = rne_bf16(g, EMU_BF16)
            tl.store(lrow + c, g.to(L.dtype.element_ty), mask=mask)


BLOCK_V_MAX = 4096  # 16 KB of fp32 per sweep; the interpreter pays per operation, so one block is better there


def _block_v(V):
    return next_pow2(V) if interpreting() else min(BLOCK_V_MAX, max(128, next_pow2(V)))


def _ce_pass(logits, targets, ignore_index, softcap, grad):
    n, V = logits.shape
    loss = nan_like((n,), torch.float32, logits.device)
    if n and V:
        _ce_rows_kernel[(n,)](logits, targets, loss, V, ignore_index, softcap, CAP=softcap > 0, GRAD=grad,
                              BLOCK_V=_block_v(V),
                              EMU_BF16=emu_bf16(logits.dtype), num_warps=8)
    return loss


linear_cross_entropy = define_linear_cross_entropy("nanogpt_triton::linear_cross_entropy", _ce_pass)


def _compile_configs():
    out = []
    for sig in ("*fp32", "*bf16", "*fp16"):
        for BV in (128, 1024, BLOCK_V_MAX):
            for cap in (False, True):
                for grad in (False, True):
                    out.append(dict(
                        name=f"ce_rows[{sig[1:]},BV={BV},cap={int(cap)},grad={int(grad)}]", fn=_ce_rows_kernel,
                        num_warps=8, num_stages=1, key=(BV, sig),
                        signature={"L": sig, "T": "*i64", "LOSS": "*fp32", "V": "i32",
                                   "ignore_index": "i32", "softcap": "fp32", "CAP": "constexpr", "GRAD": "constexpr",
                                   "BLOCK_V": "constexpr", "EMU_BF16": "constexpr"},
                        constexprs={"CAP": cap, "GRAD": grad, "BLOCK_V": BV, "EMU_BF16": False}))
    return out
