"""Multi-tensor fused AdamW in Triton with the global grad-norm clip folded in.

Per (param dtype, grad dtype, device) bucket, each step launches:
  1. `_sqnorm_kernel`: one program per chunk of up to CHUNK elements of one tensor, reading the
     tensor's address from a pointer table, writing the chunk's fp32 sum of squares;
  2. `_adamw_kernel`: one program per chunk, reading p/g/m/v/step addresses from the pointer
     table and (lr, weight_decay, beta1, beta2, eps) from a per-tensor device table, applying
     clip factor min(1, max_norm / (norm + 1e-6)) (norm read from device memory), decoupled
     weight decay, the Adam moments in fp32 and bias correction from the device step counter.
The chunk partials are summed in fixed order (deterministic). Tables are device tensors cached
between steps and rebuilt only when an address or hyperparameter changes, so a step is two
launches per bucket plus a couple of tiny torch ops. A non-finite norm skips the step (one host
sync), leaving parameters, moments and step counters untouched.
"""
import torch
import triton
import triton.language as tl

from nanogpt_kernels.contract import FusedAdamWBase
from nanogpt_kernels.triton._utils import TL_DTYPE, PTR_SIG, emu_bf16, interpreting, rne_bf16

BLOCK = 1024
CHUNK = 65536
NUM_WARPS = 4
N_HP = tl.constexpr(5)  # per-tensor hyperparameters in HP: lr, weight_decay, beta1, beta2, eps


@triton.jit
def _sqnorm_kernel(G_PTRS, NUMEL, CHUNK_T, CHUNK_S, OUT,
                   G_DTYPE: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    c = tl.program_id(0)
    t = tl.load(CHUNK_T + c)
    start = tl.load(CHUNK_S + c)
    n = tl.load(NUMEL + t)
    g_ptr = tl.load(G_PTRS + t).to(tl.pointer_type(G_DTYPE), bitcast=True)
    offs0 = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    end = tl.minimum(start + CHUNK, n)
    for i in range(start, end, BLOCK):
        offs = i + offs0
        g = tl.load(g_ptr + offs, mask=offs < end, other=0.0).to(tl.float32)
        acc += g * g
    tl.store(OUT + c, tl.sum(acc, axis=0))


@triton.jit
def _adamw_kernel(P_PTRS, G_PTRS, M_PTRS, V_PTRS, S_PTRS, NUMEL, CHUNK_T, CHUNK_S, HP, NORM, max_norm,
                  P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, CLIP: tl.constexpr,
                  BLOCK: tl.constexpr, CHUNK: tl.constexpr, EMU: tl.constexpr = False):
    c = tl.program_id(0)
    t = tl.load(CHUNK_T + c)
    start = tl.load(CHUNK_S + c)
    n = tl.load(NUMEL + t)
    p_ptr = tl.load(P_PTRS + t).to(tl.pointer_type(P_DTYPE), bitcast=True)
    g_ptr = tl.load(G_PTRS + t).to(tl.pointer_type(G_DTYPE), bitcast=True)
    m_ptr = tl.load(M_PTRS + t).to(tl.pointer_type(tl.float32), bitcast=True)
    v_ptr = tl.load(V_PTRS + t).to(tl.pointer_type(tl.float32), bitcast=True)
    s_ptr = tl.load(S_PTRS + t).to(tl.pointer_type(tl.float32), bitcast=True)
    lr = tl.load(HP + t * N_HP + 0)
    wd = tl.load(HP + t * N_HP + 1)
    beta1 = tl.load(HP + t * N_HP + 2)
    beta2 = tl.load(HP + t * N_HP + 3)
    eps = tl.load(HP + t * N_HP + 4)
    # beta ** step by repeated squaring in fp64: 1 - beta2 ** step stays accurate for beta2 = 0.999
    e = tl.load(s_ptr).to(tl.int32)  # the step counter, already incremented for this step
    b1 = beta1.to(tl.float64)
    b2 = beta2.to(tl.float64)
    pow1 = b1 * 0.0 + 1.0
    pow2 = b2 * 0.0 + 1.0
    while e > 0:
        odd = (e & 1) == 1
        pow1 = tl.where(odd, pow1 * b1, pow1)
        pow2 = tl.where(odd, pow2 * b2, pow2)
        b1 = b1 * b1
        b2 = b2 * b2
        e = e >> 1
    bc1 = 1.0 - pow1
    bc2 = 1.0 - pow2
    step_size = (lr.to(tl.float64) / bc1).to(tl.float32)
    bc2_sqrt = tl.sqrt(bc2.to(tl.float32))
    decay = 1.0 - lr * wd
    if CLIP:
        norm = tl.load(NORM)
        clip = tl.minimum(max_norm / (norm + 1e-6), 1.0)
    offs0 = tl.arange(0, BLOCK)
    end = tl.minimum(start + CHUNK, n)
    for i in range(start, end, BLOCK):
        offs = i + offs0
        mask = offs < end
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        if CLIP:
            g = g * clip
        p = p * decay
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        denom = tl.sqrt(v) / bc2_sqrt + eps
        p = p - step_size * (m / denom)
        if EMU:
            p = rne_bf16(p, EMU)
        tl.store(p_ptr + offs, p.to(P_DTYPE), mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)




def _to_device(values, dtype, dev):
    """A small host table on `dev`; on CUDA via pinned memory and a non-blocking copy (no host sync)."""
    t = torch.tensor(values, dtype=dtype)
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


class _Bucket:
    """Device tables for one (device, param dtype, grad dtype) group of tensors."""

    def __init__(self):
        self.key = None
        self.hp_key = None


class FusedAdamW(FusedAdamWBase):
    """AdamW (decoupled weight decay, bias correction) as two Triton launches per step and dtype.

    Param groups carry their own lr / betas / eps / weight_decay. State per parameter matches
    torch.optim.AdamW's names (`step`, `exp_avg`, `exp_avg_sq`) so state_dict() /
    load_state_dict() round-trip; moments stay fp32 even for fp16 / bf16 parameters.
    `step()` returns the total gradient norm before clipping as a 0-d fp32 tensor; when
    `max_grad_norm` > 0 gradients are scaled by min(1, max_grad_norm / (norm + 1e-6)) inside
    the update (grads themselves are not modified). A non-finite norm skips the step.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, max_grad_norm=0.0):
        super().__init__(params, lr, betas, eps, weight_decay, max_grad_norm)
        self._buckets = {}

    # ------------------------------------------------------------ state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._buckets = {}  # addresses changed: rebuild the pointer tables

    # ------------------------------------------------------------ tables

    def _tables(self, key, items):
        """Pointer / numel / chunk / hyperparameter tables for one bucket, rebuilt on change."""
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket()
        dev = items[0][1].device
        ptrs = tuple((p.data_ptr(), g.data_ptr(), st["exp_avg"].data_ptr(), st["exp_avg_sq"].data_ptr(),
                      st["step"].data_ptr(), p.numel()) for _, p, g, st in items)
        if b.key != ptrs:
            b.key = ptrs
            cols = list(zip(*ptrs))
            b.ptrs = _to_device(cols[:5], torch.int64, dev)
            numel = cols[5]
            b.numel = _to_device(numel, torch.int64, dev)
            ct, cs = [], []
            for t, n in enumerate(numel):
                for s in range(0, n, CHUNK):
                    ct.append(t)
                    cs.append(s)
            b.n_chunks = len(ct)
            b.chunk_t = _to_device(ct, torch.int32, dev)
            b.chunk_s = _to_device(cs, torch.int64, dev)
            b.steps = [st["step"] for _, _, _, st in items]
        lrs = [grp["lr"] for grp, _, _, _ in items]
        tensor_lr = any(torch.is_tensor(x) for x in lrs)
        hp_key = tuple((0.0 if tensor_lr else float(grp["lr"]), float(grp["weight_decay"]), float(grp["betas"][0]),
                        float(grp["betas"][1]), float(grp["eps"])) for grp, _, _, _ in items)
        if b.hp_key != hp_key or tensor_lr:
            b.hp_key = hp_key
            b.hp = _to_device(hp_key, torch.float32, dev)
            if tensor_lr:  # lr held in device tensors (e.g. for CUDA graphs): gather without a host sync
                b.hp[:, 0] = torch.stack([torch.as_tensor(x, dtype=torch.float32, device=dev).reshape(())
                                          for x in lrs])
        return b

    # ------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW update of every parameter with a gradient; returns the pre-clip grad norm."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets = {}
        for grp in self.param_groups:
            for p in grp["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("FusedAdamW does not support sparse gradients")
                if not p.is_contiguous():
                    raise RuntimeError("FusedAdamW needs contiguous parameters")
                g = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
                st = self._init_state(p)
                buckets.setdefault((p.device, p.dtype, g.dtype), []).append((grp, p, g, st))
        if not buckets:
            dev = self.param_groups[0]["params"][0].device if self.param_groups[0]["params"] else "cpu"
            return torch.zeros((), dtype=torch.float32, device=dev)
        if len({k[0] for k in buckets}) > 1:
            raise RuntimeError("FusedAdamW: all parameters must be on one device")
        tables = {key: self._tables(key, items) for key, items in buckets.items()}
        total = sum(t.n_chunks for t in tables.values())
        dev = next(iter(buckets))[0]
        partial = torch.empty(total, dtype=torch.float32, device=dev)
        block = CHUNK if interpreting() else BLOCK  # the interpreter pays per op, not per element
        off = 0
        for (_, _, gdt), t in tables.items():
            if t.n_chunks == 0:  # only empty tensors
                continue
            _sqnorm_kernel[(t.n_chunks,)](t.ptrs[1], t.numel, t.chunk_t, t.chunk_s, partial[off:off + t.n_chunks],
                                          G_DTYPE=TL_DTYPE[gdt], BLOCK=block, CHUNK=CHUNK, num_warps=NUM_WARPS)
            off += t.n_chunks
        norm = partial.sum().sqrt()
        if not bool(torch.isfinite(norm)):  # host sync: skip the step, touch nothing
            return norm
        clip = self.max_grad_norm > 0
        for (_, pdt, gdt), t in tables.items():
            torch._foreach_add_(t.steps, 1.0)
            if t.n_chunks == 0:
                continue
            _adamw_kernel[(t.n_chunks,)](t.ptrs[0], t.ptrs[1], t.ptrs[2], t.ptrs[3], t.ptrs[4], t.numel,
                                         t.chunk_t, t.chunk_s, t.hp, norm, self.max_grad_norm,
                                         P_DTYPE=TL_DTYPE[pdt], G_DTYPE=TL_DTYPE[gdt], CLIP=clip,
                                         BLOCK=block, CHUNK=CHUNK, EMU=emu_bf16(pdt), num_warps=NUM_WARPS)
        del buckets  # non-contiguous grad copies lived until the launches were queued
        return norm


def _compile_configs():
    out = []
    for pdt, psig in PTR_SIG.items():
        for gdt, gsig in PTR_SIG.items():
            if gdt != pdt and gdt != torch.float32:
                continue
            tp, tg = TL_DTYPE[pdt], TL_DTYPE[gdt]
            for clip in (True, False):
                sig = {"P_PTRS": "*i64", "G_PTRS": "*i64", "M_PTRS": "*i64", "V_PTRS": "*i64", "S_PTRS": "*i64",
                       "NUMEL": "*i64", "CHUNK_T": "*i32", "CHUNK_S": "*i64", "HP": "*fp32", "NORM": "*fp32",
                       "max_norm": "fp32", "P_DTYPE": "constexpr", "G_DTYPE": "constexpr", "CLIP": "constexpr",
                       "BLOCK": "constexpr", "CHUNK": "constexpr", "EMU": "constexpr"}
                out.append(dict(name=f"adamw[p={psig[1:]},g={gsig[1:]},clip={int(clip)}]", fn=_adamw_kernel,
                                signature=sig, constexprs={"P_DTYPE": tp, "G_DTYPE": tg, "CLIP": clip, "BLOCK": BLOCK,
                                                           "CHUNK": CHUNK, "EMU": False},
                                num_warps=NUM_WARPS, num_stages=1, key=(psig, gsig)))
        out.append(dict(name=f"adamw_sqnorm[g={psig[1:]}]", fn=_sqnorm_kernel,
                        signature={"G_PTRS": "*i64", "NUMEL": "*i64", "CHUNK_T": "*i32", "CHUNK_S": "*i64",
                                   "OUT": "*fp32", "G_DTYPE": "constexpr", "BLOCK": "constexpr", "CHUNK": "constexpr"},
                        constexprs={"G_DTYPE": TL_DTYPE[pdt], "BLOCK": BLOCK, "CHUNK": CHUNK},
                        num_warps=NUM_WARPS, num_stages=1, key=(psig,)))
    return out
