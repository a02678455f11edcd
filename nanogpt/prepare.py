"""Data preparation with nanoGPT's data/*/prepare.py semantics: `nanogpt-prepare NAME [--options]`.

Writes data/NAME/{train,val}.bin (uint16 token ids, what nanoGPT's train.py memmaps) and, for
char-level data, meta.pkl ({'vocab_size', 'itos', 'stoi'}, what nanoGPT's sample.py reads) and the same
vocabulary as meta.json ({'vocab_size', 'itos': [chars]}, what we read: JSON runs no code);
`fineweb` writes llm.c's token shards instead (nanogpt.shards), the first one val.

Completion is provable: every file is written to NAME.tmp in the same directory, fsynced and renamed
into place, and a manifest (prepare.json: name, settings, token counts, sizes, sha256) is written
LAST; while a run is under way prepare.json lists no files. Outputs without a matching manifest are
an interrupted run: is_prepared() says False and the next run rebuilds them. With a manifest in
place a re-run skips in milliseconds.
"""
import argparse
import fnmatch
import hashlib
import json
import math
import os
import pickle
import sys
from pathlib import Path

import numpy as np

from nanogpt import shards
from nanogpt.codec import meta_json

DATASETS = ("shakespeare_char", "shakespeare", "openwebtext", "fineweb")
MANIFEST = "prepare.json"
SHAKESPEARE = Path(__file__).resolve().parent / "assets" / "tinyshakespeare.txt"
EOT = 50256  # GPT-2's <|endoftext|>: after every openwebtext document (nanoGPT), before every fineweb one (llm.c)
FINEWEB = ("HuggingFaceFW/fineweb-edu", "sample-10BT")  # llm.c's and modded-nanogpt's GPT-2 data
SHARD_SIZE = 10**8  # tokens per shard, as llm.c's fineweb.py


# -----------------------------------------------------------------------------
# crash-safe writes and the completion manifest

def _fsync_dir(d):
    """Make renames in d durable (POSIX); where a directory can't be opened (Windows) it's a no-op."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(tmp, path):
    """fsync tmp, then rename it over path: after a crash path is absent, old or whole, never a prefix."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_file(path, data):
    """Atomically write bytes to path; returns the manifest entry (size, sha256)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    _commit(tmp, path)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _write_tokens(path, ids):
    """Atomically write token ids as uint16 (nanoGPT's on-disk format); returns the manifest entry."""
    ids = np.asarray(ids)
    assert ids.size == 0 or ids.max() < 2**16, "token id does not fit uint16"
    return {"tokens": int(ids.size), **_write_file(path, ids.astype(np.uint16).tobytes())}


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(data_dir):
    """The parsed prepare.json of data_dir, or None when it is missing or unreadable."""
    try:
        return json.loads((Path(data_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _splits(fnames):
    """The splits that these files hold: train.bin/val.bin, or shards."""
    return {s for s in shards.SPLITS for f in fnames if f == f"{s}.bin" or fnmatch.fnmatch(f, f"*_{s}_*.bin")}


def is_prepared(data_dir, verify=False):
    """True only if the manifest exists and every file it lists has its recorded size (and sha256 with
    verify=True, which reads everything). A train.bin alone proves nothing: it may be a killed run's."""
    m = read_manifest(data_dir)
    if not isinstance(m, dict) or _splits(m.get("files", {})) != set(shards.SPLITS):
        return False
    for fname, info in m["files"].items():
        p = Path(data_dir) / fname
        if not p.is_file() or p.stat().st_size != info["bytes"] or (verify and _sha256(p) != info["sha256"]):
            return False
    return True


def foreign_shards(data_dir):
    """Whether data_dir holds token shards of both splits and no manifest: llm.c's or modded-nanogpt's."""
    return read_manifest(data_dir) is None and all(shards.find(data_dir, s) for s in shards.SPLITS)


def check_prepared(data_dir, name_hint=None):
    """For the trainer: return the manifest (None for another tool's token shards, whose headers are checked as
    they are read), or raise a one-line FileNotFoundError naming the command to run."""
    data_dir = Path(data_dir)
    if is_prepared(data_dir):
        return read_manifest(data_dir)
    if foreign_shards(data_dir):
        return None
    name = name_hint or data_dir.name
    if name in DATASETS:
        cmd = f"nanogpt-prepare {name}" + ("" if data_dir == Path("data") / name else f" --data_dir {data_dir}")
    else:
        cmd = f"nanogpt-prepare {{{'|'.join(DATASETS)}}} --data_dir {data_dir}"
    if (data_dir / "train.bin").exists() or any(shards.find(data_dir, s) for s in shards.SPLITS):
        what = f"{data_dir} is incomplete (no valid {MANIFEST}: an interrupted run, or not made by nanogpt-prepare)"
    elif name == "fineweb":
        what = f"no token shards in {data_dir}"
    else:
        what = f"{data_dir / 'train.bin'} not found"
    raise FileNotFoundError(f"{what}: run `{cmd}` first")


# -----------------------------------------------------------------------------
# the datasets

def _read_text(path):
    """The input text, newlines normalized as nanoGPT's open(path, 'r') does; empty or non-UTF-8 is an error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from None
    if len(text) < 2:
        raise ValueError(f"{path} is empty: nothing to prepare (need at least 2 characters for a train/val split)")
    return text


def _split(text):
    """nanoGPT's split: the first 90% of the characters train, the rest val."""
    n = int(len(text) * 0.9)
    return text[:n], text[n:]


def _prepare_char(data_dir, text):
    """Char-level: vocab = sorted(set(text)) as in nanoGPT (code point order), ids via numpy for speed."""
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    vocab = np.unique(cps)  # sorted code points == sorted(set(text))
    if len(vocab) > 2**16:
        raise ValueError(f"{len(vocab)} distinct characters do not fit uint16 token ids")
    chars = [chr(c) for c in vocab]
    ids = np.searchsorted(vocab, cps)
    n = len(_split(text)[0])
    print(f"length of dataset in characters: {len(text):,}, vocab size: {len(chars)}")
    files = {"train.bin": _write_tokens(data_dir / "train.bin", ids[:n]),
             "val.bin": _write_tokens(data_dir / "val.bin", ids[n:])}
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    files["meta.pkl"] = _write_file(data_dir / "meta.pkl", pickle.dumps(meta))
    files["meta.json"] = _write_file(data_dir / "meta.json", meta_json(chars).encode())
    return files, len(chars)


def _prepare_bpe(data_dir, text):
    """GPT-2 BPE of each half separately, as nanoGPT's shakespeare/prepare.py does."""
    from .codec import gpt2
    enc = gpt2()
    train, val = _split(text)
    files = {"train.bin": _write_tokens(data_dir / "train.bin", enc.encode_ordinary(train)),
             "val.bin": _write_tokens(data_dir / "val.bin", enc.encode_ordinary(val))}
    return files, enc.n_vocab


def _tokenize(example, field):
    """One document -> GPT-2 ids + EOT. Module-level so datasets can ship it to worker processes."""
    from .codec import gpt2
    ids = gpt2().encode_ordinary(example[field] or "")
    ids.append(EOT)
    return {"ids": ids, "len": len(ids)}


def _load_documents(dataset, dataset_config, files, text_field, num_proc, cache_dir, streaming=False):
    """A datasets.Dataset (an IterableDataset when streaming) of documents: local files (a .txt is one
    document; .json/.jsonl/.parquet rows carry text_field) or the train split of a Hugging Face dataset."""
    try:
        import datasets
    except ImportError:
        raise ImportError("openwebtext and fineweb need Hugging Face datasets: pip install datasets") from None
    if files:
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"no such file(s): {', '.join(map(str, missing))}")
        files = [f for f in files if os.path.getsize(f) > 0]  # an empty file holds no document (datasets chokes on it)
        if not files:
            raise ValueError("the given files are all empty: nothing to prepare")
        by_builder = {"text": [], "json": [], "parquet": []}  # this order: the openwebtext split depends on it
        for f in map(str, files):  # also .jsonl.gz
            suffixes = set(Path(f).suffixes)
            builder = "json" if {".json", ".jsonl"} & suffixes else "parquet" if ".parquet" in suffixes else "text"
            by_builder[builder].append(f)
        parts = []
        for builder, data_files in by_builder.items():
            if not data_files:
                continue
            kw = {"sample_by": "document"} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=data_files, split="train", cache_dir=cache_dir,
                                       streaming=streaming, **kw)
            if builder == "text":
                parts.append(ds.rename_column("text", text_field) if text_field != "text" else ds)
                continue
            if text_field not in ds.column_names:
                raise ValueError(f"{', '.join(data_files)}: no {text_field!r} field (have {ds.column_names}); "
                                 "use --text_field")
            parts.append(ds.select_columns([text_field]))
        return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    try:
        if streaming:
            ds = datasets.load_dataset(dataset, dataset_config, split="train", streaming=True, cache_dir=cache_dir)
        else:
            dd = datasets.load_dataset(dataset, dataset_config, num_proc=num_proc, cache_dir=cache_dir)
            ds = dd["train"] if "train" in dd else next(iter(dd.values()))
    except Exception as e:  # recent datasets releases no longer run openwebtext's loading script
        if dataset != "openwebtext":
            raise
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"datasets {datasets.__version__} cannot load openwebtext ({why}); prepare FineWeb-Edu "
                           "instead with `nanogpt-prepare fineweb`, or pass local --files") from None
    if ds.column_names is not None and text_field not in ds.column_names:
        raise ValueError(f"dataset {dataset!r}: no {text_field!r} column (have {ds.column_names}); use --text_field")
    return ds


def _write_split(path, dset):
    """nanoGPT's sharded copy of tokenized documents into one uint16 memmap, hashed as it goes."""
    from tqdm import tqdm
    n_tokens = int(np.sum(dset.with_format("numpy")["len"], dtype=np.uint64))
    tmp = path.with_name(path.name + ".tmp")
    arr = np.memmap(tmp, dtype=np.uint16, mode="w+", shape=(n_tokens,))
    sha, idx = hashlib.sha256(), 0
    total_batches = min(1024, len(dset))  # nanoGPT's 1024, fewer for small data (no empty shards)
    for i in tqdm(range(total_batches), desc=f"writing {path}"):
        batch = dset.shard(num_shards=total_batches, index=i, contiguous=True).with_format("numpy")
        ids = np.concatenate(list(batch["ids"])).astype(np.uint16)
        arr[idx:idx + len(ids)] = ids
        sha.update(ids.tobytes())
        idx += len(ids)
    assert idx == n_tokens
    arr.flush()
    del arr
    _commit(tmp, path)
    return {"tokens": n_tokens, "bytes": 2 * n_tokens, "sha256": sha.hexdigest()}


def _prepare_openwebtext(data_dir, dataset, dataset_config, files, text_field, val_size, seed, num_proc, cache_dir):
    """nanoGPT's openwebtext/prepare.py: shuffle-split documents, tokenize in num_proc processes, EOT each."""
    ds = _load_documents(dataset, dataset_config, files, text_field, num_proc, cache_dir)
    n = len(ds)
    if n == 0:
        raise ValueError(f"{'the given files' if files else repr(dataset)} hold no documents: nothing to prepare")
    n_val = int(val_size) if val_size >= 1 else math.ceil(val_size * n)  # fraction rounds up, as datasets does
    if not 1 <= n_val < n:
        raise ValueError(f"--val_size={val_size} puts {n_val} of {n} documents in val; need at least 1 in train and in val")
    split = ds.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    tokenized = split.map(_tokenize, fn_kwargs={"field": text_field}, remove_columns=ds.column_names,
                          desc="tokenizing the splits", num_proc=num_proc if num_proc > 1 else None)
    files = {"train.bin": _write_split(data_dir / "train.bin", tokenized["train"]),
             "val.bin": _write_split(data_dir / "val.bin", tokenized["test"])}
    return files, EOT + 1


def _encode_doc(text):
    """One document -> EOT + its GPT-2 ids, as llm.c's fineweb.py. Module-level for the tokenizer processes."""
    from .codec import gpt2
    return np.array([EOT, *gpt2().encode_ordinary(text or "")], dtype=np.uint16)


def _prepare_fineweb(data_dir, dataset, dataset_config, files, text_field, shard_size, num_proc, cache_dir):
    """llm.c's fineweb.py: stream the documents, tokenize them in num_proc processes and cut the token stream
    into shards of shard_size tokens (a document may straddle two); the first shard is val, the rest train."""
    from contextlib import nullcontext
    from multiprocessing import Pool

    from tqdm import tqdm
    docs = _load_documents(dataset, dataset_config, files, text_field, num_proc, cache_dir, streaming=True)
    texts = (row[text_field] for row in docs)
    out, buf, n = {}, np.empty(shard_size, dtype=np.uint16), 0
    bar = None

    def write_shard():
        fname = shards.name("fineweb", "val" if not out else "train", len(out))
        out[fname] = {"tokens": n, **_write_file(data_dir / fname, shards.header(n) + buf[:n].tobytes())}

    with Pool(num_proc) if num_proc > 1 else nullcontext() as pool:
        for ids in pool.imap(_encode_doc, texts, chunksize=16) if pool else map(_encode_doc, texts):
            while len(ids):
                if bar is None:
                    bar = tqdm(total=shard_size, unit="tokens", desc=f"shard {len(out)}")
                take = min(shard_size - n, len(ids))
                buf[n:n + take], ids, n = ids[:take], ids[take:], n + take
                bar.update(take)
                if n == shard_size:
                    write_shard()
                    bar.close()
                    bar, n = None, 0
    if n:
        write_shard()
        bar.close()
    if len(out) < 2:
        total = sum(f["tokens"] for f in out.values())
        raise ValueError(f"the documents hold {total:,} tokens, not more than one shard of --shard_size={shard_size:,}"
                         " (the first shard is val, the rest train); lower --shard_size or add documents")
    return out, EOT + 1


# -----------------------------------------------------------------------------

def _counts(files):
    """'train N tokens, val M tokens' over a manifest's files (train.bin/val.bin, or shards)."""
    return ", ".join(f"{split} {sum(info['tokens'] for f, info in files.items() if _splits([f]) == {split}):,} tokens"
                     for split in shards.SPLITS)


def prepare(name, data_dir=None, *, input_file=None, dataset=None, dataset_config=None, files=None,
            text_field="text", val_size=0.0005, seed=2357, num_proc=None, cache_dir=None, shard_size=SHARD_SIZE,
            force=False):
    """Prepare dataset `name` into data_dir (default data/NAME); returns the manifest.

    Skips when data_dir already holds a complete preparation with the same settings; refuses (rather
    than silently destroys, say, a 17 GB openwebtext) when it holds different ones, unless force.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    data_dir = Path(data_dir) if data_dir is not None else Path("data") / name
    if name in ("openwebtext", "fineweb"):
        if input_file is not None:
            raise ValueError(f"--input is for shakespeare/shakespeare_char; {name} takes --files or --dataset")
        if files and dataset:
            raise ValueError("give --files or --dataset, not both")
        files = [str(Path(f).resolve()) for f in files] if files else None
        if name == "fineweb":
            if shard_size < 1:
                raise ValueError(f"--shard_size must be >= 1, got {shard_size}")
            if not dataset and not files:
                dataset, dataset_config = FINEWEB[0], dataset_config or FINEWEB[1]
            split = {"shard_size": shard_size}
        else:
            dataset = dataset or "openwebtext"
            split = {"val_size": int(val_size) if val_size >= 1 else float(val_size), "seed": seed}
        config = {"name": name, "dataset": None if files else dataset, "dataset_config": dataset_config,
                  "files": files, "text_field": text_field, **split}
    else:
        if files or dataset or dataset_config:
            raise ValueError(f"--files/--dataset are for openwebtext and fineweb; {name} takes --input")
        input_file = Path(input_file) if input_file is not None else SHAKESPEARE
        text = _read_text(input_file)
        config = {"name": name, "input_sha256": hashlib.sha256(text.encode()).hexdigest()}

    old = read_manifest(data_dir)
    if not force and is_prepared(data_dir):
        if old.get("config") == config:
            print(f"{data_dir} is already prepared ({_counts(old['files'])}); skipping (--force to redo)")
            return old
        was = old.get("config") or {}
        diff = "; ".join(f"{k}: {was.get(k)!r} -> {config.get(k)!r}" for k in sorted(set(was) | set(config)) if was.get(k) != config.get(k))
        raise ValueError(f"{data_dir} already holds a preparation with other settings ({diff}); "
                         "use --force to overwrite it or choose another --data_dir")

    if not force and foreign_shards(data_dir):
        raise ValueError(f"{data_dir} holds token shards that nanogpt-prepare did not write (llm.c's?); train on them "
                         "as they are with --data_dir, or use --force to replace them")

    # Invalidate first: from here until the new manifest lands, the directory reads as incomplete (a manifest
    # that lists no files: shards left by a killed run must not pass for another tool's complete set).
    data_dir.mkdir(parents=True, exist_ok=True)
    _write_file(data_dir / MANIFEST, json.dumps({"name": name, "config": config, "files": {}}).encode())
    stale = ["meta.pkl", "meta.json", "train.bin", "val.bin",
             *(f for split in shards.SPLITS for f in shards.find(data_dir, split))]
    for f in stale:  # a stale meta would make a BPE dataset look char-level, stale shards join the new ones
        (data_dir / f).unlink(missing_ok=True)
    _fsync_dir(data_dir)
    if name == "shakespeare_char":
        out, vocab_size = _prepare_char(data_dir, text)
    elif name == "shakespeare":
        out, vocab_size = _prepare_bpe(data_dir, text)
    elif name == "openwebtext":
        out, vocab_size = _prepare_openwebtext(data_dir, dataset, dataset_config, files, text_field, val_size, seed,
                                               num_proc or min(8, os.cpu_count() or 1), cache_dir)
    else:
        out, vocab_size = _prepare_fineweb(data_dir, dataset, dataset_config, files, text_field, shard_size,
                                           num_proc or min(8, os.cpu_count() or 1), cache_dir)
    manifest = {"format": 1, "name": name, "dtype": "uint16", "vocab_size": vocab_size,
                "tokenizer": "char" if name == "shakespeare_char" else "gpt2",
                "source": files or dataset if name in ("openwebtext", "fineweb") else str(input_file),
                "config": config, "files": out}
    _write_file(data_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
    _fsync_dir(data_dir)
    print(f"wrote {data_dir}: {_counts(out)}")
    return manifest


def main(argv=None):
    p = argparse.ArgumentParser(prog="nanogpt-prepare", description="Tokenize a dataset into data/NAME/{train,val}.bin "
                                "(nanoGPT format; fineweb: llm.c's token shards). Re-running skips complete outputs.")
    p.add_argument("name", help=f"one of: {', '.join(DATASETS)}")
    p.add_argument("--data_dir", help="output directory (default: data/NAME)")
    p.add_argument("--force", action="store_true", help="rebuild even if complete outputs exist")
    p.add_argument("--input", help="shakespeare*: a UTF-8 text file instead of the embedded tiny Shakespeare")
    p.add_argument("--dataset", help="openwebtext/fineweb: a Hugging Face dataset name (default: openwebtext; "
                   f"fineweb: {FINEWEB[0]})")
    p.add_argument("--dataset_config", help=f"openwebtext/fineweb: the dataset's config name (fineweb: {FINEWEB[1]})")
    p.add_argument("--files", nargs="+", help="openwebtext/fineweb: local .txt (one document each) / .json / .jsonl "
                   "/ .parquet files instead")
    p.add_argument("--text_field", default="text", help="openwebtext/fineweb: JSON field / column holding the text")
    p.add_argument("--val_size", type=float, default=0.0005, help="openwebtext: val fraction, or a document count if >= 1")
    p.add_argument("--seed", type=int, default=2357, help="openwebtext: shuffle seed of the train/val split")
    p.add_argument("--shard_size", type=int, default=SHARD_SIZE, help="fineweb: tokens per shard (default: llm.c's 10**8)")
    p.add_argument("--num_proc", type=int, default=None, help="openwebtext/fineweb: tokenizer processes (default: "
                   "min(8, cpus))")
    p.add_argument("--cache_dir", help="openwebtext/fineweb: Hugging Face datasets cache directory")
    args = p.parse_args(argv)
    if args.name not in DATASETS:
        print(f"nanogpt-prepare: unknown dataset {args.name!r}; valid names: {', '.join(DATASETS)}", file=sys.stderr)
        return 2
    try:
        prepare(args.name, args.data_dir, input_file=args.input, dataset=args.dataset, dataset_config=args.dataset_config,
                files=args.files, text_field=args.text_field, val_size=args.val_size, seed=args.seed,
                num_proc=args.num_proc, cache_dir=args.cache_dir, shard_size=args.shard_size, force=args.force)
    except (ValueError, OSError, ImportError, RuntimeError) as e:
        print(f"nanogpt-prepare: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
