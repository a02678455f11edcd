"""Muon on the hidden matrices, AdamW on the rest, as one optimizer (`optimizer=muon`).

Muon (Keller Jordan's; modded-nanogpt, nanochat) replaces each 2-D hidden matrix's update by its Nesterov
momentum orthogonalised with a Newton-Schulz iteration. The arithmetic is torch.optim.Muon's (the reference:
its momentum, its bf16 Newton-Schulz function, its decoupled weight decay and its sqrt(max(1, rows / cols)) lr
scaling); ours adds what the trainer needs, as the AdamW backends have it:

- one optimizer over both parts: the embeddings, head, norms and biases stay with the model's `adamw` backend
  (its kernels, its state), the Muon group carries its own lr and momentum, and state_dict/load_state_dict are
  the AdamW backend's, so a checkpoint saves and resumes exactly as with AdamW alone;
- the gradient norm over every parameter, clipping to max_grad_norm, a non-finite norm skipping the step, and
  the norm returned (the backends' contract);
- under DDP each rank orthogonalises its share of the matrices (bucketed by shape, one in world_size each)
  and the results are all-gathered, as modded-nanogpt does. The momentum is kept on every rank (the gradients
  are already all-reduced; it costs one lerp), so rank 0's state_dict is the whole state;
- under FSDP (parallelism=fsdp) each matrix, its gradient and its momentum are DTensors sharded on dim 0: the
  momentum is updated on the local rows (elementwise), the update matrix is all-gathered whole
  (`full_tensor`), the matrices are orthogonalised as under DDP (one in world_size on each rank, the results
  all-gathered), and each rank applies the rows of its shard. Each update is orthogonalised from the same whole
  fp32 matrix as in one process, so it is the one process's, bitwise, for the same gradients. The momentum
  stays sharded, as AdamW's moments are, and goes through DCP with them.

The Newton-Schulz iteration runs batched: the same-shaped matrices of a step (every block's c_attn, ...) are
stacked and iterated together, torch.optim.Muon's bf16 arithmetic with bmm in place of mm, so a step launches
ns_steps x 3 matmuls per shape, not per matrix. For small matrices the per-call overhead is most of the
iteration's time (benchmarks/README.md, "Muon"). A fused fp32 iteration of our own was not kept: on this
project's CPU machine (AMX-BF16) torch's bf16 iteration is already faster than an fp32 one. On CUDA the X·Xᵀ
product may run on a Triton kernel that computes only the upper triangle of tiles (kernels/triton/ns_gram.py),
kept per shape only where measured faster than torch.bmm at the first step (gram_backend).
"""
import functools
import math
import warnings

import torch
import torch.distributed as dist
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS

from nanogpt_kernels import registry


def split_params(model):
    """(Muon's, AdamW's) parameters: every 2-D matrix inside the transformer blocks to Muon; the embeddings,
    lm_head, norms and biases to AdamW (torch.optim.Muon takes 2-D parameters only; an embedding or the head
    is a lookup/readout, not a hidden layer)."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (muon if p.dim() == 2 and name.startswith("transformer.h.") else adamw).append(p)
    return muon, adamw


@functools.cache
def muon_class(adamw_cls):
    """The optimizer class: Muon's step over the groups marked "muon", `adamw_cls` (a registry adamw backend)
    over the others, one state."""

    class Muon(adamw_cls):
        def __init__(self, muon_params, adamw_groups, muon_lr, muon_momentum=0.95, muon_weight_decay=0.0,
                     nesterov=True, ns_steps=DEFAULT_NS_STEPS, max_grad_norm=0.0, **adamw_kwargs):
            """adamw_kwargs: the AdamW backend's (lr, betas, eps, weight_decay), for adamw_groups."""
            muon_group = dict(params=list(muon_params), muon=True, lr=muon_lr, momentum=muon_momentum,
                              nesterov=nesterov, weight_decay=muon_weight_decay, ns_steps=ns_steps)
            if any(p.dim() != 2 for p in muon_group["params"]):
                raise ValueError("Muon takes 2-D parameters only")
            # the AdamW backend clips nothing: the norm is taken and clipped here, over both parts
            super().__init__([muon_group, *adamw_groups], max_grad_norm=0.0, **adamw_kwargs)
            self.clip = float(max_grad_norm or 0.0)
            self.ns_work = {}  # Newton-Schulz's buffers, kept from step to step (newton_schulz)

        @torch.no_grad()
        def step(self, closure=None):
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            norm, finite = registry.clip_grads(params, self.clip)
            if not finite:
                return norm
            groups = self.param_groups
            for group in groups:
                if group.get("muon"):
                    self._muon(group)
            self.param_groups = [g for g in groups if not g.get("muon")]
            try:
                super().step(closure)
            finally:
                self.param_groups = groups
            return norm

        def _muon(self, group):
            params = [p for p in group["params"] if p.grad is not None]
            lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
            updates = []
            for p in params:
                st = self.state[p]
                if "momentum_buffer" not in st:  # and a step count: AdamW's load_state_dict wants every state's
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    st["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                st["step"] += 1
                buf = st["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                updates.append(p.grad.lerp(buf, momentum) if group["nesterov"] else buf)
            ortho = orthogonalize([whole(u) for u in updates], group["ns_steps"], self.ns_work)
            for p, o in zip(params, ortho):
                o = local_rows(o, p)
                p.mul_(1 - lr * wd)
                p.add_(o, alpha=-lr * math.sqrt(max(1.0, p.size(0) / p.size(1))))

    return Muon


def whole(t):
    """The whole matrix of a DTensor (FSDP's shard of it: an all-gather); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_rows(full, p):
    """Of the whole matrix `full`, the part that `p` (a DTensor: FSDP's shard) holds on this rank, as a DTensor
    placed as p is (sliced locally, no communication); for a plain p, full itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(p, DTensor):
        return full
    return distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)


def _buffer(work, name, shape, dtype, device):
    """work[name] if it has this shape, else a new one (kept in work when given)."""
    t = None if work is None else work.get(name)
    if t is None or t.shape != shape:
        t = torch.empty(shape, dtype=dtype, device=device)
        if work is not None:
            work[name] = t
    return t


def _bmm_gram(x, out):
    return torch.bmm(x, x.mT, out=out)


def _triton_gram(x, out):
    from nanogpt_kernels.triton.ns_gram import ns_gram
    return ns_gram(x, out=out)


GRAMS = {"torch": _bmm_gram, "triton": _triton_gram}


def gram_backend(x, work=None):
    """Which of GRAMS computes the X·Xᵀ of stacks shaped like x: on CUDA with Triton, measure_gram's verdict,
    once per shape (work keeps it); elsewhere, or without work, torch."""
    if work is not None and "gram_backend" in work:
        return work["gram_backend"]
    from nanogpt_kernels import registry
    if work is None or not x.is_cuda or registry.backend_unavailable("triton", "cuda") is not None:
        return "torch"
    work["gram_backend"] = measure_gram(x, functools.partial(_time_gram, device=x.device))
    return work["gram_backend"]


def _time_gram(runs, device):
    """{name: ms} of each runner, timed in turns as the measured auto times its kernels (the fastest run)."""
    import nanogpt_kernels.autotune as kernel_autotune
    timed = kernel_autotune.round_robin(runs, device, 0.2)
    return {name: fastest for name, (fastest, _) in timed.items()}


def measure_gram(x, time_runs):
    """'triton' or 'torch' for x's X·Xᵀ. The Triton kernel (kernels/triton/ns_gram.py: the upper triangle of
    tiles only) is checked against a float64 product (within 2x torch.bmm's error, the kernel tests' budget),
    then both are timed on x itself (time_runs({name: fn}) -> {name: ms}): Triton is kept only when at least 3%
    faster, as the measured auto keeps a kernel. One line says the choice; a warning says why Triton was
    dropped if it raised or disagreed."""
    from nanogpt_kernels.contract import within_budget
    choice = "torch"
    try:
        ref = torch.bmm(x.double(), x.double().mT)
        ok, err, tol = within_budget(GRAMS["triton"](x, None), GRAMS["torch"](x, None), ref, x.dtype)
        if not ok:
            raise RuntimeError(f"off by {err:.3g} from float64 (budget {tol:.3g})")
        out = torch.empty(ref.shape, dtype=x.dtype, device=x.device)
        ms = time_runs({name: (lambda f=f: f(x, out)) for name, f in GRAMS.items()})
        if ms["triton"] <= 0.97 * ms["torch"]:
            choice = "triton"
        why = f"triton {ms['triton']:.3f} ms, torch.bmm {ms['torch']:.3f} ms"
    except Exception as e:  # noqa: BLE001 - any failure of the kernel: bmm, said once
        warnings.warn(f"muon: the Triton X·Xᵀ kernel dropped for {tuple(x.shape)}: {type(e).__name__}: {e}")
        why = "triton dropped"
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"muon: X·Xᵀ of {tuple(x.shape)} {x.dtype} on {choice} ({why})", flush=True)
    return choice


def newton_schulz(x, ns_steps, work=None):
    """torch.optim.Muon's _zeropower_via_newtonschulz over a (k, rows, cols) bf16 stack of wide (rows <= cols)
    matrices at once (wide_bf16_stack): each divided by its own norm, then ns_steps quintic steps. x is
    overwritten. work: a dict kept across calls that holds the iterations' buffers, and then the result (valid
    until the next call with it): at GPT-2's shapes a fresh buffer per product is 14-56 MB of fresh memory,
    faulted in page by page on a CPU each time, which made the batched step slower than torch's one by one."""
    a, b, c = DEFAULT_A, DEFAULT_B, DEFAULT_C
    k, rows, _ = x.shape
    y = _buffer(work, "y", x.shape, x.dtype, x.device)
    gram, poly = (_buffer(work, name, (k, rows, rows), x.dtype, x.device) for name in ("gram", "poly"))
    gram_of = GRAMS[gram_backend(x, work)]
    x.div_(x.flatten(1).norm(dim=1).clamp(min=EPS)[:, None, None])
    for _ in range(ns_steps):
        gram_of(x, gram)
        torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=poly)
        torch.baddbmm(x, poly, x, beta=a, out=y)
        x, y = y, x
    return x


def wide_bf16_stack(mats, shape, n, device, work=None):
    """The (n, short side, long side) bf16 stack of same-shaped matrices that newton_schulz takes (in `work`'s
    buffer when given): each one rounded to bf16 and transposed if tall in one copy, as torch.optim.Muon rounds
    and transposes it. No fp32 stack is made, and the products run on contiguous memory (on a transposed view
    they ran at half speed on a CPU). Slots past len(mats) are zeros (a DDP rank short of a matrix: they stay
    zero)."""
    rows, cols = shape
    tall = rows > cols
    x = _buffer(work, "stack", (n, min(rows, cols), max(rows, cols)), torch.bfloat16, device)
    for i, m in enumerate(mats):
        x[i].copy_(m.bfloat16().mT if tall else m)  # a transposing copy runs faster in bf16 than from fp32
    x[len(mats):].zero_()
    return x, tall


def orthogonalize(updates, ns_steps, work=None):
    """The Newton-Schulz of each update, batched by shape; under DDP rank r computes the r-th, (r + world)-th, ...
    of each shape's matrices and one all-gather per shape brings the others' (the same result on every rank).
    work: newton_schulz's; the results may be views of it, valid until the next call with it."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    out, pending, buckets = [None] * len(updates), [], {}
    for i, u in enumerate(updates):
        buckets.setdefault(tuple(u.shape), []).append(i)
    for shape, idx in buckets.items():
        share = math.ceil(len(idx) / world)
        mine = [updates[i] for i in idx[rank::world]]
        # a tall shape's stack is its transpose's: each shape has its own buffers, its result lives there
        ws = None if work is None else work.setdefault(shape, {})
        stack, tall = wide_bf16_stack(mine, shape, share, updates[idx[0]].device, ws)
        result = newton_schulz(stack, ns_steps, ws)
        if tall:
            result = result.mT
        if world == 1:
            for i, o in zip(idx, result):
                out[i] = o
            continue
        gathered = [torch.empty_like(result) for _ in range(world)]
        pending.append((dist.all_gather(gathered, result.contiguous(), async_op=True), idx, gathered))
    for work, idx, gathered in pending:
        work.wait()
        for j, i in enumerate(idx):
            out[i] = gathered[j % world][j // world]
    return out
