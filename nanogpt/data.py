"""Training batches from a prepared dataset: train.bin / val.bin of uint16 token ids, or a directory of llm.c's
token shards (nanogpt.shards: `nanogpt-prepare fineweb`'s, llm.c's, modded-nanogpt's), each split's shards read
as one token sequence.

Two samplers:
- "random" (nanoGPT's): each row starts at a uniformly random offset, with replacement.
- "epoch": the data is cut into block_size windows, shuffled once per epoch and
  dealt out without replacement; DDP ranks take disjoint slices of each global
  batch, so within an epoch no window is seen twice and every one is seen once.
Both draw from their own seeded generator, the same on every rank, whose state
is checkpointed, so a resumed run sees exactly the batches the uninterrupted
run would have, and N ranks with batch B see the rows one process with batch
N*B would.
"""
import copy
import os

import numpy as np
import torch

from nanogpt import shards
from nanogpt.errors import UserError


class DataError(UserError, ValueError):
    pass


class Tokens:
    """One split's tokens as one sequence: its .bin file, or its shards (after their headers) end to end."""

    def __init__(self, name, parts):
        self.name, self.parts = name, [p for p in parts if p[2]]  # [(path, byte offset, tokens)], none empty
        self.starts = np.cumsum([0] + [n for _, _, n in self.parts])

    @classmethod
    def open(cls, data_dir, split):
        path = os.path.join(data_dir, f"{split}.bin")
        if os.path.exists(path):
            return cls(path, [(path, 0, os.path.getsize(path) // 2)])
        files = shards.find(data_dir, split)
        try:
            return cls(os.path.join(data_dir, f"*_{split}_*.bin"), [(f, shards.HEADER_BYTES, shards.read_header(f))
                                                                    for f in files])
        except ValueError as e:
            raise DataError(f"{e}; re-prepare {data_dir} or remove the shard") from None

    def __len__(self):
        return int(self.starts[-1])

    def _map(self, k, maps=None):
        # fresh memmaps per batch (`maps`, kept for one batch's reads) or per read: nanoGPT's fix for memmap's memory
        # growth. One per row cost a batch of the CPU quick start ~1 ms, 5% of its step.
        if maps is not None and k in maps:
            return maps[k]
        path, offset, n = self.parts[k]
        m = np.memmap(path, dtype=np.uint16, mode="r", offset=offset, shape=(n,))
        if maps is not None:
            maps[k] = m
        return m

    def read(self, start, n, maps=None):
        """Tokens start..start+n, across shard boundaries; maps: a dict that one batch's reads share."""
        pieces, k = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while n > 0:
            piece = self._map(k, maps)[start - self.starts[k]:][:n]
            pieces.append(piece)
            start, n, k = start + len(piece), n - len(piece), k + 1
        return np.concatenate(pieces)

    def read_rows(self, starts, n):
        """(len(starts), n) tokens, row r from token starts[r]; one fresh memmap per part for them all."""
        if len(self.parts) == 1:  # one file: one gather
            return self._map(0)[np.asarray(starts)[:, None] + np.arange(n)]
        maps = {}
        return np.stack([self.read(s, n, maps) for s in starts])

    def max(self):
        return max(int(self._map(k).max()) for k in range(len(self.parts)))


def check_data(data_dir, dataset, block_size):
    """(the prepared dataset's manifest or None for another tool's shards, {split: Tokens}); a one-line DataError
    naming the fix if it is missing, incomplete or too short for block_size."""
    from nanogpt.prepare import check_prepared
    try:
        manifest = check_prepared(data_dir, dataset)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(str(e)) from None
    data = {split: Tokens.open(data_dir, split) for split in shards.SPLITS}
    short = min(data.values(), key=len)
    if len(short) < block_size + 1:
        raise DataError(f"{short.name} holds {len(short)} tokens, fewer than block_size+1 = "
                        f"{block_size + 1}; use --block_size={max(1, len(short) - 1)} or less, or prepare more data")
    return manifest, data


class Batcher:
    SCAN_TOKENS = 1 << 26  # datasets up to this size are scanned for out-of-vocabulary ids up front

    def __init__(self, data_dir, dataset, block_size, batch_size, vocab_size, device, sampler="random",
                 seed=1337, rank=0, world_size=1):
        manifest, self.data = check_data(data_dir, dataset, block_size)
        if sampler not in ("random", "epoch"):
            raise DataError(f"sampler must be 'random' or 'epoch', got {sampler!r}")
        data_vocab = manifest.get("vocab_size") if isinstance(manifest, dict) else None
        if isinstance(data_vocab, int) and data_vocab > vocab_size:
            raise DataError(f"{data_dir} was prepared with vocab_size {data_vocab} but the model has {vocab_size}; "
                            "use a model with a large enough vocabulary or re-prepare the data with its tokenizer")
        for split, tokens in self.data.items():  # cheap for small datasets; big ones are checked batch by batch
            if len(tokens) <= self.SCAN_TOKENS:
                self._check_vocab(tokens.max(), split, vocab_size)
        self.block_size, self.batch_size, self.vocab_size = block_size, batch_size, vocab_size
        self.device = torch.device(device)
        self.sampler, self.rank, self.world_size, self.seed = sampler, rank, world_size, seed
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch, self.pos, self.order = 0, 0, None

    def _check_vocab(self, top, split, vocab_size):
        if top >= vocab_size:
            raise DataError(f"{self.data[split].name} holds token id {top} >= the model's vocab_size {vocab_size}; "
                            "re-prepare the data with the model's tokenizer (or train a model with a larger vocab)")

    def _starts(self, split, n_tokens, gen):
        """Row start offsets for this rank. Every rank draws the whole global batch (batch_size x world_size
        rows) alike and keeps its own slice, so N ranks see exactly the rows one process would see."""
        n_rows = self.batch_size * self.world_size
        if self.sampler == "random" or split != "train" or gen is not self.gen:
            ix = torch.randint(n_tokens - self.block_size, (n_rows,), generator=gen)
        else:  # epoch: block_size windows, shuffled anew each epoch, each dealt out once
            starts = []
            while len(starts) < n_rows:
                if self.order is None:
                    n_windows = (n_tokens - 1) // self.block_size
                    g = torch.Generator().manual_seed(self.seed + 7919 * self.epoch)
                    self.order = torch.randperm(n_windows, generator=g) * self.block_size
                take = self.order[self.pos:self.pos + n_rows - len(starts)]
                starts.extend(take.tolist())
                self.pos += len(take)
                if self.pos >= len(self.order):
                    self.epoch, self.pos, self.order = self.epoch + 1, 0, None
            ix = torch.tensor(starts)
        return ix[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def get_batch(self, split, gen=None):
        """(x, y) on the device; `gen` lets evaluation draw without touching the training stream."""
        data = self.data[split]
        ix = self._starts(split, len(data), gen or self.gen)
        rows = torch.from_numpy(data.read_rows(ix.numpy(), self.block_size + 1).astype(np.int64))
        x, y = rows[:, :-1], rows[:, 1:]
        self._check_vocab(int(rows.max()), split, self.vocab_size)
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def rows(self, state, n):
        """The row start offsets (token offsets in the train split) of the next n global batches the sampler draws
        from `state` (a state_dict()): every rank's rows, as one process would draw them. This sampler is left as
        it is."""
        other = copy.copy(self)
        other.batch_size, other.rank, other.world_size = self.batch_size * self.world_size, 0, 1
        other.gen = torch.Generator()
        other.load_state_dict(state)
        return [other._starts("train", len(self.data["train"]), other.gen).tolist() for _ in range(n)]

    def state_dict(self):
        return {"gen": self.gen.get_state(), "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])
        self.epoch, self.pos, self.order = state["epoch"], state["pos"], None  # order is rebuilt from epoch
