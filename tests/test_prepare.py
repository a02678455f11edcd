"""nanogpt-prepare: nanoGPT-identical outputs, round trips, crash safety and CLI errors (CPU, offline)."""
import json
import os
import pickle
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

# tiktoken's GPT-2 files live in ../shared beside the repo (no network here or in CI)
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(__file__).resolve().parents[2] / "shared/data/tiktoken_cache"))

from nanogpt import prepare as P  # noqa: E402
from nanogpt.codec import gpt2, load_codec, read_meta  # noqa: E402

TEXT = P.SHAKESPEARE.read_text(encoding="utf-8")
EOT = 50256


def tokens(d, split):
    return np.fromfile(Path(d) / f"{split}.bin", dtype=np.uint16)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "nanogpt.prepare", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_shakespeare_char_matches_nanogpt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default data_dir is data/NAME relative to cwd
    m = P.prepare("shakespeare_char")
    d = tmp_path / "data/shakespeare_char"
    train, val = tokens(d, "train"), tokens(d, "val")
    assert (len(train), len(val)) == (1_003_854, 111_540)
    assert m["vocab_size"] == 65 and m["files"]["train.bin"]["tokens"] == 1_003_854
    # byte-identical to nanoGPT's data/shakespeare_char/prepare.py
    chars = sorted(set(TEXT))
    stoi = {c: i for i, c in enumerate(chars)}
    ref = np.array([stoi[c] for c in TEXT], dtype=np.uint16)
    n = int(len(TEXT) * 0.9)
    assert np.array_equal(train, ref[:n]) and np.array_equal(val, ref[n:])
    with open(d / "meta.pkl", "rb") as f:
        meta = pickle.load(f)
    assert meta == {"vocab_size": 65, "itos": dict(enumerate(chars)), "stoi": stoi}
    # the same vocabulary as JSON, which is what we read
    assert json.loads((d / "meta.json").read_text()) == {"vocab_size": 65, "itos": chars} and read_meta(d) == meta
    encode, decode = load_codec(d)
    assert decode(np.concatenate([train, val])) == TEXT
    assert decode(encode(TEXT[:1000])) == TEXT[:1000]
    assert P.is_prepared(d, verify=True) and P.check_prepared(d)["name"] == "shakespeare_char"


def test_shakespeare_bpe_matches_nanogpt(tmp_path):
    d = tmp_path / "shk"
    m = P.prepare("shakespeare", d)
    train, val = tokens(d, "train"), tokens(d, "val")
    assert (len(train), len(val)) == (301_966, 36_059) and m["vocab_size"] == 50257
    assert not (d / "meta.pkl").exists() and not (d / "meta.json").exists()
    encode, decode = load_codec(d)  # no meta -> GPT-2 BPE
    n = int(len(TEXT) * 0.9)
    assert decode(train) == TEXT[:n] and decode(val) == TEXT[n:]
    assert list(train[:100]) == gpt2().encode_ordinary(TEXT[:n])[:100]
    assert encode("hi<|endoftext|>")[-1] == EOT  # sampling prompts may contain EOT


def write_docs(tmp_path):
    """Three .txt documents and a .jsonl of five (with an extra field), some non-ASCII."""
    docs = ["First document.\nWith two lines.\n", "Second — ünïcödé ✓", "third\n\n\nblank lines"]
    paths = []
    for i, doc in enumerate(docs):
        paths.append(tmp_path / f"doc{i}.txt")
        paths[-1].write_text(doc, encoding="utf-8")
    rows = [{"text": f"json row {i}: " + "word " * i, "id": i} for i in range(5)]
    paths.append(tmp_path / "rows.jsonl")
    paths[-1].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths, docs + [r["text"] for r in rows]


def split_docs(ids):
    """Documents of a split: every document ends in exactly one EOT, so split on them."""
    assert len(ids) and ids[-1] == EOT
    cuts = np.flatnonzero(ids == EOT)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [gpt2().decode(ids[s:e].tolist()) for s, e in zip(starts, cuts)]


def test_openwebtext_local_files(tmp_path):
    paths, docs = write_docs(tmp_path)
    d = tmp_path / "owt"
    argv = ["openwebtext", "--files", *map(str, paths), "--data_dir", str(d), "--num_proc", "2",
            "--val_size", "2", "--cache_dir", str(tmp_path / "hf")]
    assert P.main(argv) == 0
    mtime = (d / "train.bin").stat().st_mtime_ns
    assert P.main(argv) == 0 and (d / "train.bin").stat().st_mtime_ns == mtime  # re-run skips
    train, val = split_docs(tokens(d, "train")), split_docs(tokens(d, "val"))
    assert (len(train), len(val)) == (6, 2)
    assert Counter(train + val) == Counter(docs)  # every document exactly once, EOT after each
    m = P.read_manifest(d)
    assert m["files"]["val.bin"]["tokens"] == len(tokens(d, "val")) and m["vocab_size"] == 50257
    assert P.is_prepared(d, verify=True)
    # a fractional val_size rounds up to at least one document; the seed makes the split reproducible
    d2 = tmp_path / "owt2"
    P.prepare("openwebtext", d2, files=paths[-1:], val_size=0.1, seed=1, num_proc=1, cache_dir=tmp_path / "hf")
    assert len(split_docs(tokens(d2, "val"))) == 1


def test_openwebtext_text_field_and_errors(tmp_path, capsys):
    rows = tmp_path / "rows.json"
    rows.write_text("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(4)), encoding="utf-8")
    kw = dict(num_proc=1, cache_dir=tmp_path / "hf", val_size=1)
    with pytest.raises(ValueError, match="--text_field"):
        P.prepare("openwebtext", tmp_path / "a", files=[rows], **kw)
    P.prepare("openwebtext", tmp_path / "b", files=[rows], text_field="body", **kw)
    assert sorted(split_docs(tokens(tmp_path / "b", "train")) + split_docs(tokens(tmp_path / "b", "val"))) == \
        [f"doc {i}" for i in range(4)]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        P.prepare("openwebtext", tmp_path / "c", files=[empty], **kw)
    with pytest.raises(ValueError, match="need at least 1 in train"):
        P.prepare("openwebtext", tmp_path / "c", files=[rows], text_field="body", num_proc=1, val_size=4)
    assert not P.is_prepared(tmp_path / "c")


def test_missing_datasets_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    assert P.main(["openwebtext", "--data_dir", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "pip install datasets" in err and err.count("\n") == 1


def test_rerun_skips_and_force_redoes(tmp_path, capsys):
    d = tmp_path / "sc"
    assert P.main(["shakespeare_char", "--data_dir", str(d)]) == 0
    before = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in d.iterdir()}
    t0 = time.perf_counter()
    assert P.main(["shakespeare_char", "--data_dir", str(d)]) == 0
    assert time.perf_counter() - t0 < 1.0
    assert "skipping" in capsys.readouterr().out
    assert {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in d.iterdir()} == before
    # other settings into the same dir: refused, not silently overwritten
    other = tmp_path / "other.txt"
    other.write_text("abcabcabcabc\n")
    assert P.main(["shakespeare_char", "--data_dir", str(d), "--input", str(other)]) == 1
    assert "--force" in capsys.readouterr().err and P.read_manifest(d)["vocab_size"] == 65
    assert P.main(["shakespeare_char", "--data_dir", str(d), "--input", str(other), "--force"]) == 0
    assert P.read_manifest(d)["vocab_size"] == 4 and load_codec(d)[1](tokens(d, "train")) == "abcabcabcab"
    # switching a dir to BPE drops the stale char-level meta.pkl (else the codec would misread it)
    P.prepare("shakespeare", d, force=True)
    assert not (d / "meta.pkl").exists() and not (d / "meta.json").exists() and load_codec(d)[1](tokens(d, "val")) == TEXT[int(len(TEXT) * 0.9):]


KILL_AFTER = """
import os, signal, sys
import nanogpt.prepare as P
when, target = sys.argv[1], sys.argv[2]
real_commit, real_write = P._commit, P._write_file
def commit(tmp, path):  # die right after `target` is renamed into place
    real_commit(tmp, path)
    if when == "after" and path.name == target: os.kill(os.getpid(), signal.SIGKILL)
def write_file(path, data):  # die halfway through writing `target`'s temporary file
    if when == "during" and path.name == target:
        with open(path.with_name(path.name + ".tmp"), "wb") as f: f.write(data[:len(data) // 2]); f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_write(path, data)
P._commit, P._write_file = commit, write_file
P.main(sys.argv[3:])
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.parametrize("when,target", [("during", "train.bin"), ("after", "train.bin"), ("after", "meta.pkl")])
def test_interrupted_run_is_detected_and_rebuilt(tmp_path, when, target):
    d = tmp_path / "data/shakespeare_char"
    r = subprocess.run([sys.executable, "-c", KILL_AFTER, when, target, "shakespeare_char", "--data_dir", str(d)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    assert (d / ("train.bin.tmp" if when == "during" else "train.bin")).exists()
    assert not P.is_prepared(d)
    with pytest.raises(FileNotFoundError, match="nanogpt-prepare shakespeare_char"):
        P.check_prepared(d)
    assert P.main(["shakespeare_char", "--data_dir", str(d)]) == 0  # no --force needed
    assert P.is_prepared(d, verify=True) and len(tokens(d, "train")) == 1_003_854
    assert not list(d.glob("*.tmp"))


def test_killed_rebuild_invalidates_old_outputs(tmp_path):
    """--force over complete outputs, killed midway: the old manifest must not vouch for new files."""
    d = tmp_path / "sc"
    P.prepare("shakespeare_char", d)
    r = subprocess.run([sys.executable, "-c", KILL_AFTER, "after", "train.bin", "shakespeare_char",
                        "--data_dir", str(d), "--force"], capture_output=True, text=True, timeout=120)
    assert r.returncode == -9 and not P.is_prepared(d)


def test_corrupt_outputs_are_not_prepared(tmp_path):
    d = tmp_path / "sc"
    P.prepare("shakespeare_char", d)
    with open(d / "val.bin", "r+b") as f:  # same size, different bytes: only verify=True sees it
        f.write(b"\xff\xff")
    assert P.is_prepared(d) and not P.is_prepared(d, verify=True)
    with open(d / "train.bin", "r+b") as f:  # truncated
        f.truncate(100)
    assert not P.is_prepared(d)
    (d / "prepare.json").write_text("{not json")
    assert not P.is_prepared(d)


def test_check_prepared_names_the_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data/shakespeare_char/train.bin not found: "
                                                r"run `nanogpt-prepare shakespeare_char` first"):
        P.check_prepared("data/shakespeare_char")
    with pytest.raises(FileNotFoundError, match=r"run `nanogpt-prepare shakespeare --data_dir data/foo` first"):
        P.check_prepared("data/foo", "shakespeare")
    with pytest.raises(FileNotFoundError, match=r"nanogpt-prepare \{shakespeare_char\|shakespeare\|openwebtext\|fineweb\}"):
        P.check_prepared("data/foo")
    with pytest.raises(FileNotFoundError, match=r"no token shards in data/fineweb: run `nanogpt-prepare fineweb` first"):
        P.check_prepared("data/fineweb")


def test_cli_subprocess(tmp_path):
    r = run_cli("shakespeare_char", "--data_dir", tmp_path / "sc")
    assert r.returncode == 0 and "1,003,854" in r.stdout, r.stderr
    assert P.is_prepared(tmp_path / "sc")
    r = run_cli("shakespeare_char", cwd=tmp_path)  # default: data/NAME under the cwd
    assert r.returncode == 0 and P.is_prepared(tmp_path / "data/shakespeare_char")
    r = run_cli("tinystories", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert all(n in r.stderr for n in ("shakespeare_char", "shakespeare", "openwebtext", "fineweb"))
    r = run_cli("shakespeare_char", "--input", tmp_path / "missing.txt", "--data_dir", tmp_path / "m")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "missing.txt" in r.stderr


def test_bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        P.prepare("shakespeare_char", tmp_path / "e", input_file=tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        P.prepare("shakespeare_char", tmp_path / "e", input_file=tmp_path / "latin1.txt")
    with pytest.raises(ValueError, match="--input"):
        P.prepare("shakespeare", tmp_path / "e", files=["x.txt"])
    with pytest.raises(ValueError, match="unknown dataset"):
        P.prepare("shakespeare-char", tmp_path / "e")
    P.prepare("shakespeare_char", tmp_path / "sc")
    encode, _ = load_codec(tmp_path / "sc")
    with pytest.raises(ValueError, match="not in the 65-char vocab"):
        encode("naïve ✓")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_killed_fineweb_run_is_incomplete_and_rebuilt(tmp_path):
    """Shards a killed run left are whole (each is renamed into place), but the set is not: the trainer refuses
    it, and the next run rebuilds it without --force."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(40)), encoding="utf-8")
    d = tmp_path / "fw"
    argv = ["fineweb", "--files", str(rows), "--data_dir", str(d), "--shard_size", "200", "--num_proc", "1",
            "--cache_dir", str(tmp_path / "hf")]
    r = subprocess.run([sys.executable, "-c", KILL_AFTER, "after", "fineweb_train_000002.bin", *argv],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    assert (d / "fineweb_train_000002.bin").exists() and not (d / "fineweb_train_000003.bin").exists()
    assert not P.is_prepared(d)
    with pytest.raises(FileNotFoundError, match=f"{d} is incomplete.*nanogpt-prepare fineweb --data_dir {d}"):
        P.check_prepared(d, "fineweb")
    assert P.main(argv) == 0 and P.is_prepared(d, verify=True) and len(P.read_manifest(d)["files"]) > 3


def test_unloadable_openwebtext_names_fineweb(tmp_path, monkeypatch, capsys):
    import datasets

    def load_dataset(*a, **kw):  # what datasets >= 4 says for openwebtext's loading script
        raise RuntimeError("Dataset scripts are no longer supported, but found openwebtext.py")
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert P.main(["openwebtext", "--data_dir", str(tmp_path / "owt")]) == 1
    err = capsys.readouterr().err
    assert "Dataset scripts are no longer supported" in err and "nanogpt-prepare fineweb" in err
    assert err.count("\n") == 1
