"""Training batches from a prepared dataset (train.bin / val.bin of uint16 token ids).

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
import os

import numpy as np
import torch

from nanogpt.errors import UserError


class DataError(UserError, ValueError):
    pass


def check_data(data_dir, dataset, block_size):
    """The prepared dataset's manifest; a one-line DataError naming the fix if it is missing, incomplete or
    too short for block_size."""
    from nanogpt.prepare import check_prepared
    try:
        manifest = check_prepared(data_dir, dataset)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(str(e)) from None
    paths = {split: os.path.join(data_dir, f"{split}.bin") for split in ("train", "val")}
    sizes = {split: os.path.getsize(path) // 2 for split, path in paths.items()}
    short = min(sizes, key=sizes.get)
    if sizes[short] < block_size + 1:
        raise DataError(f"{paths[short]} holds {sizes[short]} tokens, fewer than block_size+1 = "
                        f"{block_size + 1}; use --block_size={max(1, sizes[short] - 1)} or less, or prepare more data")
    return manifest


class Batcher:
    SCAN_TOKENS = 1 << 26  # datasets up to this size are scanned for out-of-vocabulary ids up front

    def __init__(self, data_dir, dataset, block_size, batch_size, vocab_size, device, sampler="random",
                 seed=1337, rank=0, world_size=1):
        manifest = check_data(data_dir, dataset, block_size)
        if sampler not in ("random", "epoch"):
            raise DataError(f"sampler must be 'random' or 'epoch', got {sampler!r}")
        self.paths = {split: os.path.join(data_dir, f"{split}.bin") for split in ("train", "val")}
        data_vocab = manifest.get("vocab_size") if isinstance(manifest, dict) else None
        if isinstance(data_vocab, int) and data_vocab > vocab_size:
            raise DataError(f"{data_dir} was prepared with vocab_size {data_vocab} but the model has {vocab_size}; "
                            "use a model with a large enough vocabulary or re-prepare the data with its tokenizer")
        for split, path in self.paths.items():  # cheap for small datasets; big ones are checked batch by batch
            if os.path.getsize(path) // 2 <= self.SCAN_TOKENS:
                self._check_vocab(self._tokens(split), split, vocab_size)
        self.block_size, self.batch_size, self.vocab_size = block_size, batch_size, vocab_size
        self.device = torch.device(device)
        self.sampler, self.rank, self.world_size, self.seed = sampler, rank, world_size, seed
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch, self.pos, self.order = 0, 0, None

    def _check_vocab(self, tokens, split, vocab_size):
        top = int(tokens.max())
        if top >= vocab_size:
            raise DataError(f"{self.paths[split]} holds token id {top} >= the model's vocab_size {vocab_size}; "
                            "re-prepare the data with the model's tokenizer (or train a model with a larger vocab)")

    def _tokens(self, split):
        # a fresh memmap per batch: nanoGPT's fix for memmap's memory growth
        return np.memmap(self.paths[split], dtype=np.uint16, mode="r")

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
        data = self._tokens(split)
        ix = self._starts(split, len(data), gen or self.gen)
        x = torch.from_numpy(np.stack([data[i:i + self.block_size] for i in ix.tolist()]).astype(np.int64))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + self.block_size] for i in ix.tolist()]).astype(np.int64))
        self._check_vocab(y, split, self.vocab_size)  # y covers x but for its first token
        self._check_vocab(x[:, :1], split, self.vocab_size)
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def state_dict(self):
        return {"gen": self.gen.get_state(), "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])
        self.epoch, self.pos, self.order = state["epoch"], state["pos"], None  # order is rebuilt from epoch
