"""llm.c's token shard format, which modded-nanogpt and build-nanogpt's FineWeb shards share.

A shard is a header of 256 little-endian int32 (magic 20240520, version 1, the token count, the rest zero),
then the tokens as little-endian uint16. A directory of shards holds NAME_val_NNNNNN.bin and
NAME_train_NNNNNN.bin; the shards of a split, in name order, are one token sequence.
"""
import glob
import os

import numpy as np

MAGIC, VERSION = 20240520, 1
HEADER_BYTES = 256 * 4
SPLITS = ("train", "val")


def header(n_tokens):
    """The header bytes of a shard of n_tokens tokens."""
    h = np.zeros(256, dtype="<i4")
    h[:3] = MAGIC, VERSION, n_tokens
    return h.tobytes()


def read_header(path):
    """The token count of the shard at path; a ValueError naming the problem when it is not a whole shard."""
    with open(path, "rb") as f:
        h = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    size = os.path.getsize(path)
    if len(h) < 3 or h[0] != MAGIC:
        raise ValueError(f"{path} is not an llm.c token shard (no magic {MAGIC} in its header)")
    if h[1] != VERSION:
        raise ValueError(f"{path} is an llm.c shard of version {h[1]}; only version {VERSION} (uint16 GPT-2 "
                         "tokens) is read")
    if size != HEADER_BYTES + 2 * int(h[2]):
        raise ValueError(f"{path} is truncated or padded: its header says {h[2]} tokens ({HEADER_BYTES + 2 * h[2]} "
                         f"bytes), the file has {size} bytes")
    return int(h[2])


def name(prefix, split, index):
    return f"{prefix}_{split}_{index:06d}.bin"


def find(data_dir, split):
    """The shard files of split in data_dir, in order."""
    return sorted(glob.glob(os.path.join(glob.escape(str(data_dir)), f"*_{split}_*.bin")))
