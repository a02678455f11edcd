"""Crash-safe checkpoints.

Layout of an out_dir:

    checkpoints/iter_000250.model.pt   weights + model args + iter (what sampling/export needs)
    checkpoints/iter_000250.state.pt   optimizer, GradScaler, RNG and sampler states, best val loss, config
    latest.json                        {"iter": 250, "model": "...", "state": "..."}
    best.json                          same format, the checkpoint with the best val loss so far

(parallelism=fsdp writes sharded checkpoints instead, one directory each: see nanogpt.dcp; they load here too,
consolidated.)

Every file is written to a temporary name in the same directory, fsynced and
renamed into place; the pointer files (latest.json, best.json) are replaced
last. A crash or kill -9 at any moment leaves the previous pointers and the
files they name intact. Files no pointer names (and temp files a killed
process left behind) are deleted after a save.

An out_dir of nanoGPT's (one ckpt.pt: model, model_args, optimizer, iter_num,
best_val_loss, config) loads too, as the latest checkpoint until a run of ours
saves beside it; ckpt.pt itself is never written.

No file we load runs code: torch.load(weights_only=True) takes only tensors and
plain Python, and each payload is checked for the keys and types it must have,
so a hostile or malformed file is a one-line error.

Also here: loading a model's weights (load_model_state) and OpenAI's GPT-2 or
a Hugging Face directory (load_pretrained), with one-line errors.
"""
import dataclasses
import json
import os
import re
import shutil
from pickle import UnpicklingError

import numpy as np
import torch

from nanogpt.errors import UserError

POINTERS = ("latest", "best")
NANOGPT_FILE = "ckpt.pt"  # nanoGPT's out_dir: this one file


class CheckpointError(UserError, ValueError):
    pass


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write):
    """write(f) into a temp file beside `path`, fsync, rename over `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(os.path.dirname(path) or ".")


def save(out_dir, iter_num, model_payload, state_payload, best=False):
    """Write one checkpoint and point latest.json (and best.json when `best`) at it."""
    entry = {"iter": iter_num,
             "model": f"checkpoints/iter_{iter_num:06d}.model.pt",
             "state": f"checkpoints/iter_{iter_num:06d}.state.pt"}
    try:
        os.makedirs(os.path.join(out_dir, "checkpoints"), exist_ok=True)
        for key, payload in (("model", model_payload), ("state", state_payload)):
            atomic_write(os.path.join(out_dir, entry[key]), lambda f, p=payload: torch.save(p, f))
        write_pointers(out_dir, entry, best, collect=False)
    except (OSError, RuntimeError) as e:  # disk full, permissions, ... (torch.save raises RuntimeError)
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot write the iter {iter_num} checkpoint to {out_dir} ({why}): free disk space "
                              "or fix the directory, then resume; earlier checkpoints are intact") from None
    _collect_garbage(out_dir)
    return entry


def write_pointers(out_dir, entry, best, collect=True):
    """Point latest.json (and best.json when `best`) at the checkpoint `entry` names, whose files are in place;
    then delete what no pointer names."""
    for name in ("latest", "best") if best else ("latest",):
        atomic_write(os.path.join(out_dir, f"{name}.json"), lambda f: f.write(json.dumps(entry).encode()))
    if collect:
        _collect_garbage(out_dir)


def _read_pointer(out_dir, which):
    path = os.path.join(out_dir, f"{which}.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}); delete it to start over, "
                              f"or point it at a file in {out_dir}/checkpoints") from None


def _collect_garbage(out_dir):
    keep = set()
    for which in POINTERS:
        try:
            entry = _read_pointer(out_dir, which)
            if entry:
                keep.update(os.path.basename(entry[k]) for k in ("model", "state", "dcp") if k in entry)
        except (CheckpointError, TypeError, KeyError):  # a pointer we can't read: delete nothing
            return
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    mine = f".tmp{os.getpid()}"
    stale = [os.path.join(ckpt_dir, n) for n in os.listdir(ckpt_dir) if n not in keep and not n.endswith(mine)]
    stale += [os.path.join(out_dir, n) for n in os.listdir(out_dir)  # a killed pointer write
              if n.startswith(tuple(f"{p}.json.tmp" for p in POINTERS)) and not n.endswith(mine)]
    for path in stale:  # unreferenced checkpoints, and another pid's temp files: a killed save
        if os.path.isdir(path):  # a sharded checkpoint (nanogpt.dcp), or its killed save
            shutil.rmtree(path, ignore_errors=True)
            continue
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def exists(out_dir):
    """Whether out_dir holds a checkpoint: ours (latest.json) or nanoGPT's ckpt.pt."""
    return any(os.path.exists(os.path.join(out_dir, name)) for name in ("latest.json", NANOGPT_FILE))


def latest_iter(out_dir):
    """The iteration of out_dir's latest checkpoint (None if there is none)."""
    entry = _read_pointer(out_dir, "latest")
    if entry is None and os.path.exists(os.path.join(out_dir, NANOGPT_FILE)):
        return load(out_dir, with_state=False)[0].get("iter_num")
    return entry.get("iter") if isinstance(entry, dict) else None


FIX = "restore it, point latest.json at another checkpoint (e.g. copy best.json over it), or use a new out_dir"

# Checkpoints written before loading became weights-only hold numpy's RNG state, an ndarray of uint32. These
# globals rebuild such an array and nothing else (its contents still go through the weights-only unpickler);
# _reconstruct under both module names, as numpy 1 and numpy 2 pickle it.
_reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
LEGACY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                  (_reconstruct, "numpy.core.multiarray._reconstruct"),
                  (_reconstruct, "numpy._core.multiarray._reconstruct")]
# what torch's weights-only unpickler names when it refuses a file: a global (a function or class) or an object
_REFUSED = re.compile(r"GLOBAL (\S+)|but got (<class '[^']+'>)")
REFUSED = "which no checkpoint needs and which could run code (nothing in it was run)"


def refused(e):
    """What torch.load(weights_only=True) refused to build, when that is why it raised e (else None)."""
    m = _REFUSED.search(str(e)) if isinstance(e, UnpicklingError) else None
    return m and (m.group(1) or m.group(2))


def _load_file(path):
    try:
        with torch.serialization.safe_globals(LEGACY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing: {FIX}") from None
    except Exception as e:  # truncated zip, bad pickle, a pickle that would run code...
        if refused(e):
            raise CheckpointError(f"checkpoint file {path} is refused: it holds {refused(e)}, {REFUSED}; get the "
                                  "checkpoint again from a source you trust, or use a new out_dir") from None
        first = str(e).strip().splitlines()[0].split(". ")[0][:120] if str(e).strip() else ""
        why = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt ({why}): {FIX}") from None


# the keys each payload must hold (and the optional ones we read), with their types
LOSS = (int, float, torch.Tensor)  # nanoGPT saves its best val loss as a 0-d tensor
MODEL_SCHEMA = {"model": dict, "model_args": dict}
STATE_SCHEMA = {"optimizer": dict, "iter_num": int, "best_val_loss": LOSS, "ranks": list}
NANOGPT_STATE_SCHEMA = {"optimizer": dict, "iter_num": int, "best_val_loss": LOSS}  # for resuming, not sampling
OPTIONAL = {"iter_num": int, "config": dict, "best_val_loss": LOSS, "scaler": dict, "skipped": int, "kernels": dict}


def _model_arg_types():
    """What a checkpoint's model args may be: GPTConfig's fields and types, but the per-run backend selector."""
    from nanogpt.model import GPTConfig
    return {f.name: (int, float) if f.type is float else f.type for f in dataclasses.fields(GPTConfig)
            if f.name != "kernels"}


def _check(path, payload, required):
    """payload, or a one-line CheckpointError unless it is a dict with the required keys and every key we read of
    its type: str -> tensor weights, known model args, an optimizer state_dict's two parts."""
    def malformed(why):
        return CheckpointError(f"checkpoint file {path} is malformed ({why}): {FIX}")

    def of_type(value, types):  # a bool is no number; a tensor stands for a number only when it holds one
        return (isinstance(value, types) and (types is bool or not isinstance(value, bool))
                and (not torch.is_tensor(value) or value.numel() == 1))
    if not isinstance(payload, dict):
        raise malformed(f"it holds {type(payload).__name__}, not a dict")
    missing = [k for k in required if k not in payload]
    if missing:
        raise malformed(f"no {missing[0]!r}")
    for key, types in (OPTIONAL | required).items():
        if key in payload and not of_type(payload[key], types):
            raise malformed(f"{key!r} has type {type(payload[key]).__name__}")
    if "model" in required:
        bad = next((k for k, v in payload["model"].items() if not (isinstance(k, str) and torch.is_tensor(v))), None)
        if bad is not None:
            raise malformed(f"model entry {bad!r} is not a named tensor")
        arg_types = _model_arg_types()
        for key, value in payload["model_args"].items():
            if key not in arg_types:
                raise malformed(f"unknown model arg {key!r}")
            if not of_type(value, arg_types[key]):
                raise malformed(f"model arg {key!r} has type {type(value).__name__}")
    if "optimizer" in required:
        opt = payload["optimizer"]
        if not (isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)
                and all(isinstance(g, dict) for g in opt["param_groups"])):
            raise malformed("'optimizer' is not an optimizer state_dict")
    return payload


def _from_nanogpt(ckpt, with_state):
    """nanoGPT's ckpt.pt as our (model payload, state payload or None). The state has no RNG or sampler states
    (nanoGPT saves none; the run is seeded afresh, as nanoGPT's resume does) and keeps only the optimizer's
    hyperparameters, not how nanoGPT's machine ran it (fused, foreach, ...: the resuming run's own)."""
    model = {k: v for k, v in clean_state_dict(ckpt["model"]).items()
             if not k.endswith(".attn.bias")}  # the causal-mask buffer nanoGPT keeps without flash attention
    margs = {"gelu": "none"} | ckpt["model_args"]  # nanoGPT's MLP is nn.GELU(): the exact erf form
    extra = {k: ckpt[k] for k in ("iter_num", "config") if k in ckpt}
    if not with_state:
        return {"model": model, "model_args": margs} | extra, None
    optimizer = {"state": ckpt["optimizer"]["state"],
                 "param_groups": [{k: g[k] for k in ("lr", "betas", "eps", "weight_decay", "params") if k in g}
                                  for g in ckpt["optimizer"]["param_groups"]]}
    state_payload = {"optimizer": optimizer, "best_val_loss": float(ckpt["best_val_loss"])} | extra
    return {"model": model, "model_args": margs} | extra, state_payload


def load(out_dir, which="latest", with_state=True, sharded=False):
    """Load (model_payload, state_payload or None) on the CPU, whatever device saved it. An out_dir with nanoGPT's
    ckpt.pt and no latest.json of ours loads that file, converted to our payloads (the state has no "ranks").
    A sharded checkpoint (parallelism=fsdp's, nanogpt.dcp) is consolidated into whole tensors; sharded=True
    leaves its weights and optimizer state to nanogpt.dcp.load_sharded (an FSDP run loading its own shards)."""
    entry = _read_pointer(out_dir, which)
    nanogpt_path = os.path.join(out_dir, NANOGPT_FILE)
    if entry is None and _read_pointer(out_dir, "latest") is None and os.path.exists(nanogpt_path):
        required = MODEL_SCHEMA | (NANOGPT_STATE_SCHEMA if with_state else {})
        return _from_nanogpt(_check(nanogpt_path, _load_file(nanogpt_path), required), with_state)
    if entry is None:
        raise CheckpointError(f"no checkpoint in {out_dir} ({which}.json not found); "
                              "train first, or check --out_dir")
    if isinstance(entry, dict) and isinstance(entry.get("dcp"), str):  # sharded (parallelism=fsdp)
        from nanogpt import dcp
        return dcp.read(out_dir, entry, with_state, tensors=not sharded)
    if not isinstance(entry, dict) or not {"model", "state"} <= set(entry):
        raise CheckpointError(f"{os.path.join(out_dir, which + '.json')} is corrupt (no model/state entries); "
                              f"delete it to start over, or point it at a file in {out_dir}/checkpoints")
    path = os.path.join(out_dir, entry["model"])
    model_payload = _check(path, _load_file(path), MODEL_SCHEMA)
    state_payload = None
    if with_state:
        path = os.path.join(out_dir, entry["state"])
        state_payload = _check(path, _load_file(path), STATE_SCHEMA)
    return model_payload, state_payload


def load_pretrained(name_or_path, block_size, override_args):
    """GPT.from_pretrained cropped to block_size (None: its full context); a one-line error when it can't be
    loaded or is too short."""
    from nanogpt.model import GPT

    def cannot(e):
        if refused(e):
            return CheckpointError(f"the pretrained model {name_or_path!r} is refused: its weights hold {refused(e)}, "
                                   f"{REFUSED}; get the model again from a source you trust")
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return CheckpointError(f"cannot load the pretrained model {name_or_path!r} ({why}); check the name or "
                               "directory, and the network or the Hugging Face cache")
    try:
        from transformers import GPT2Config
        n_positions = GPT2Config.from_pretrained(name_or_path).n_positions  # the config only: no weights yet
    except ImportError:
        raise CheckpointError(f"init_from={name_or_path} needs transformers: pip install transformers") from None
    except (OSError, ValueError) as e:
        raise cannot(e) from None
    if block_size is not None and block_size > n_positions:
        raise CheckpointError(f"block_size={block_size} is larger than {name_or_path}'s {n_positions}; "
                              f"use --block_size={n_positions} or less")
    try:
        model = GPT.from_pretrained(name_or_path, override_args)
    except (OSError, ValueError, UnpicklingError) as e:  # UnpicklingError: a .bin that weights-only loading refused
        raise cannot(e) from None
    if block_size is not None:
        model.crop_block_size(block_size)
    return model


def clean_state_dict(state_dict):
    """Strip the `_orig_mod.` prefix torch.compile adds (checkpoints saved from a compiled model)."""
    prefix = "_orig_mod."
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def load_model_state(model, state_dict, source):
    """load_state_dict that names the first disagreeing key instead of dumping them all."""
    state_dict = clean_state_dict(state_dict)
    own = model.state_dict()
    for key, value in own.items():
        if key not in state_dict:
            raise CheckpointError(f"{source}: missing key {key!r}; the checkpoint is from a different model")
        if state_dict[key].shape != value.shape:
            raise CheckpointError(f"{source}: {key} has shape {tuple(state_dict[key].shape)}, the model expects "
                                  f"{tuple(value.shape)}; use the checkpoint's model config (or a new out_dir)")
    extra = sorted(set(state_dict) - set(own))
    if extra:
        raise CheckpointError(f"{source}: unexpected key {extra[0]!r}; the checkpoint is from a different model")
    model.load_state_dict(state_dict)
