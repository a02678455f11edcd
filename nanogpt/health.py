"""Training health: what each logged step's record holds besides the loss (every log_interval, into
metrics.jsonl, wandb, and TensorBoard with tensorboard=True), and loss-spike events.

    grad_norm              the global gradient norm, before clipping
    grad_norm/<layer>      per layer: wte (tied to lm_head), wpe, h.0 ... h.<n_layer-1>, ln_f
    update_ratio/<group>   |update| / |weights| of the step, per AdamW group: decay (matmuls, embeddings) and
                           no_decay (biases, LayerNorms); None when the step was skipped
    clipped                whether grad_clip clipped this step's gradient
    skipped                steps skipped over a non-finite loss or gradient, in all
    tokens_per_s, mfu      throughput; MFU on CUDA only (a CPU has no peak to divide by)
    peak_mem_mb            the CUDA allocator's peak, or on the CPU the process's peak RSS (rank 0's)

A loss above mean + spike_k standard deviations of the last spike_window logged losses is also logged as
    {"iter": N, "event": "spike", "loss": ..., "mean": ..., "std": ..., "rows": [[...], ...]}
where rows are the token offsets in the train split of each micro-step's global batch (every rank's rows), so
the batch can be found again. Spikes stay out of the window, and a resumed run refills it from metrics.jsonl.
The per-layer norms and update ratios cost one reduction each under FSDP and a copy of the weights (this
rank's shard) on logged steps.
"""
import importlib.util
import json
import math
import os
import resource
import statistics
from collections import deque

import torch
import torch.distributed as dist

from nanogpt.errors import UserError

MIN_WINDOW = 10  # logged losses before spikes are looked for


def check(c):
    if c["tensorboard"] and importlib.util.find_spec("tensorboard") is None:
        raise UserError("tensorboard=True needs the tensorboard package: pip install tensorboard (or drop "
                        "--tensorboard=True)")
    if c["spike_k"] <= 0 or c["spike_window"] < 2:
        raise UserError(f"spike_k must be > 0 and spike_window >= 2, got {c['spike_k']} and {c['spike_window']}")


def tensorboard_writer(out_dir):
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(os.path.join(out_dir, "tensorboard"))


def peak_memory_mb(device_type):
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _layer(name):
    """transformer.h.3.attn.c_attn.weight -> h.3; transformer.wte.weight -> wte."""
    parts = name.split(".")
    if parts[0] != "transformer":
        return parts[0]
    return ".".join(parts[1:3]) if parts[1] == "h" else parts[1]


def _local(t):
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def _squares(tensors_by_key, sharded):
    """{key: the sum of squares of its tensors}, over every rank's shards when sharded (one all_reduce)."""
    keys = list(tensors_by_key)
    sums = torch.stack([sum((_local(t).detach().float().pow(2).sum() for t in tensors_by_key[k]), torch.zeros(()))
                        for k in keys])
    if sharded:
        dist.all_reduce(sums)
    return dict(zip(keys, sums.tolist()))


class Probe:
    """Taken around one optimizer step, on every rank (under FSDP its sums are collectives): the gradient norm
    per layer before the step, the update-to-weight ratio per group after it."""

    def __init__(self, model, optimizer, scaler):
        from torch.distributed.tensor import DTensor
        named = [(n, p) for n, p in model.named_parameters() if p.grad is not None]
        self.sharded = any(isinstance(p, DTensor) for _, p in named)
        layers = {}
        for n, p in named:
            layers.setdefault(_layer(n), []).append(p.grad)
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0  # the gradients are still scaled (float16)
        self.record = {f"grad_norm/{k}": math.sqrt(v) / scale for k, v in _squares(layers, self.sharded).items()}
        self.groups = {("decay" if g["weight_decay"] else "no_decay"): g["params"] for g in optimizer.param_groups}
        self.before = {k: [_local(p).detach().clone() for p in ps] for k, ps in self.groups.items()}

    def finish(self, stepped):
        """The record's health fields; stepped: whether the optimizer updated the weights."""
        deltas = {f"u/{k}": [_local(p) - b for p, b in zip(ps, self.before[k])] for k, ps in self.groups.items()}
        sums = _squares(deltas | {f"w/{k}": v for k, v in self.before.items()}, self.sharded)
        for k in self.groups:
            ratio = math.sqrt(sums[f"u/{k}"]) / max(math.sqrt(sums[f"w/{k}"]), 1e-12)
            self.record[f"update_ratio/{k}"] = ratio if stepped else None
        return self.record


class SpikeDetector:
    """Whether a logged loss spikes: above mean + k std of the window of logged losses before it."""

    def __init__(self, k, window, history=()):
        self.k, self.losses = k, deque(history, maxlen=window)

    def check(self, loss):
        """(mean, std) of the window when `loss` spikes, else None; the loss joins the window unless it does."""
        if len(self.losses) >= min(MIN_WINDOW, self.losses.maxlen):
            mean, std = statistics.fmean(self.losses), statistics.pstdev(self.losses)
            if loss > mean + self.k * std:
                return mean, std
        if math.isfinite(loss):
            self.losses.append(loss)
        return None


def logged_losses(path):
    """The non-spike losses of the step records in a metrics.jsonl, in order (a resumed run's window)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    spikes = {r.get("iter") for r in records if r.get("event") == "spike"}
    return [r["loss"] for r in records if isinstance(r.get("loss"), (int, float)) and "event" not in r
            and r.get("iter") not in spikes and math.isfinite(r["loss"])]
