"""FlashAttention-2 style attention in Triton: forward, backward, autograd custom op.

Forward: one program per (BLOCK_M queries, batch*head); K/V streamed in BLOCK_N tiles with an
online softmax in the exp2 domain; the T x T score matrix never exists in memory. Saves the
log-sum-exp (base 2) per query row for the backward.
Backward: preprocess delta = rowsum(dO * O); one kernel accumulates dK/dV per key block
(looping over query blocks), another accumulates dQ per query block (looping over key blocks):
no atomics, deterministic. Causal masking skips fully masked blocks and applies the mask only
on the diagonal blocks.

Inputs are (B, H, T, D) with any strides as long as the last dimension is contiguous (the
model's q/k/v are transposed views of the c_attn output and are read in place). Outputs and
gradients are laid out as (B, T, H, D) and returned transposed, so `y.transpose(1, 2)` back
to (B, T, C) is free.
"""
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from nanogpt_kernels.triton._utils import PTR_SIG, emu_bf16, nan_like, rne_bf16

HEAD_DIMS = (32, 64, 128)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: the CPU interpreter multiplies bf16 as raw integers; fp32 products of bf16 are exact
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _head(X, bh, H, stride_b, stride_h):
    """X's (batch, head) slice for program bh = b * H + h, with int64 offsets (B*H*T*D may pass 2^31)."""
    return X + (bh // H).to(tl.int64) * stride_b + (bh % H).to(tl.int64) * stride_h


@triton.jit
def _tile(base, offs_t, offs_d, stride_t):
    """Pointers to rows offs_t x columns offs_d of a (T, D) slice with unit stride over D."""
    return base + offs_t[:, None] * stride_t + offs_d[None, :]


# one Philox key per (call, batch*head): the call's random seed plus bh times this odd constant > 2^31, so two
# heads of two calls never share a key; the counter is the score's position query * T + key. A contract with the
# extension's CPU kernel (csrc/attention.cpp, kPhiloxHeadStride), which draws the same mask.
PHILOX_HEAD_STRIDE = tl.constexpr(2654435769)


@triton.jit
def _dropout_key(SEED, bh):
    return tl.load(SEED) + bh.to(tl.int64) * PHILOX_HEAD_STRIDE


@triton.jit
def _dropout(x, key, offs, p_drop):
    """x where the score at counter `offs` is kept (uniform >= p_drop), scaled by 1 / (1 - p_drop); else 0."""
    return tl.where(tl.rand(key, offs) >= p_drop, x * (1.0 / (1.0 - p_drop)), 0.0)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, hi, T, qk_scale,
               key, p_drop,
               MASK_CAUSAL: tl.constexpr, MASK_BOUND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               IEEE: tl.constexpr, EMU: tl.constexpr, DROPOUT: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        kmask = offs_n < T
        kT = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=kmask[None, :], other=0.0)
        qk = _dot(q, kT, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE, EMU) * qk_scale
        if MASK_CAUSAL:
            qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
        if MASK_BOUND:
            qk = tl.where(kmask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kmask[:, None], other=0.0)
        if DROPOUT:  # after l_i: the softmax normalizes over every key, dropout then zeroes some weights
            p = _dropout(p, key, offs_m[:, None] * T + offs_n[None, :], p_drop)
        if EMU:
            p = rne_bf16(p, EMU)
        acc = _dot(p.to(v.dtype), v, acc, IEEE, EMU)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, SEED, sm_scale, p_drop,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                     H, T,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, IEEE: tl.constexpr, EMU: tl.constexpr = False,
                     DROPOUT: tl.constexpr = False):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    k_base = _head(K, bh, H, stride_kb, stride_kh)
    v_base = _head(V, bh, H, stride_vb, stride_vh)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    qmask = offs_m < T
    q = tl.load(_tile(_head(Q, bh, H, stride_qb, stride_qh), offs_m, offs_d, stride_qt), mask=qmask[:, None],
                other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    key = _dropout_key(SEED, bh) if DROPOUT else 0
    if CAUSAL:
        # keys strictly before this query block: never masked
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                                   0, start_m, T, qk_scale, key, p_drop, False, False, BLOCK_M, BLOCK_N, IEEE, EMU,
                                   DROPOUT)
        # the diagonal block(s)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                                   start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale, key, p_drop, True, True,
                                   BLOCK_M, BLOCK_N, IEEE, EMU, DROPOUT)
    else:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                                   0, T, T, qk_scale, key, p_drop, False, True, BLOCK_M, BLOCK_N, IEEE, EMU, DROPOUT)
    lse = m_i + tl.math.log2(l_i)
    acc = acc / l_i[:, None]
    if EMU:
        acc = rne_bf16(acc, EMU)
    tl.store(_tile(_head(O, bh, H, stride_ob, stride_oh), offs_m, offs_d, stride_ot), acc.to(O.dtype.element_ty),
             mask=qmask[:, None])
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=qmask)


@triton.jit
def _attn_bwd_pre_kernel(O, DO, Delta, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
                         H, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = offs_m < T
    o = tl.load(_tile(_head(O, bh, H, stride_ob, stride_oh), offs_m, offs_d, stride_ot), mask=mask[:, None],
                other=0.0).to(tl.float32)
    do = tl.load(_tile(_head(DO, bh, H, stride_dob, stride_doh), offs_m, offs_d, stride_dot), mask=mask[:, None],
                 other=0.0).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, axis=1), mask=mask)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n, offs_d,
                lo, hi, T, qk_scale, key, p_drop, MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                IEEE: tl.constexpr, EMU: tl.constexpr, DROPOUT: tl.constexpr):
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_m0
        mmask = offs_m < T
        # rows past T load as zeros (lse = delta = 0): they add exactly nothing to dk / dv
        qT = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None], mask=mmask[None, :], other=0.0)
        lse = tl.load(lse_base + offs_m, mask=mmask, other=0.0)
        qkT = _dot(k, qT, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), IEEE, EMU)
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        if MASK:
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :], mask=mmask[:, None], other=0.0)
        pdT = pT
        if DROPOUT:  # the forward's mask, regenerated: dv uses the dropped weights, dp gets the same mask
            offs = offs_m[None, :] * T + offs_n[:, None]
            pdT = _dropout(pT, key, offs, p_drop)
        if EMU:
            pdT = rne_bf16(pdT, EMU)
        dv = _dot(pdT.to(do.dtype), do, dv, IEEE, EMU)
        delta = tl.load(delta_base + offs_m, mask=mmask, other=0.0)
        dpT = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), IEEE, EMU)
        if DROPOUT:
            dpT = _dropout(dpT, key, offs, p_drop)
        dsT = pT * (dpT - delta[None, :])
        if EMU:
            dsT = rne_bf16(dsT, EMU)
        dk = _dot(dsT.to(qT.dtype), tl.trans(qT), dk, IEEE, EMU)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, Delta, SEED, sm_scale, p_drop,
                          stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                          stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                          stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                          H, T,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          CAUSAL: tl.constexpr, IEEE: tl.constexpr, EMU: tl.constexpr = False,
                          DROPOUT: tl.constexpr = False):
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    nmask = offs_n < T
    k = tl.load(_tile(_head(K, bh, H, stride_kb, stride_kh), offs_n, offs_d, stride_kt), mask=nmask[:, None],
                other=0.0)
    v = tl.load(_tile(_head(V, bh, H, stride_vb, stride_vh), offs_n, offs_d, stride_vt), mask=nmask[:, None],
                other=0.0)
    q_base = _head(Q, bh, H, stride_qb, stride_qh)
    do_base = _head(DO, bh, H, stride_dob, stride_doh)
    lse_base = LSE + bh.to(tl.int64) * T
    delta_base = Delta + bh.to(tl.int64) * T
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    key = _dropout_key(SEED, bh) if DROPOUT else 0
    if CAUSAL:
        # query blocks on the diagonal (masked), then the ones below it (unmasked)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n, offs_d,
                             start_n, tl.minimum(start_n + BLOCK_N, T), T, qk_scale, key, p_drop, True, BLOCK_M,
                             BLOCK_N, IEEE, EMU, DROPOUT)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n, offs_d,
                             start_n + BLOCK_N, T, T, qk_scale, key, p_drop, False, BLOCK_M, BLOCK_N, IEEE, EMU,
                             DROPOUT)
    else:
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n, offs_d,
                             0, T, T, qk_scale, key, p_drop, False, BLOCK_M, BLOCK_N, IEEE, EMU, DROPOUT)
    dk = dk * sm_scale
    if EMU:
        dk = rne_bf16(dk, EMU)
        dv = rne_bf16(dv, EMU)
    tl.store(_tile(_head(DK, bh, H, stride_dkb, stride_dkh), offs_n, offs_d, stride_dkt), dk.to(DK.dtype.element_ty),
             mask=nmask[:, None])
    tl.store(_tile(_head(DV, bh, H, stride_dvb, stride_dvh), offs_n, offs_d, stride_dvt), dv.to(DV.dtype.element_ty),
             mask=nmask[:, None])


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, hi, T, qk_scale,
              key, p_drop,
              MASK_CAUSAL: tl.constexpr, MASK_BOUND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              IEEE: tl.constexpr, EMU: tl.constexpr, DROPOUT: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + offs_n0
        kmask = offs_n < T
        kT = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=kmask[None, :], other=0.0)
        vT = tl.load(v_base + offs_n[None, :] * stride_vt + offs_d[:, None], mask=kmask[None, :], other=0.0)
        qk = _dot(q, kT, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE, EMU)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASK_CAUSAL:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        if MASK_BOUND:
            p = tl.where(kmask[None, :], p, 0.0)
        dp = _dot(do, vT, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE, EMU)
        if DROPOUT:
            dp = _dropout(dp, key, offs_m[:, None] * T + offs_n[None, :], p_drop)
        ds = p * (dp - delta[:, None])
        if EMU:
            ds = rne_bf16(ds, EMU)
        dq = _dot(ds.to(kT.dtype), tl.trans(kT), dq, IEEE, EMU)
    return dq


# FlashAttention-2's second backward kernel: the dK/dV kernel's prologue with the query and key tiles' roles
# swapped (one program per query block looping over key blocks). Two kernels, so neither needs atomics.
@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, Delta, SEED, sm_scale, p_drop,
                        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                        stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                        stride_dqb, stride_dqh, stride_dqt,
                        H, T,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CAUSAL: tl.constexpr, IEEE: tl.constexpr, EMU: tl.constexpr = False,
                        DROPOUT: tl.constexpr = False):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mmask = offs_m < T
    q = tl.load(_tile(_head(Q, bh, H, stride_qb, stride_qh), offs_m, offs_d, stride_qt), mask=mmask[:, None],
                other=0.0)
    do = tl.load(_tile(_head(DO, bh, H, stride_dob, stride_doh), offs_m, offs_d, stride_dot), mask=mmask[:, None],
                 other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=mmask, other=0.0)
    delta = tl.load(Delta + bh.to(tl.int64) * T + offs_m, mask=mmask, other=0.0)
    k_base = _head(K, bh, H, stride_kb, stride_kh)
    v_base = _head(V, bh, H, stride_vb, stride_vh)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    key = _dropout_key(SEED, bh) if DROPOUT else 0
    if CAUSAL:
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                       0, start_m, T, qk_scale, key, p_drop, False, False, BLOCK_M, BLOCK_N, IEEE, EMU, DROPOUT)
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                       start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale, key, p_drop, True, True, BLOCK_M,
                       BLOCK_N, IEEE, EMU, DROPOUT)
    else:
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                       0, T, T, qk_scale, key, p_drop, False, True, BLOCK_M, BLOCK_N, IEEE, EMU, DROPOUT)
    dq = dq * sm_scale
    if EMU:
        dq = rne_bf16(dq, EMU)
    tl.store(_tile(_head(DQ, bh, H, stride_dqb, stride_dqh), offs_m, offs_d, stride_dqt), dq.to(DQ.dtype.element_ty),
             mask=mmask[:, None])




# ---------------------------------------------------------------- configs and launchers

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head dim, picked from
# `python -m kernels.compile_check` so that no config spills registers on its architecture.
_CFG_FP32 = {  # IEEE fp32 dots run on FMA units: small tiles
    "fwd": {32: (64, 32, 4, 2), 64: (32, 32, 4, 2), 128: (32, 16, 8, 2)},
    "dkdv": {32: (16, 64, 4, 2), 64: (16, 32, 4, 2), 128: (16, 32, 8, 2)},
    "dq": {32: (32, 32, 4, 2), 64: (64, 32, 8, 2), 128: (64, 16, 8, 2)},
}
_CFG_SM90 = {  # fp16 / bf16 on Hopper (wgmma)
    "fwd": {32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 128: (128, 32, 8, 3)},
    "dkdv": {32: (32, 128, 4, 3), 64: (64, 128, 8, 3), 128: (16, 64, 8, 2)},
    "dq": {32: (128, 32, 4, 3), 64: (128, 64, 8, 3), 128: (64, 32, 8, 2)},
}
_CFG_SM80 = {  # fp16 / bf16 on Ampere and everything else (mma.sync)
    "fwd": {32: (64, 64, 4, 3), 64: (128, 32, 8, 3), 128: (64, 32, 4, 3)},
    "dkdv": {32: (32, 64, 4, 3), 64: (32, 128, 8, 3), 128: (32, 64, 8, 2)},
    "dq": {32: (64, 32, 4, 3), 64: (128, 64, 8, 3), 128: (32, 32, 4, 2)},
}


# with dropout (Philox state in registers), where the config above would spill
_CFG_DROPOUT = {
    ("sm80", "dkdv", 64): (32, 64, 8, 3), ("sm80", "dq", 64): (64, 64, 8, 3),
    ("sm90", "dkdv", 32): (32, 64, 4, 3),
}


def _configs(D, dtype, hopper=False, dropout=False):
    """Fixed launch configs: {kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages), "pre": (BLOCK_M, num_warps)}.

    The causal block skipping needs BLOCK_M % BLOCK_N == 0 for fwd / dq and
    BLOCK_N % BLOCK_M == 0 for dkdv.
    """
    table = _CFG_FP32 if dtype == torch.float32 else _CFG_SM90 if hopper else _CFG_SM80
    cfg = {k: v[D] for k, v in table.items()}
    if dropout and dtype != torch.float32:
        arch = "sm90" if hopper else "sm80"
        cfg.update({k: _CFG_DROPOUT.get((arch, k, D), c) for k, c in cfg.items()})
    cfg["pre"] = (32, 4)
    return cfg


def _is_hopper(t):
    return t.is_cuda and torch.cuda.get_device_capability(t.device)[0] == 9


def _bthd_like(x):
    """A (B, H, T, D) tensor stored as (B, T, H, D): `out.transpose(1, 2)` is contiguous."""
    B, H, T, D = x.shape
    return nan_like((B, T, H, D), x.dtype, x.device).transpose(1, 2)


def _lastdim_contig(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _check(q, k, v):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"attention: q, k, v must all be (B, H, T, D) with equal shapes, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"attention: head dim {q.shape[-1]} is not supported by the Triton kernels "
                         f"(supported: {', '.join(map(str, HEAD_DIMS))}); use kernels='attention:torch'")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"attention: q, k, v must share one of fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}")


def _fwd(q, k, v, causal, scale, dropout_p=0.0, seed=None):
    q, k, v = _lastdim_contig(q), _lastdim_contig(k), _lastdim_contig(v)
    B, H, T, D = q.shape
    o = _bthd_like(q)
    lse = nan_like((B, H, T), torch.float32, q.device)
    if B * H * T == 0:
        return o, lse
    BM, BN, warps, stages = _configs(D, q.dtype, _is_hopper(q), dropout_p > 0.0)["fwd"]
    grid = (triton.cdiv(T, BM), B * H)
    drop = dropout_p > 0.0
    _attn_fwd_kernel[grid](q, k, v, o, lse, seed if drop else q, scale, dropout_p,
                           *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
                           H, T, HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN, CAUSAL=causal, IEEE=q.dtype == torch.float32,
                           EMU=emu_bf16(q.dtype), DROPOUT=drop, num_warps=warps, num_stages=stages)
    return o, lse


def _bwd(do, q, k, v, o, lse, causal, scale, dropout_p=0.0, seed=None):
    q, k, v, o, do = (_lastdim_contig(t) for t in (q, k, v, o, do))
    B, H, T, D = q.shape
    dq, dk, dv = _bthd_like(q), _bthd_like(k), _bthd_like(v)
    if B * H * T == 0:
        return dq, dk, dv
    cfg = _configs(D, q.dtype, _is_hopper(q), dropout_p > 0.0)
    ieee, emu = q.dtype == torch.float32, emu_bf16(q.dtype)
    delta = nan_like((B, H, T), torch.float32, q.device)
    BM, warps = cfg["pre"]
    _attn_bwd_pre_kernel[(triton.cdiv(T, BM), B * H)](o, do, delta, *o.stride()[:3], *do.stride()[:3], H, T,
                                                       HEAD_DIM=D, BLOCK_M=BM, num_warps=warps)
    drop = dropout_p > 0.0
    BM, BN, warps, stages = cfg["dkdv"]
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, BN), B * H)](
        q, k, v, do, dk, dv, lse, delta, seed if drop else q, scale, dropout_p, *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], H, T, HEAD_DIM=D, BLOCK_M=BM,
        BLOCK_N=BN, CAUSAL=causal, IEEE=ieee, EMU=emu, DROPOUT=drop, num_warps=warps, num_stages=stages)
    BM, BN, warps, stages = cfg["dq"]
    _attn_bwd_dq_kernel[(triton.cdiv(T, BM), B * H)](
        q, k, v, do, dq, lse, delta, seed if drop else q, scale, dropout_p, *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3], H, T, HEAD_DIM=D, BLOCK_M=BM, BLOCK_N=BN,
        CAUSAL=causal, IEEE=ieee, EMU=emu, DROPOUT=drop, num_warps=warps, num_stages=stages)
    return dq, dk, dv


@torch.library.custom_op("nanogpt_triton::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                  dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd(q, k, v, causal, scale, dropout_p, seed)


@attention_fwd.register_fake
def _(q, k, v, causal, scale, dropout_p=0.0, seed=None):
    B, H, T, D = q.shape
    o = q.new_empty((B, T, H, D)).transpose(1, 2)
    return o, q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("nanogpt_triton::attention_bwd", mutates_args=())
def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, causal: bool, scale: float, dropout_p: float = 0.0,
                  seed: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(do, q, k, v, o, lse, causal, scale, dropout_p, seed)


@attention_bwd.register_fake
def _(do, q, k, v, o, lse, causal, scale, dropout_p=0.0, seed=None):
    B, H, T, D = q.shape
    return tuple(t.new_empty((B, T, H, D)).transpose(1, 2) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, dropout_p, seed = inputs
    o, lse = output
    ctx.causal, ctx.scale, ctx.dropout_p = causal, scale, dropout_p
    ctx.save_for_backward(q, k, v, o, lse, seed)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, seed = ctx.saved_tensors
    dq, dk, dv = attention_bwd(do, q, k, v, o, lse, ctx.causal, ctx.scale, ctx.dropout_p, seed)
    return dq, dk, dv, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)

def attention(q, k, v, causal=True, scale=None, dropout_p=0.0):
    """Scaled dot-product attention softmax(q k^T * scale [+ causal mask]) v for (B, H, T, D) inputs.

    FlashAttention-2 style Triton kernels (never materialize T x T), fp32/fp16/bf16, head dims
    32/64/128 (others raise ValueError), any T. scale defaults to 1/sqrt(D). dropout_p in [0, 1)
    drops attention weights in the kernels: the mask comes from Philox (tl.rand) keyed by a seed
    drawn from torch's generator on q's device (so torch.manual_seed makes it reproducible) and is
    regenerated, not stored, in the backward. `dropout_mask` returns the mask a seed gives.
    """
    _check(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    seed = torch.randint(2**31 - 1, (), device=q.device) if dropout_p > 0.0 else None
    return attention_fwd(q, k, v, bool(causal), float(scale), float(dropout_p), seed)[0]


@triton.jit
def _dropout_mask_kernel(SEED, OUT, T, p_drop, BLOCK: tl.constexpr):
    bh = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # = query * T + key, the kernels' counter
    keep = _dropout(tl.full([BLOCK], 1.0, tl.float32), _dropout_key(SEED, bh), offs, p_drop)
    tl.store(OUT + bh.to(tl.int64) * T * T + offs, keep, mask=offs < T * T)


def dropout_mask(B, H, T, seed, dropout_p):
    """(B, H, T, T) float32: 1 / (1 - dropout_p) where the kernels keep the weight (query, key) for this seed, else 0."""
    out = nan_like((B, H, T, T), torch.float32, seed.device)
    BLOCK = 1024
    _dropout_mask_kernel[(triton.cdiv(T * T, BLOCK), B * H)](seed, out, T, float(dropout_p), BLOCK=BLOCK)
    return out


def _compile_configs():
    out = []
    variants = [(dt, hopper) for dt in PTR_SIG for hopper in ((False,) if dt == torch.float32 else (False, True))]
    # (config key, kernel, tensor pointers in the kernel's argument order); then LSE, Delta (bwd), SEED
    kernels = (("fwd", _attn_fwd_kernel, ("Q", "K", "V", "O")),
               ("dkdv", _attn_bwd_dkdv_kernel, ("Q", "K", "V", "DO", "DK", "DV")),
               ("dq", _attn_bwd_dq_kernel, ("Q", "K", "V", "DO", "DQ")))
    for D in HEAD_DIMS:
        for dt, hopper in variants:
            sig = PTR_SIG[dt]
            archs = (80, 90) if dt == torch.float32 else (90,) if hopper else (80,)
            # dropout last, so `compile_check --sample` (first and last config per kernel) compiles it
            for causal, dropout in ((True, False), (False, False), (True, True)):
                tag = f"{sig[1:]},D={D},causal={int(causal)}" + (",dropout" if dropout else "")
                cfg = _configs(D, dt, hopper, dropout)
                for key, fn, ptrs in kernels:
                    BM, BN, w, st = cfg[key]
                    sigd = {n: sig for n in ptrs}
                    sigd.update({"LSE": "*fp32", **({"Delta": "*fp32"} if key != "fwd" else {}),
                                 "SEED": "*i64" if dropout else sig, "sm_scale": "fp32", "p_drop": "fp32"})
                    sigd.update({f"stride_{n.lower()}{a}": "i32" for n in ptrs for a in "bht"})
                    sigd.update({"H": "i32", "T": "i32"})
                    ce = {"HEAD_DIM": D, "BLOCK_M": BM, "BLOCK_N": BN, "CAUSAL": causal, "IEEE": dt == torch.float32,
                          "EMU": False, "DROPOUT": dropout}
                    sigd.update(dict.fromkeys(ce, "constexpr"))
                    name = "attn_fwd" if key == "fwd" else f"attn_bwd_{key}"
                    out.append(dict(name=f"{name}[{tag},BM={BM},BN={BN}]", fn=fn, signature=sigd, constexprs=ce,
                                    num_warps=w, num_stages=st, key=(D, sig), archs=archs))
            BM, w = _configs(D, dt, hopper)["pre"]
            sigd = {"O": sig, "DO": sig, "Delta": "*fp32"}
            sigd.update({f"stride_{t}{a}": "i32" for t in ("o", "do") for a in "bht"})
            sigd.update({"H": "i32", "T": "i32", "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr"})
            out.append(dict(name=f"attn_bwd_pre[{sig[1:]},D={D},BM={BM}]", fn=_attn_bwd_pre_kernel, signature=sigd,
                            constexprs={"HEAD_DIM": D, "BLOCK_M": BM}, num_warps=w, num_stages=1, key=(D, sig),
                            archs=archs))
    return out
