"""llm.c's token shards: written byte by byte from the format's description they load as they are; `nanogpt-prepare
fineweb` writes them from local parquet/jsonl files, and the trainer trains on them (CPU, offline)."""
import json
import struct
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanogpt import prepare as P
from nanogpt.codec import gpt2
from nanogpt.data import Batcher, DataError, check_data

EOT = 50256


def write_shard(path, tokens, magic=20240520, version=1, count=None):
    """A shard as llm.c's fineweb.py describes it: 256 int32 (magic, version, token count, zeros), then uint16."""
    head = struct.pack("<256i", magic, version, len(tokens) if count is None else count, *[0] * 253)
    path.write_bytes(head + struct.pack(f"<{len(tokens)}H", *tokens))


def read_shard(path):
    """(header ints, tokens) parsed with struct, independently of nanogpt.shards."""
    data = path.read_bytes()
    head = struct.unpack("<256i", data[:1024])
    return head, list(struct.unpack(f"<{(len(data) - 1024) // 2}H", data[1024:]))


@pytest.fixture
def llmc_dir(tmp_path):
    """modded-nanogpt's layout: fineweb_val_000000.bin, then train shards (one empty), no manifest."""
    rng = np.random.default_rng(0)
    split_tokens = {"val": [rng.integers(0, 50257, 70).tolist()],
                    "train": [rng.integers(0, 50257, n).tolist() for n in (50, 0, 37, 61)]}
    index = 0
    for split, parts in split_tokens.items():
        for tokens in parts:
            write_shard(tmp_path / f"fineweb_{split}_{index:06d}.bin", tokens)
            index += 1
    return tmp_path, {s: sum(parts, []) for s, parts in split_tokens.items()}


def test_llmc_shards_load_as_one_sequence(llmc_dir):
    d, want = llmc_dir
    manifest, data = check_data(d, "fineweb", block_size=16)
    assert manifest is None  # another tool's shards: no manifest, headers checked instead
    for split in ("train", "val"):
        assert len(data[split]) == len(want[split])
        assert data[split].read(0, len(want[split])).tolist() == want[split]
    assert data["train"].read(45, 10).tolist() == want["train"][45:55]  # across a shard (and the empty one)
    B, T = 8, 16
    batcher = Batcher(d, "fineweb", T, B, 50304, "cpu", seed=3)
    x, y = batcher.get_batch("train")
    ix = torch.randint(len(want["train"]) - T, (B,), generator=torch.Generator().manual_seed(3))
    train = torch.tensor(want["train"])
    assert torch.equal(x, torch.stack([train[i:i + T] for i in ix])) and torch.equal(y, torch.stack([train[i + 1:i + 1 + T] for i in ix]))
    # one shard (val): the batch is one gather from one memmap, past the shard's header
    gen = torch.Generator().manual_seed(5)
    x, y = batcher.get_batch("val", gen)
    ix = torch.randint(len(want["val"]) - T, (B,), generator=torch.Generator().manual_seed(5))
    val = torch.tensor(want["val"])
    assert torch.equal(x, torch.stack([val[i:i + T] for i in ix])) and torch.equal(y, torch.stack([val[i + 1:i + 1 + T] for i in ix]))


@pytest.mark.parametrize("kw,why", [(dict(magic=20240521), "not an llm.c token shard"),
                                    (dict(version=2), "version 2"),
                                    (dict(count=99), "truncated")])
def test_bad_shards_are_one_line_errors(llmc_dir, kw, why):
    d, _ = llmc_dir
    write_shard(d / "fineweb_train_000002.bin", list(range(10)), **kw)
    with pytest.raises(DataError, match=why) as e:
        check_data(d, "fineweb", block_size=16)
    assert "fineweb_train_000002.bin" in str(e.value) and "\n" not in str(e.value)


def write_docs(tmp_path):
    docs = [f"Document {i}: " + "the quick brown fox " * (i % 5) + "ünï ✓" * (i % 2) for i in range(120)]
    pq.write_table(pa.table({"text": docs[:80], "id": list(range(80))}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[80:]), encoding="utf-8")
    return [tmp_path / "a.parquet", tmp_path / "b.jsonl"], docs


def test_prepare_fineweb_writes_llmc_shards(tmp_path, capsys):
    files, docs = write_docs(tmp_path)
    d = tmp_path / "fw"
    m = P.prepare("fineweb", d, files=files, shard_size=300, num_proc=2, cache_dir=tmp_path / "hf")
    # llm.c's stream: EOT before each document; json files come before parquet ones
    stream = [t for doc in docs[80:] + docs[:80] for t in [EOT, *gpt2().encode_ordinary(doc)]]
    names = sorted(m["files"], key=lambda n: n[-10:])
    assert names[0] == "fineweb_val_000000.bin" and all(n.startswith("fineweb_train_") for n in names[1:])
    got = []
    for i, name in enumerate(names):
        head, tokens = read_shard(d / name)
        assert head[:3] == (20240520, 1, len(tokens)) and not any(head[3:])
        assert len(tokens) == (300 if i < len(names) - 1 else len(stream) - 300 * i)
        got += tokens
    assert got == stream and len(names) == -(-len(stream) // 300)
    assert P.is_prepared(d, verify=True) and P.check_prepared(d)["vocab_size"] == 50257
    # the same settings skip; other settings are refused without --force
    assert P.prepare("fineweb", d, files=files, shard_size=300, num_proc=1) == m and "skipping" in capsys.readouterr().out
    with pytest.raises(ValueError, match="shard_size: 300 -> 500"):
        P.prepare("fineweb", d, files=files, shard_size=500, num_proc=1)
    with pytest.raises(ValueError, match="lower --shard_size"):
        P.prepare("fineweb", tmp_path / "one", files=files, shard_size=len(stream), num_proc=1)


def test_prepare_refuses_to_overwrite_foreign_shards(llmc_dir):
    d, _ = llmc_dir
    files = sorted(p.name for p in d.iterdir())
    with pytest.raises(ValueError, match="did not write"):
        P.prepare("fineweb", d, files=[d / "fineweb_val_000000.bin"], num_proc=1)
    assert sorted(p.name for p in d.iterdir()) == files


def test_prepare_then_train(tmp_path):
    files, _ = write_docs(tmp_path)
    assert P.main(["fineweb", "--files", *map(str, files), "--shard_size", "500", "--num_proc", "2",
                   "--data_dir", str(tmp_path / "data/fineweb"), "--cache_dir", str(tmp_path / "hf")]) == 0
    r = subprocess.run([sys.executable, "-m", "nanogpt.train", "--dataset=fineweb", "--n_layer=1", "--n_head=2",
                        "--n_embd=16", "--block_size=16", "--batch_size=4", "--gradient_accumulation_steps=1",
                        "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--device=cpu", "--dtype=float32",
                        "--compile=False", "--kernels=torch", "--out_dir=out"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 2: train loss" in r.stdout and "saved checkpoint at iter 2" in r.stdout
