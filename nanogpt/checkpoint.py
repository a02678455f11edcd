"""Crash-safe checkpoints.

Layout of an out_dir:

    checkpoints/iter_000250.model.pt   weights + model args + iter (what sampling/export needs)
    checkpoints/iter_000250.state.pt   optimizer, GradScaler, RNG and sampler states, best val loss, config
    latest.json                        {"iter": 250, "model": "...", "state": "..."}
    best.json                          same format, the checkpoint with the best val loss so far

Every file is written to a temporary name in the same directory, fsynced and
renamed into place; the pointer files (latest.json, best.json) are replaced
last. A crash or kill -9 at any moment leaves the previous pointers and the
files they name intact. Files no pointer names are deleted after a save.
"""
import json
import os
import time

import torch

from nanogpt.errors import UserError

POINTERS = ("latest", "best")


class CheckpointError(UserError, ValueError):
    pass


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path, write, pause=False):
    """write(f) into a temp file beside `path`, fsync, rename over `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            if pause:  # test hook: lets a test kill -9 the process in the middle of a save
                print(f"pausing inside save of {os.path.basename(path)}", flush=True)
                time.sleep(3600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(os.path.dirname(path) or ".")


def save(out_dir, iter_num, model_payload, state_payload, best=False):
    """Write one checkpoint and point latest.json (and best.json when `best`) at it."""
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    entry = {"iter": iter_num,
             "model": f"checkpoints/iter_{iter_num:06d}.model.pt",
             "state": f"checkpoints/iter_{iter_num:06d}.state.pt"}
    pause = os.environ.get("NANOGPT_TEST_PAUSE_IN_SAVE") == str(iter_num)
    for key, payload in (("model", model_payload), ("state", state_payload)):
        _atomic_write(os.path.join(out_dir, entry[key]), lambda f, p=payload: torch.save(p, f), pause and key == "state")
    for name in ("latest", "best") if best else ("latest",):
        _atomic_write(os.path.join(out_dir, f"{name}.json"), lambda f: f.write(json.dumps(entry).encode()))
    _collect_garbage(out_dir)
    return entry


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
        entry = _read_pointer(out_dir, which)
        if entry:
            keep.update(os.path.basename(entry[k]) for k in ("model", "state"))
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    for name in os.listdir(ckpt_dir):
        if name not in keep and ".tmp" not in name:
            os.remove(os.path.join(ckpt_dir, name))


def exists(out_dir):
    return os.path.exists(os.path.join(out_dir, "latest.json"))


def _load_file(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing; restore it or start with init_from=scratch") from None
    except Exception as e:  # truncated zip, bad pickle, ...
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt ({type(e).__name__}); "
                              "resume from best.json instead (copy it over latest.json) or init_from=scratch") from None


def load(out_dir, which="latest", with_state=True):
    """Load (model_payload, state_payload or None) on the CPU, whatever device saved it."""
    entry = _read_pointer(out_dir, which)
    if entry is None:
        raise CheckpointError(f"no checkpoint in {out_dir} ({which}.json not found); "
                              "train first, or check --out_dir")
    model_payload = _load_file(os.path.join(out_dir, entry["model"]))
    state_payload = _load_file(os.path.join(out_dir, entry["state"])) if with_state else None
    return model_payload, state_payload


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
