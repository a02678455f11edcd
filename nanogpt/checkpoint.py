"""Crash-safe checkpoints.

Layout of an out_dir:

    checkpoints/iter_000250.model.pt   weights + model args + iter (what sampling/export needs)
    checkpoints/iter_000250.state.pt   optimizer, GradScaler, RNG and sampler states, best val loss, config
    latest.json                        {"iter": 250, "model": "...", "state": "..."}
    best.json                          same format, the checkpoint with the best val loss so far

Every file is written to a temporary name in the same directory, fsynced and
renamed into place; the pointer files (latest.json, best.json) are replaced
last. A crash or kill -9 at any moment leaves the previous pointers and the
files they name intact. Files no pointer names (and temp files a killed
process left behind) are deleted after a save.

Also here: loading a model's weights (load_model_state) and OpenAI's GPT-2 or
a Hugging Face directory (load_pretrained), with one-line errors.
"""
import json
import os

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
        for name in ("latest", "best") if best else ("latest",):
            atomic_write(os.path.join(out_dir, f"{name}.json"), lambda f: f.write(json.dumps(entry).encode()))
    except (OSError, RuntimeError) as e:  # disk full, permissions, ... (torch.save raises RuntimeError)
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot write the iter {iter_num} checkpoint to {out_dir} ({why}): free disk space "
                              "or fix the directory, then resume; earlier checkpoints are intact") from None
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
        try:
            entry = _read_pointer(out_dir, which)
            if entry:
                keep.update(os.path.basename(entry[k]) for k in ("model", "state"))
        except (CheckpointError, TypeError, KeyError):  # a pointer we can't read: delete nothing
            return
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    mine = f".tmp{os.getpid()}"
    stale = [os.path.join(ckpt_dir, n) for n in os.listdir(ckpt_dir) if n not in keep and not n.endswith(mine)]
    stale += [os.path.join(out_dir, n) for n in os.listdir(out_dir)  # a killed pointer write
              if n.startswith(tuple(f"{p}.json.tmp" for p in POINTERS)) and not n.endswith(mine)]
    for path in stale:  # unreferenced checkpoints, and another pid's temp files: a killed save
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def exists(out_dir):
    return os.path.exists(os.path.join(out_dir, "latest.json"))


def latest_iter(out_dir):
    """The iteration of out_dir's latest checkpoint (None if there is none)."""
    entry = _read_pointer(out_dir, "latest")
    return entry.get("iter") if isinstance(entry, dict) else None


FIX = "restore it, point latest.json at another checkpoint (e.g. copy best.json over it), or use a new out_dir"


def _load_file(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing: {FIX}") from None
    except Exception as e:  # truncated zip, bad pickle, ...
        first = str(e).strip().splitlines()[0].split(". ")[0][:120] if str(e).strip() else ""
        why = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt ({why}): {FIX}") from None


def load(out_dir, which="latest", with_state=True):
    """Load (model_payload, state_payload or None) on the CPU, whatever device saved it."""
    entry = _read_pointer(out_dir, which)
    if entry is None:
        raise CheckpointError(f"no checkpoint in {out_dir} ({which}.json not found); "
                              "train first, or check --out_dir")
    if not isinstance(entry, dict) or not {"model", "state"} <= set(entry):
        raise CheckpointError(f"{os.path.join(out_dir, which + '.json')} is corrupt (no model/state entries); "
                              f"delete it to start over, or point it at a file in {out_dir}/checkpoints")
    model_payload = _load_file(os.path.join(out_dir, entry["model"]))
    state_payload = _load_file(os.path.join(out_dir, entry["state"])) if with_state else None
    for path, payload, keys in ((entry["model"], model_payload, ("model", "model_args")),
                                (entry["state"], state_payload, ("optimizer", "iter_num", "ranks"))):
        if payload is not None and not (isinstance(payload, dict) and set(keys) <= set(payload)):
            raise CheckpointError(f"checkpoint file {os.path.join(out_dir, path)} is not a nanogpt checkpoint "
                                  "(missing keys); restore it or start over in a new out_dir")
    return model_payload, state_payload


def load_pretrained(name_or_path, block_size, override_args):
    """GPT.from_pretrained cropped to block_size (None: its full context); a one-line error when it can't be
    loaded or is too short."""
    from nanogpt.model import GPT

    def cannot(e):
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
    except (OSError, ValueError) as e:
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
