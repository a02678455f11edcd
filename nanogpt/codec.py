"""Text <-> token ids for sampling and tests, matching what `nanogpt-prepare` wrote.

A data dir with a meta.json or meta.pkl is char-level (nanoGPT's convention); anything else is GPT-2 BPE.
meta.pkl is read by an unpickler that builds nothing but dicts, strings and ints, so it cannot run code.
"""
import json
import os
import pickle
from functools import lru_cache


@lru_cache(maxsize=None)
def gpt2():
    """tiktoken's GPT-2 encoding, cached per process (loading it parses a 50k-entry BPE table)."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline without a cache: say how to fix it rather than dump a network traceback
        raise RuntimeError(f"could not load tiktoken's gpt2 encoding ({type(e).__name__}: {e}); "
                           "it needs network access once, or TIKTOKEN_CACHE_DIR pointing at its cached files") from e


def char_codec(stoi, itos):
    """(encode, decode) for a char vocab; unknown characters are an error naming them, not a bare KeyError."""
    def encode(s):
        try:
            return [stoi[c] for c in s]
        except KeyError:
            bad = sorted(set(s) - set(stoi))
            raise ValueError(f"{len(bad)} character(s) not in the {len(stoi)}-char vocab: {''.join(bad)!r}") from None

    def decode(ids):
        return "".join(itos[int(i)] for i in ids)
    return encode, decode


def meta_json(chars):
    """meta.json's text for a char vocab (ids in list order): what read_meta prefers to meta.pkl."""
    return json.dumps({"vocab_size": len(chars), "itos": list(chars)})


class _PlainUnpickler(pickle.Unpickler):
    """Builds only what pickle's own opcodes build (dicts, lists, strings, numbers...): a pickle that names any
    function or class is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}")


def _load_meta(path):
    """The parsed meta.json (its itos list made a dict, stoi added) or meta.pkl, unchecked."""
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        if isinstance(meta, dict) and isinstance(meta.get("itos"), list):
            meta["itos"] = dict(enumerate(meta["itos"]))
            meta["stoi"] = {c: i for i, c in meta["itos"].items()}
        return meta
    with open(path, "rb") as f:
        return _PlainUnpickler(f).load()


def _is_map(value, key_type, value_type):
    return isinstance(value, dict) and all(isinstance(k, key_type) and isinstance(v, value_type)
                                           for k, v in value.items())


def read_meta(data_dir):
    """{'vocab_size', 'stoi', 'itos'} of a char-level data_dir (its meta.json, else nanoGPT's meta.pkl), None when
    it has neither; a one-line DataError when the file is malformed or its pickle would run code."""
    from nanogpt.data import DataError
    path = next((p for p in (os.path.join(data_dir, n) for n in ("meta.json", "meta.pkl")) if os.path.exists(p)), None)
    if path is None:
        return None
    fix = (f"re-create it with `nanogpt-prepare shakespeare_char --data_dir {data_dir}` "
           "(or delete it for GPT-2 BPE data)")
    try:
        meta = _load_meta(path)
    except pickle.UnpicklingError as e:
        if str(e).startswith("it names "):
            raise DataError(f"{path} is refused: {e}, which a vocabulary never needs and which could run code "
                            f"(nothing in it was run); {fix}") from None
        raise DataError(f"{path} is corrupt ({e}); {fix}") from None
    except Exception as e:  # unreadable, not JSON, a truncated pickle, ...
        raise DataError(f"{path} is unreadable ({type(e).__name__}: {e}); {fix}") from None
    ok = (isinstance(meta, dict) and isinstance(meta.get("vocab_size"), int) and _is_map(meta.get("stoi"), str, int)
          and _is_map(meta.get("itos"), int, str))
    if not ok:
        raise DataError(f"{path} is not a character vocabulary (a dict of vocab_size, stoi and itos); {fix}")
    return meta


def load_codec(data_dir=None):
    """(encode, decode) for data_dir: its char vocabulary (read_meta) when it has one, else GPT-2 BPE.

    encode lets "<|endoftext|>" through as the EOT token, as nanoGPT's sample.py does for prompts.
    """
    meta = read_meta(data_dir) if data_dir is not None else None
    if meta is not None:
        return char_codec(meta["stoi"], meta["itos"])
    enc = gpt2()
    return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})), (lambda ids: enc.decode([int(i) for i in ids]))
