"""Sharded checkpoints through torch.distributed.checkpoint (DCP): what parallelism=fsdp writes.

    checkpoints/iter_000250/     one directory per checkpoint
        .metadata, __R_0.distcp  DCP: the weights ("model/<name>") and the optimizer state ("optim/<name>/<key>":
                                 AdamW's moments, Muon's momentum),
                                 each rank writing its own shards
        train.pt                 the rest: model args, config, iter, best val loss, every rank's RNG and sampler
                                 states, the optimizer's hyperparameters with each group's parameter names
                                 (rank 0, torch.save of tensors and plain Python)
    latest.json, best.json       {"iter": 250, "dcp": "checkpoints/iter_000250"}

A save is written into iter_000250.tmp and renamed to iter_000250 once complete (DCP writes .metadata last,
after every rank's shards); the pointers move after that. A killed save leaves a .tmp directory that no pointer
names and the next save deletes. With async_checkpoint a background thread copies the tensors to memory, writes
them, renames and moves the pointers; the step loop goes on at once (it waits for train.pt and the ranks'
barrier, logged as checkpoint_ms) and waits for the copy only before the next optimizer step changes the
tensors (an optimizer step pre-hook; logged as checkpoint_staging_ms), so the copy overlaps the next forward and
backward. The next save and the end of the run wait for the write.

An FSDP run resumes by loading its own shards in place, whatever number of ranks wrote them (DCP reshards).
Everything else (a single process, DDP, nanogpt-sample, export) gets whole tensors (`read`, through
nanogpt.checkpoint.load). DCP's .metadata is a pickle: it is read by an unpickler that builds DCP's metadata
classes and nothing else, and only tensors go through DCP (it would pickle anything else), so loading runs no
code.
"""
import os
import pathlib
import pickle
import shutil
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import filesystem as dcp_fs
from torch.distributed.checkpoint import metadata as dcp_md

from nanogpt import checkpoint
from nanogpt.checkpoint import FIX, CheckpointError

TMP = ".tmp"
PLAIN = "train.pt"
_pending = None  # the background save in flight (_Pending)
_group = None  # the process group background saves talk over (not the training loop's)
_copy = None  # the memory background saves copy the tensors into, kept from one save to the next


# ------------------------------------------------------------ reading .metadata without running code

_METADATA_CLASSES = (dcp_md.Metadata, dcp_md.TensorStorageMetadata, dcp_md.TensorProperties,
                     dcp_md.ChunkStorageMetadata, dcp_md.MetadataIndex, dcp_md.StorageMeta, dcp_md._MEM_FORMAT_ENCODING,
                     dcp_fs._StorageInfo, pathlib.PosixPath, pathlib.PurePosixPath, torch.Size)
_ALLOWED = {(c.__module__, c.__qualname__): c for c in _METADATA_CLASSES} | {
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}")
        return _ALLOWED[module, name]


class SafeReader(FileSystemReader):
    """DCP's FileSystemReader, reading .metadata through _MetadataUnpickler; a checkpoint that holds anything
    but tensors is refused (DCP would unpickle it with torch.load(weights_only=False))."""

    def read_metadata(self, *args, **kwargs):
        path = os.path.join(self.path, ".metadata")
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {path} is missing: {FIX}") from None
        except Exception as e:  # truncated, or naming something it must not
            raise CheckpointError(f"checkpoint file {path} is corrupt or refused ({type(e).__name__}: "
                                  f"{str(e)[:120]}): {FIX}") from None
        if not isinstance(metadata, dcp_md.Metadata) or not all(
                isinstance(m, dcp_md.TensorStorageMetadata) for m in metadata.state_dict_metadata.values()):
            raise CheckpointError(f"checkpoint file {path} is malformed (not DCP metadata of tensors): {FIX}")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_md.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ------------------------------------------------------------ saving

def _tensors(model, optimizer):
    """The flat {key: tensor} DCP writes (this rank's shards of DTensors), and each optimizer group's
    hyperparameters with its parameters' names."""
    for m in model.modules():  # the root keeps its weights gathered after a forward (evaluation): reshard
        if hasattr(m, "reshard"):
            m.reshard()
    names = {p: n for n, p in model.named_parameters()}
    out = {f"model/{k}": v for k, v in model.state_dict().items()}
    for p, name in names.items():
        out |= {f"optim/{name}/{k}": v for k, v in optimizer.state.get(p, {}).items()}
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [names[p] for p in g["params"]]}
              for g in optimizer.param_groups]
    return out, groups


@dataclass
class _Pending:
    thread: threading.Thread  # copies the tensors, writes them, then (rank 0) renames and moves the pointers
    staged: threading.Event  # set once the tensors are copied: from then on the optimizer may change them
    hook: object  # the optimizer's step pre-hook that waits for `staged` (removed once it has)
    outcome: dict  # {"error": CheckpointError} when the background save failed
    staging_wait_ms: float | None = None  # how long the optimizer step waited for the copy


def _stage(tensors):
    """Copy the tensors into memory allocated at the first background save and refilled at each one after it
    (pinned on CUDA machines): refilling is faster than allocating anew (page faults), at the cost of that memory
    for the rest of the run. On CUDA the copy runs on the compute stream, ordered after the step before it."""
    global _copy
    from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
    if _copy is None or _copy.keys() != tensors.keys():
        _copy = _create_cpu_state_dict(tensors, pin_memory=torch.cuda.is_available())
    return _copy_state_dict(tensors, _copy)


def _checkpoint_group():
    global _group
    if _group is None:
        _group = dist.new_group(backend="gloo")  # collectives of a background save must not interleave the loop's
    return _group


def save(out_dir, iter_num, model, optimizer, model_payload, state_payload, best=False, background=False):
    """Write iter_num's checkpoint: collective, every rank writes its shards (model_payload and state_payload
    hold the rest, as checkpoint.save's do, without the weights and the optimizer state). background: return at
    once, a thread copies the tensors (the optimizer's next step waits for the copy) and writes them. Returns the
    time the caller waited, in ms."""
    global _pending
    wait()
    t0 = time.perf_counter()
    name = f"checkpoints/iter_{iter_num:06d}"
    tmp, entry = os.path.join(out_dir, name + TMP), {"iter": iter_num, "dcp": name}
    tensors, groups = _tensors(model, optimizer)
    master = dist.get_rank() == 0
    try:
        if master:
            shutil.rmtree(tmp, ignore_errors=True)  # a killed save's
            os.makedirs(tmp)
            plain = {"model": model_payload, "state": state_payload | {"param_groups": groups}}
            checkpoint.atomic_write(os.path.join(tmp, PLAIN), lambda f: torch.save(plain, f))
        dist.barrier()
        if background:
            group = _checkpoint_group()  # (a collective: made here, in the loop's order of collectives)
        else:
            dcp.save(tensors, storage_writer=FileSystemWriter(tmp))
    except (OSError, RuntimeError, dcp.CheckpointException) as e:
        raise _cannot_write(iter_num, out_dir, e) from None
    if not background:
        if master:
            _finish(out_dir, entry, best)
        return (time.perf_counter() - t0) * 1000

    def write():  # in the background: copy, write, then (rank 0) make it the latest checkpoint
        try:
            try:
                staged = _stage(tensors)
            finally:
                pending.staged.set()
            dcp.save(staged, storage_writer=FileSystemWriter(tmp), process_group=group)
            if master:
                _finish(out_dir, entry, best)
                print(f"saved checkpoint at iter {iter_num} to {out_dir}{' (best)' if best else ''} (in the "
                      "background)", flush=True)
        except Exception as e:  # raised by wait(), in the loop
            pending.outcome["error"] = _cannot_write(iter_num, out_dir, e)

    def before_step(*args):  # (returns None: the step's arguments stay as they are)
        wait_staged()
    pending = _Pending(threading.Thread(target=write, daemon=True), threading.Event(), None, {})
    pending.hook = optimizer.register_step_pre_hook(before_step)
    _pending = pending
    pending.thread.start()
    return (time.perf_counter() - t0) * 1000


def _cannot_write(iter_num, out_dir, e):
    why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    return CheckpointError(f"cannot write the iter {iter_num} checkpoint to {out_dir} ({why}): free disk space or "
                           "fix the directory, then resume; earlier checkpoints are intact")


def _finish(out_dir, entry, best):
    """Rank 0, once every rank's shards and .metadata are written: rename the directory into place, move the
    pointers. A directory of that iteration already there (a resumed run re-saving the iteration it resumed
    from: the same state) is kept."""
    final = os.path.join(out_dir, entry["dcp"])
    for path in (final + TMP, os.path.dirname(final)):
        checkpoint._fsync_dir(path)
    if os.path.exists(final):
        shutil.rmtree(final + TMP)
    else:
        os.replace(final + TMP, final)
    checkpoint.write_pointers(out_dir, entry, best)


def wait_staged():
    """Wait until the background save in flight has copied the tensors (the optimizer's step pre-hook: the step
    changes them in place). Records the wait for last_staging_wait()."""
    p = _pending
    if p is None or p.hook is None:
        return
    p.hook.remove()
    p.hook = None
    t0 = time.perf_counter()
    p.staged.wait()
    p.staging_wait_ms = (time.perf_counter() - t0) * 1000


def last_staging_wait():
    """The ms the last optimizer step waited for a background save's copy, once (None: it did not wait)."""
    p = _pending
    if p is None or p.staging_wait_ms is None:
        return None
    ms, p.staging_wait_ms = p.staging_wait_ms, None
    return ms


def wait():
    """Wait for the background save in flight (if any); raise its error here."""
    global _pending
    if _pending is None:
        return
    p = _pending
    p.thread.join()
    if p.hook is not None:  # no optimizer step came (the run ended)
        p.hook.remove()
    _pending = None
    if "error" in p.outcome:
        raise p.outcome["error"]


def close():
    """Before the process group goes: finish the background save, drop the group it used."""
    global _group, _copy
    wait()
    _group = _copy = None


# ------------------------------------------------------------ loading

def _metadata(path):
    reader = SafeReader(path)
    return reader, reader.read_metadata().state_dict_metadata


def _by_index(named, groups):
    """An optimizer state_dict (parameters numbered in group order, as optimizer.state_dict() has them) from the
    moments by parameter name and the groups' hyperparameters with their parameters' names."""
    ids = {name: i for i, name in enumerate(n for g in groups for n in g["params"])}
    return {"state": {ids[n]: s for n, s in named.items() if n in ids},
            "param_groups": [g | {"params": [ids[n] for n in g["params"]]} for g in groups]}


def read(out_dir, entry, with_state=True, tensors=True):
    """(model payload, state payload or None) of a DCP checkpoint, as checkpoint.load returns them, the tensors
    whole (consolidated) on the CPU. tensors=False: the payloads without the weights ("model": None) and the
    optimizer state ("optimizer": None), and "dcp": its directory, which load_sharded reads."""
    path = os.path.join(out_dir, entry["dcp"])
    plain = checkpoint._load_file(os.path.join(path, PLAIN))
    if not (isinstance(plain, dict) and isinstance(plain.get("model"), dict) and isinstance(plain.get("state"), dict)):
        raise CheckpointError(f"checkpoint file {os.path.join(path, PLAIN)} is malformed (no model/state): {FIX}")
    model_payload, state = plain["model"], plain["state"] if with_state else None
    if not tensors:
        return model_payload | {"model": None}, state and state | {"optimizer": None, "dcp": path}
    reader, meta = _metadata(path)
    wanted = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
              if k.startswith("model/") or (with_state and k.startswith("optim/"))}
    try:
        dcp.load(wanted, storage_reader=reader, no_dist=True)
    except (OSError, RuntimeError, dcp.CheckpointException) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({str(e).strip()[:160]}): {FIX}") from None
    model_payload = checkpoint._check(path, model_payload | {
        "model": {k[len("model/"):]: v for k, v in wanted.items() if k.startswith("model/")}}, checkpoint.MODEL_SCHEMA)
    if not with_state:
        return model_payload, None
    named = {}
    for k, v in wanted.items():
        if k.startswith("optim/"):
            name, key = k[len("optim/"):].rsplit("/", 1)
            named.setdefault(name, {})[key] = v
    groups = state.pop("param_groups", [])
    return model_payload, checkpoint._check(path, state | {"optimizer": _by_index(named, groups)},
                                           checkpoint.STATE_SCHEMA)


def load_sharded(state, model, optimizer):
    """Load a DCP checkpoint (state from read(tensors=False)) into this FSDP run in place: the weights into the
    model's shards, and the optimizer state returned as optimizer.state_dict() has it, its moments already this
    rank's shards. Collective."""
    path = state["dcp"]
    groups = state["param_groups"]
    _, own = _tensors(model, optimizer)
    if [g["params"] for g in groups] != [g["params"] for g in own]:
        raise CheckpointError(f"the optimizer state in {path} is for other parameters than this model's: {FIX}")
    reader, meta = _metadata(path)
    sd = {f"model/{k}": v for k, v in model.state_dict().items()}
    named = {}
    for name, p in model.named_parameters():  # a parameter that took a step: its state, as the checkpoint has it
        prefix = f"optim/{name}/"
        keys = [k[len(prefix):] for k in meta if k.startswith(prefix) and "/" not in k[len(prefix):]]
        if keys:  # AdamW's step, exp_avg, exp_avg_sq; Muon's step, momentum_buffer (sharded as p is)
            named[name] = {k: torch.zeros_like(p, dtype=meta[prefix + k].properties.dtype)
                           if tuple(meta[prefix + k].size) == tuple(p.shape)
                           else torch.zeros(meta[prefix + k].size, dtype=meta[prefix + k].properties.dtype)
                           for k in keys}
            sd |= {prefix + k: v for k, v in named[name].items()}
    try:
        dcp.load(sd, storage_reader=reader)
    except (OSError, RuntimeError, dcp.CheckpointException) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this run or is corrupt ({str(e).strip()[:160]}): "
                              f"{FIX}") from None
    model.load_state_dict({k[len("model/"):]: v for k, v in sd.items() if k.startswith("model/")})
    return _by_index(named, groups)
