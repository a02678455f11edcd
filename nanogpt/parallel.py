"""How the model is spread over the ranks (`parallelism`) and what its blocks keep for backward
(`activation_checkpointing`).

- ddp: every rank holds the whole model, its gradients and AdamW's moments (DistributedDataParallel).
- fsdp: FSDP2's `fully_shard` on each transformer block, then on the root (embeddings, final LayerNorm,
  lm_head): parameters, gradients and optimizer state are sharded over the ranks and each block's weights are
  gathered just before it runs. Our kernels run inside the blocks on the gathered (plain) tensors, so every
  backend works unchanged. With gradient accumulation the micro-steps before the last neither reduce-scatter
  nor reshard (like DDP's no_sync): one all-gather and one reduce-scatter per step, at the cost of holding the
  gathered weights and full gradients during the step.
- activation_checkpointing=block recomputes each block's forward in backward; selective keeps the outputs of
  the matmuls and of attention (whose softmax stays inside its fused kernel) and recomputes the cheap ops
  (LayerNorm, GELU, adds, views).
"""
import functools

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from nanogpt.errors import UserError
from nanogpt_kernels import registry

PARALLELISMS = ("ddp", "fsdp")
ACTIVATION_CHECKPOINTING = ("none", "block", "selective")


def check(c):
    """One-line errors for settings these modes refuse."""
    if c["parallelism"] not in PARALLELISMS:
        raise UserError(f"unknown parallelism {c['parallelism']!r}; use ddp or fsdp")
    if c["activation_checkpointing"] not in ACTIVATION_CHECKPOINTING:
        raise UserError(f"unknown activation_checkpointing {c['activation_checkpointing']!r}; use none, block or "
                        "selective")
    if c["parallelism"] == "fsdp" and c["dtype"] == "float16":
        raise UserError("parallelism=fsdp does not run float16 (its GradScaler needs whole gradients); use "
                        "--dtype=bfloat16 or float32")
    if c["async_checkpoint"] and c["parallelism"] != "fsdp":
        raise UserError("async_checkpoint=True saves through torch.distributed.checkpoint, which the trainer uses "
                        "with parallelism=fsdp; pass --parallelism=fsdp or --async_checkpoint=False")


# ------------------------------------------------------------ activation checkpointing

_SAVED_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def _keep_matmuls(ctx, op, *args, **kwargs):
    """Selective checkpointing's policy: keep matmul and attention outputs (ours are custom ops named
    *attention*), recompute everything else."""
    keep = op in _SAVED_OPS or "attention" in str(op)
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(forward, mode, x, kv=None, rotary=None):
    if kv is not None or not torch.is_grad_enabled():  # generation, evaluation: nothing to recompute
        return forward(x, kv, rotary)
    context_fn = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls) if mode == "selective" \
        else None
    return checkpoint(forward, x, None, rotary, use_reentrant=False,
                      **({"context_fn": context_fn} if context_fn else {}))


def checkpoint_activations(model, mode):
    """Make each block of `model` recompute its activations in backward (mode block or selective). The
    parameters keep their names: checkpoints are the same with or without it."""
    if mode == "none":
        return
    for block in model.transformer.h:
        block.forward = functools.partial(_checkpointed, block.forward, mode)


# ------------------------------------------------------------ FSDP

def shard(model, proc, dtype, compile_blocks):
    """fully_shard each block (compiled first when asked), then the root, over all ranks. bfloat16 runs the
    parameters and compute in bf16 and reduces gradients in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(proc.device_type, (proc.world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if dtype == "bfloat16" else None,
                              reduce_dtype=torch.float32)
    with torch.no_grad():  # every rank keeps its shard of rank 0's weights (each rank seeded its own init)
        for t in model.state_dict().values():
            dist.broadcast(t, 0)
    for block in model.transformer.h:
        if compile_blocks:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def sync_gradients(model, sync):
    """Before a micro-step's backward: whether it reduces the gradients (the last micro-step of an update)."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = sync
    elif hasattr(model, "set_requires_gradient_sync"):  # an FSDPModule
        model.set_requires_gradient_sync(sync)
        model.set_reshard_after_backward(sync)


def _dtensor_step_error(cls, mesh):
    """Why the optimizer class `cls` cannot step a sharded (DTensor) parameter, or None when it can."""
    from torch.distributed.tensor import DTensor, Shard
    p = torch.nn.Parameter(DTensor.from_local(torch.zeros(2), mesh, [Shard(0)]))
    p.grad = DTensor.from_local(torch.ones(2), mesh, [Shard(0)])
    try:
        cls([{"params": [p], "weight_decay": 0.0}], lr=1e-3, max_grad_norm=1.0).step()
    except (NotImplementedError, RuntimeError, TypeError) as e:
        return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return None


def fsdp_optimizer(model, make, log):
    """make(): the model's AdamW (model.configure_optimizers) over its sharded parameters. A backend whose
    kernel cannot take DTensors is announced and replaced by torch's AdamW; step() returns the global
    gradient norm as a plain tensor."""
    from torch.distributed.tensor import DTensor
    backend = model.backends["adamw"]
    if backend != "torch":
        mesh = next(model.parameters()).device_mesh
        why = _dtensor_step_error(registry.get("adamw", backend), mesh)
        if why:
            log(f"adamw: the {backend} backend cannot step FSDP's sharded parameters ({why}); using torch's AdamW")
            model.set_backends(model.backends | {"adamw": "torch"})
    optimizer = make()
    step = optimizer.step

    def global_norm_step(closure=None):
        norm = step(closure)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm
    optimizer.step = global_norm_step
    return optimizer


def shard_optimizer_state(optimizer):
    """After load_state_dict of a whole (DDP or single-process) optimizer state: cut each sharded parameter's
    moments to this rank's shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    for p, state in optimizer.state.items():
        if isinstance(p, DTensor):
            for k, v in state.items():
                if torch.is_tensor(v) and not isinstance(v, DTensor) and v.shape == p.shape:
                    state[k] = distribute_tensor(v, p.device_mesh, p.placements)


def init_single_process_group(backend):
    """FSDP without torchrun: a process group of one, so fully_shard and DCP run as they do under torchrun."""
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
