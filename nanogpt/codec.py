"""Text <-> token ids for sampling and tests, matching what `nanogpt-prepare` wrote.

A data dir with a meta.pkl is char-level (nanoGPT's convention); anything else is GPT-2 BPE.
"""
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


def load_codec(data_dir=None):
    """(encode, decode) for data_dir: its meta.pkl when present (char-level), else GPT-2 BPE.

    encode lets "<|endoftext|>" through as the EOT token, as nanoGPT's sample.py does for prompts.
    """
    meta_path = os.path.join(data_dir, "meta.pkl") if data_dir is not None else None
    if meta_path is not None and os.path.exists(meta_path):
        with open(meta_path, "rb") as f:
            meta = pickle.load(f)
        return char_codec(meta["stoi"], meta["itos"])
    enc = gpt2()
    return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})), (lambda ids: enc.decode([int(i) for i in ids]))
