"""Reliability of the trainer end to end (CPU, tiny model, subprocesses):

- kill -9 in the middle of a checkpoint write leaves the previous checkpoint loadable, and resume works;
- 40 iterations straight == 20 + resume + 20, bitwise (losses in metrics.jsonl and parameters);
- SIGTERM/SIGINT: save at the next step boundary, exit 0, resume to the same result;
- 2 gloo ranks under torchrun --max-restarts=1, one rank dies: the job restarts, resumes, ends as an
  uninterrupted 2-rank run does; SIGTERM to one rank stops both at the same step, exit 0;
- non-finite losses skip the update and are counted; max_skips consecutive ones stop the run (exit 2)
  with the last good checkpoint intact;
- sampler=epoch: disjoint across ranks within an epoch, every window once per epoch;
- bad input: one line `error: ...` on stderr, exit 2, no traceback, nothing written or lost.

Faults are injected from outside the product code: the trainer runs under FAULTY_TRAIN, a driver that
monkeypatches its seams (train.train_step, GPT.forward, checkpoint.save and checkpoint.atomic_write) and
then calls train.main, as `python faulty_train.py FAULTS --key=value ...` or a torchrun script.
"""
import concurrent.futures
import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nanogpt import checkpoint
from nanogpt.data import Batcher

TIMEOUT = 300  # per subprocess: nothing here may hang the suite

# the tiny deterministic run every test compares against; dropout > 0 and 2 micro-steps make the
# RNG and sampler states matter on resume
BASE = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, eval_iters=2, compile=False,
            device="cpu", dtype="float32", kernels="torch", dataset="shakespeare_char", log_interval=1,
            eval_interval=10, gradient_accumulation_steps=2, dropout=0.1, deterministic=True,
            learning_rate=1e-2, warmup_iters=5, lr_decay_iters=40, max_iters=40,
            plot=False)  # loss.png is test_train's; matplotlib's import would add a second to every run
DDP = dict(sampler="epoch", init_from="auto", max_iters=20)  # the 2-rank runs'


FAULTY_TRAIN = """
import json, os, sys, time
import torch
from nanogpt import checkpoint, train
from nanogpt.model import GPT

faults = json.loads(sys.argv[1])
rank = int(os.environ.get("RANK", 0))
first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"  # torchrun restarts with count 1, 2, ...
poison = False  # make the losses of this step's forward passes NaN
saving = None  # the iteration being saved

real_step = train.train_step
def train_step(run, stop):  # at the start of a step, after that iteration's eval (and save)
    global poison
    it = run.iter_num
    if "die_at" in faults and faults["die_at"] == [it, rank] and first_attempt:
        print(f"rank {rank} dies at iter {it}", flush=True)
        os._exit(1)
    if faults.get("oom_at") == it:
        raise torch.OutOfMemoryError("simulated out of memory")
    lo, hi = faults.get("nan_at", (None, None))  # iterations lo..hi-1, lo onwards when hi is None
    poison = lo is not None and lo <= it and (hi is None or it < hi)
    try:
        return real_step(run, stop)
    finally:
        poison = False

real_forward = GPT.forward
def forward(self, *args, **kwargs):
    logits, loss = real_forward(self, *args, **kwargs)
    return logits, loss * float("nan") if poison and loss is not None else loss

real_save = checkpoint.save
def save(out_dir, iter_num, *args, **kwargs):
    global saving
    saving = iter_num
    return real_save(out_dir, iter_num, *args, **kwargs)

real_write = checkpoint.atomic_write
def atomic_write(path, write):  # pause_in_save [I, model|state|latest]: after the data is fsynced, before the rename
    at, what = faults.get("pause_in_save", (None, None))
    name = os.path.basename(path)
    if saving != at or not name.endswith((f".{what}.pt", f"{what}.json")):
        return real_write(path, write)
    def write_and_pause(f):
        write(f)
        f.flush()
        os.fsync(f.fileno())
        print(f"pausing inside save of {name}", flush=True)
        time.sleep(3600)
    return real_write(path, write_and_pause)

train.train_step, GPT.forward, checkpoint.save, checkpoint.atomic_write = train_step, forward, save, atomic_write
train.main(sys.argv[2:])
"""


def _env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TORCHELASTIC_") and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _args(wd, **over):
    return [f"--{k}={v}" for k, v in (BASE | {"data_dir": wd.data} | over).items()]


def _trainer(wd, faults):
    """The trainer's entry point for python or torchrun: FAULTY_TRAIN when there are faults to inject."""
    return [str(wd.faulty_train), json.dumps(faults)] if faults else ["-m", "nanogpt.train"]


def train(wd, faults=None, timeout=TIMEOUT, **over):
    return subprocess.run([sys.executable, *_trainer(wd, faults), *_args(wd, **over)], cwd=wd.path, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def later(wd, name, run=None, faults=None, **over):
    """run(wd, faults, **over) (default: train) started now beside the tests, on one of wd.pool's two workers;
    wd.ran(name) waits for its result. A trainer runs on one core (OMP_NUM_THREADS=1): on CI's 2 cores the tests'
    own subprocesses and these share the machine instead of leaving a core idle."""
    wd.runs[name] = wd.pool.submit(run or train, wd, faults, **over)


def torchrun(wd, faults=None, nproc=2, max_restarts=1, **over):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={max_restarts}", *_trainer(wd, faults), *_args(wd, **over)]
    return subprocess.run(cmd, cwd=wd.path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


class Live:
    """A trainer subprocess whose stdout is read line by line while it runs."""

    def __init__(self, wd, faults=None, **over):
        self.proc = subprocess.Popen([sys.executable, *_trainer(wd, faults), *_args(wd, **over)], cwd=wd.path,
                                     env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines, self._q = [], queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, text, timeout=TIMEOUT):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self._q.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if text in line:
                return line
        self.proc.kill()
        pytest.fail(f"never saw {text!r}; output:\n{''.join(self.lines)[-3000:]}\n{self.proc.stderr.read()[-3000:]}")

    def finish(self, timeout=TIMEOUT):
        rc = self.proc.wait(timeout=timeout)
        while (line := self._q.get(timeout=timeout)) is not None:
            self.lines.append(line)
        return rc, "".join(self.lines), self.proc.stderr.read()


def records(out_dir):
    """metrics.jsonl without the timing and memory fields."""
    with open(Path(out_dir) / "metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("ms", "tokens_per_s", "peak_mem_mb",
                                                                      "checkpoint_ms")} for line in f]


def params(out_dir, which="latest"):
    return checkpoint.load(str(out_dir), which, with_state=False)[0]["model"]


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_run(out_dir, ref_dir):
    assert records(out_dir) == records(ref_dir)
    assert checkpoint.latest_iter(out_dir) == checkpoint.latest_iter(ref_dir)
    assert_same_params(params(out_dir), params(ref_dir))


def snapshot(d):
    """{relative path: sha256} of every file under d (None if d does not exist)."""
    d = Path(d)
    if not d.exists():
        return None
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


class Workdir:
    def __init__(self, path):
        self.path = path
        self.data = str(path / "data" / "sc")
        self.faulty_train = path / "faulty_train.py"
        self.faulty_train.write_text(FAULTY_TRAIN)
        self.pool = concurrent.futures.ThreadPoolExecutor(2)  # later(): trainer runs beside the tests
        self.runs = {}

    def ran(self, name):
        """The CompletedProcess of the run later() started as `name`."""
        return self.runs[name].result()


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    path = tmp_path_factory.mktemp("reliability")
    w = Workdir(path)
    prep = subprocess.run([sys.executable, "-m", "nanogpt.prepare", "shakespeare_char", f"--data_dir={w.data}"],
                          cwd=path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert prep.returncode == 0, prep.stderr
    # the runs that depend on no test, started at once, two at a time, in the order the tests use them
    later(w, "ref", out_dir="ref")
    later(w, "half", out_dir="half", max_iters=20)
    for dtype in ("float32", "float16"):
        later(w, f"nan-{dtype}", faults={"nan_at": [5, 8]}, out_dir=f"nan-{dtype}", max_iters=12, dtype=dtype)
    later(w, "nanstop", faults={"nan_at": [12, None]}, out_dir="nanstop", max_skips=3)
    later(w, "hugelr", out_dir="hugelr", learning_rate=1e30, warmup_iters=0, max_skips=3, dropout=0.0)
    later(w, "oom", faults={"oom_at": 13}, out_dir="oom")
    later(w, "ddp-ref", torchrun, out_dir="ddp-ref", **DDP)
    yield w
    w.pool.shutdown(cancel_futures=True)


@pytest.fixture(scope="module")
def ref(wd):
    """The uninterrupted 40-iteration run."""
    out = ok(wd.ran("ref")).stdout
    assert "saved checkpoint at iter 40" in out
    return wd.path / "ref"


# ---------------------------------------------------------------- exact resume

def test_resume_is_bitwise_exact(wd, ref):
    ok(wd.ran("half"))  # max_iters=20
    assert checkpoint.latest_iter(wd.path / "half") == 20
    out = ok(train(wd, out_dir="half", init_from="resume")).stdout
    assert "resuming from iter 20" in out
    assert_same_run(wd.path / "half", ref)  # losses (metrics.jsonl, re-done iterations trimmed) and parameters

    # what the checkpoint holds: weights apart from the optimizer state, RNG and sampler per rank, ...
    model_payload, state = checkpoint.load(str(ref))
    assert {"model", "model_args", "iter_num", "config"} <= set(model_payload)
    assert {"optimizer", "scaler", "iter_num", "best_val_loss", "config", "skipped", "ranks"} <= set(state)
    assert {"rng", "batcher"} <= set(state["ranks"][0]) and len(state["ranks"]) == 1
    assert all(v.device.type == "cpu" for v in model_payload["model"].values())
    # latest and best-val are both kept, nothing else
    files = sorted(os.listdir(ref / "checkpoints"))
    pointed = {os.path.basename(json.loads((ref / f"{w}.json").read_text())[k]) for w in ("latest", "best")
               for k in ("model", "state")}
    assert set(files) == pointed and all(f.endswith((".model.pt", ".state.pt")) for f in files)


def test_load_strips_compile_prefix_and_names_bad_key(ref):
    from nanogpt.model import GPT, GPTConfig
    sd = params(ref)
    margs = checkpoint.load(str(ref), with_state=False)[0]["model_args"]
    model = GPT(GPTConfig(**margs, kernels="torch"), "cpu")
    checkpoint.load_model_state(model, {"_orig_mod." + k: v for k, v in sd.items()}, "ref")
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"])
    wider = GPT(GPTConfig(**(margs | {"n_embd": 48}), kernels="torch"), "cpu")
    with pytest.raises(checkpoint.CheckpointError, match=r"transformer\.wte\.weight has shape \(65, 32\)"):
        checkpoint.load_model_state(wider, sd, "ref")


# ---------------------------------------------------------------- crashes and signals

KILL9_AT = ["state", "model", "latest"]


@pytest.fixture(scope="module")
def paused(wd):
    """{where: a trainer paused inside iter 20's save at `where`}, all three started at once."""
    lives = {where: Live(wd, faults={"pause_in_save": [20, where]}, out_dir=wd.path / f"killed-{where}")
             for where in KILL9_AT}
    yield lives
    for live in lives.values():
        live.proc.kill()


@pytest.mark.parametrize("where", KILL9_AT)
def test_kill9_inside_checkpoint_write(wd, ref, paused, where):
    """kill -9 while iter 20's checkpoint is being written: after the weights file is in place and the optimizer
    state file is half-way to its name (state), before either (model), or before latest.json moves (latest)."""
    out = wd.path / f"killed-{where}"
    live = paused[where]
    live.wait_for("pausing inside save")
    live.proc.kill()
    live.finish()
    tmp = [f for d in (out, out / "checkpoints") for f in os.listdir(d) if ".tmp" in f]
    assert len(tmp) == 1  # the torn write is there...
    model_payload, state = checkpoint.load(str(out))  # ...but the previous checkpoint is whole
    assert model_payload["iter_num"] == state["iter_num"] == 10
    if where == "model":
        return
    res = ok(train(wd, out_dir=out, init_from="resume", max_iters=40 if where == "state" else 10)).stdout
    assert "resuming from iter 10" in res
    assert not any(".tmp" in f for d in (out, out / "checkpoints") for f in os.listdir(d))  # cleaned up
    if where == "state":
        assert_same_run(out, ref)


SIGNALS = [signal.SIGTERM, signal.SIGINT]


@pytest.fixture(scope="module")
def signalled(wd):
    """{signal: a trainer that got it after logging iter 3}, both started at once (each watched by its own thread,
    so that neither runs on to its end while the other is waited for)."""
    lives = {sig: Live(wd, out_dir=f"sig{int(sig)}") for sig in SIGNALS}

    def send_after_iter_3(sig):
        lives[sig].wait_for("iter 3:")
        lives[sig].proc.send_signal(sig)

    try:
        with concurrent.futures.ThreadPoolExecutor(len(lives)) as ex:
            for sent in [ex.submit(send_after_iter_3, sig) for sig in lives]:
                sent.result()
        yield lives
    finally:
        for live in lives.values():
            live.proc.kill()


@pytest.mark.parametrize("sig", SIGNALS, ids=["SIGTERM", "SIGINT"])
def test_signal_saves_exits_0_and_resumes(wd, ref, signalled, sig):
    name = f"sig{int(sig)}"
    live = signalled[sig]
    rc, stdout, stderr = live.finish()
    assert rc == 0, stdout[-2000:] + stderr[-3000:]
    stopped = int(stdout.split("stopped by signal at iter ")[1].split(";")[0])
    assert 3 < stopped < 40 and f"saved checkpoint at iter {stopped}" in stdout
    assert checkpoint.latest_iter(wd.path / name) == stopped
    res = ok(train(wd, out_dir=name, init_from="resume")).stdout
    assert f"resuming from iter {stopped}" in res
    assert_same_run(wd.path / name, ref)


# ---------------------------------------------------------------- DDP: a rank dies, torchrun restarts

@pytest.fixture(scope="module")
def ddp_ref(wd):
    """An uninterrupted 2-rank run."""
    ok(wd.ran("ddp-ref"))
    _, state = checkpoint.load(str(wd.path / "ddp-ref"))
    assert len(state["ranks"]) == 2
    return wd.path / "ddp-ref"


def test_ddp_rank_dies_torchrun_restarts_and_resumes(wd, ddp_ref):
    proc = ok(torchrun(wd, faults={"die_at": [15, 1]}, out_dir="ddp-died", **DDP))
    assert "rank 1 dies at iter 15" in proc.stdout
    assert "resuming from iter 10" in proc.stdout  # init_from=auto on the restart: no hand edit
    assert_same_run(wd.path / "ddp-died", ddp_ref)


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds torchrun's workers through /proc")
def test_ddp_sigterm_to_one_rank_stops_all_ranks_together(wd, ddp_ref):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanogpt.train",
           *_args(wd, out_dir="ddp-term", **DDP)]
    proc = subprocess.Popen(cmd, cwd=wd.path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, watchdog = [], threading.Timer(TIMEOUT, proc.kill)  # never hang the suite
    watchdog.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("iter 3:"):
                break
        workers = [int(p) for t in os.listdir(f"/proc/{proc.pid}/task")
                   for p in open(f"/proc/{proc.pid}/task/{t}/children").read().split()]
        rank1 = [p for p in workers if "LOCAL_RANK=1" in open(f"/proc/{p}/environ").read().split("\0")]
        assert len(rank1) == 1, workers
        os.kill(rank1[0], signal.SIGTERM)  # only rank 1 is preempted
        lines += proc.stdout.readlines()
        assert proc.wait(timeout=TIMEOUT) == 0, "".join(lines)[-5000:]
    finally:
        watchdog.cancel()
        proc.kill()
    out = "".join(lines)
    stopped = int(out.split("stopped by signal at iter ")[1].split(";")[0])
    assert 3 < stopped < 20 and checkpoint.latest_iter(wd.path / "ddp-term") == stopped
    ok(torchrun(wd, out_dir="ddp-term", **DDP))  # init_from=auto resumes
    assert_same_run(wd.path / "ddp-term", ddp_ref)


# ---------------------------------------------------------------- numerical faults

@pytest.mark.parametrize("dtype", ["float32", "float16"])  # float16: autocast + GradScaler
def test_nonfinite_steps_are_skipped_and_counted(wd, dtype):
    out = wd.path / f"nan-{dtype}"
    proc = ok(wd.ran(f"nan-{dtype}"))  # nan_at [5, 8], max_iters=12
    steps = {r["iter"]: r for r in records(out) if "loss" in r}
    assert [steps[i]["grad_norm"] for i in (5, 6, 7)] == [None] * 3
    assert [steps[i]["skipped"] for i in range(3, 13)] == [0, 0, 1, 2, 3, 3, 3, 3, 3, 3]
    assert steps[8]["grad_norm"] is not None and "3 skipped steps" in proc.stdout
    assert all(torch.isfinite(p).all() for p in params(out).values())
    _, state = checkpoint.load(str(out))
    assert state["skipped"] == 3  # the count survives a resume
    assert ("scale" in state["scaler"]) == (dtype == "float16")  # the GradScaler's state is checkpointed


def test_max_skips_stops_with_error_and_last_checkpoint_intact(wd, ref):
    out = wd.path / "nanstop"
    proc = wd.ran("nanstop")  # nan_at [12, None], max_skips=3
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: 3 consecutive steps had a non-finite loss") and proc.stderr.count("\n") == 1
    assert "iters 12-14" in proc.stderr and "the last good checkpoint (iter 10)" in proc.stderr
    assert checkpoint.latest_iter(out) == 10
    # intact: resuming from it without the fault ends exactly where the uninterrupted run does
    ok(train(wd, out_dir="nanstop", init_from="resume"))
    assert_same_run(out, ref)


def test_huge_learning_rate_stops_cleanly(wd):
    proc = wd.ran("hugelr")  # learning_rate=1e30, warmup_iters=0, max_skips=3, dropout=0.0
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert "non-finite loss or gradient" in proc.stderr and "no checkpoint was written" in proc.stderr


# ---------------------------------------------------------------- sampler=epoch

def _windows_dataset(d, n_windows, block):
    """train.bin = val.bin = 0, 1, 2, ...: a row's first token is its start offset."""
    d.mkdir()
    n = n_windows * block + 1
    files = {}
    for name in ("train.bin", "val.bin"):
        data = np.arange(n, dtype=np.uint16).tobytes()
        (d / name).write_bytes(data)
        files[name] = {"tokens": n, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (d / "prepare.json").write_text(json.dumps({"format": 1, "vocab_size": n, "files": files}))
    return str(d)


def test_epoch_sampler_disjoint_ranks_full_coverage(tmp_path):
    n_windows, block, B = 101, 4, 4  # 101 windows: global batches of 8 straddle epoch boundaries
    data = _windows_dataset(tmp_path / "w", n_windows, block)
    make = lambda rank, world, b: Batcher(data, "w", block, b, n_windows * block + 1, "cpu", "epoch", 7, rank, world)
    ranks = [make(0, 2, B), make(1, 2, B)]
    single = make(0, 1, 2 * B)
    stream = []
    for step in range(40):  # > 3 epochs
        if step == 17:  # resume mid-epoch (the 2nd) from the sampler states, as a restarted run does
            states = [b.state_dict() for b in ranks]
            ranks = [make(r, 2, B) for r in (0, 1)]
            for b, s in zip(ranks, states):
                b.load_state_dict(s)
        rows = [b.get_batch("train")[0][:, 0].tolist() for b in ranks]
        assert not set(rows[0]) & set(rows[1])  # the ranks' rows are disjoint
        assert single.get_batch("train")[0][:, 0].tolist() == rows[0] + rows[1]  # = one process, batch 2B
        stream += rows[0] + rows[1]
    epochs = [stream[i:i + n_windows] for i in range(0, len(stream) - n_windows + 1, n_windows)]
    assert len(epochs) == 3
    for e in epochs:  # without replacement: every window exactly once per epoch
        assert sorted(e) == [w * block for w in range(n_windows)]
    assert epochs[0] != epochs[1]  # reshuffled every epoch


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written
# In-process (the CLI's own entry point, main(argv)), as starting a subprocess costs seconds; a few cases
# run as real subprocesses too.

def _one_line(err, code, *expect):
    assert code == 2, err[-3000:]
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err[-3000:]
    for text in expect:
        assert text in err, err
    return err


def bad(wd, capsys, *expect, **over):
    import random
    from nanogpt.train import main
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state(), torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)  # the trainer seeds and sets these process-wide
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as e:
            main(_args(wd, **(dict(deterministic=False) | over)))
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[3:]
    return _one_line(capsys.readouterr().err, e.value.code, *expect)


def bad_subprocess(proc, *expect):
    return _one_line(proc.stderr, proc.returncode, *expect)


def test_bad_dataset_missing_or_empty(wd, capsys, tmp_path):
    nope = tmp_path / "nope"
    bad(wd, capsys, f"{nope / 'train.bin'} not found: run `nanogpt-prepare shakespeare_char --data_dir {nope}` first",
        data_dir=nope, out_dir=tmp_path / "o")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.bin").write_bytes(b"")
    (empty / "val.bin").write_bytes(b"")
    bad(wd, capsys, "is incomplete", f"nanogpt-prepare shakespeare_char --data_dir {empty}",
        data_dir=empty, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_bad_block_size_larger_than_data(wd, capsys, tmp_path):
    from nanogpt import prepare as P
    (tmp_path / "short.txt").write_text("To be, or not to be, that is the question.\n" * 6)  # 258 chars
    P.prepare("shakespeare_char", tmp_path / "short", input_file=tmp_path / "short.txt")
    bad(wd, capsys, "val.bin holds 26 tokens, fewer than block_size+1 = 33", "use --block_size=25 or less",
        data_dir=tmp_path / "short", out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_bad_token_id_beyond_vocab(wd, capsys, tmp_path):
    data = tmp_path / "oov"
    shutil.copytree(wd.data, data)
    ids = np.memmap(data / "train.bin", dtype=np.uint16, mode="r+")
    ids[123_456] = 100  # the file keeps its size: the manifest still says "complete"
    ids.flush()
    del ids
    bad(wd, capsys, "train.bin holds token id 100 >= the model's vocab_size 65", "re-prepare the data",
        data_dir=data, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_bad_block_size_larger_than_pretrained(wd, capsys, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = tmp_path / "tiny-gpt2"
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=65, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(hf)
    bad(wd, capsys, "block_size=32 is larger than", "'s 16; use --block_size=16 or less", init_from=hf,
        out_dir=tmp_path / "o")
    (tmp_path / "not-a-model").mkdir()
    bad(wd, capsys, "cannot load the pretrained model", init_from=tmp_path / "not-a-model", out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("over,expect", [
    (dict(init_from="bogus"), "unknown init_from 'bogus'; use scratch, resume, auto"),
    (dict(kernels="bogus"), "unknown backend 'bogus'"),
    (dict(kernels="attention:nope"), "unknown backend 'nope' for attention"),
    (dict(sampler="shuffle"), "unknown sampler 'shuffle'"),
    (dict(max_skips=0), "max_skips must be >= 1"),
], ids=["init_from", "kernels", "kernels-per-op", "sampler", "max_skips"])
def test_bad_names(wd, capsys, tmp_path, over, expect):
    bad(wd, capsys, expect, out_dir=tmp_path / "o", **over)
    assert not (tmp_path / "o").exists()


def test_bad_name_cli_prints_one_line(wd, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nanogpt.train", "--init_from=bogus", f"--out_dir={tmp_path / 'o'}"],
                          cwd=wd.path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    bad_subprocess(proc, "unknown init_from 'bogus'")
    assert proc.stdout == "" and not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage,expect", [
    ("truncate-state", "is truncated or corrupt"),
    ("garbage-model", "is truncated or corrupt"),
    ("garbage-pointer", "latest.json is corrupt"),
    ("missing-state", "is missing"),
])
def test_bad_checkpoint(wd, ref, capsys, tmp_path, damage, expect):
    out = tmp_path / "o"
    shutil.copytree(ref, out)
    entry = json.loads((out / "latest.json").read_text())
    if damage == "truncate-state":
        p = out / entry["state"]
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif damage == "garbage-model":
        (out / entry["model"]).write_bytes(os.urandom(4096))
    elif damage == "garbage-pointer":
        (out / "latest.json").write_text('{"iter": 40, "mod')
    else:
        (out / entry["state"]).unlink()
    before = snapshot(out)
    for init_from in ("resume", "auto"):
        bad(wd, capsys, expect, out_dir=out, init_from=init_from)
    assert snapshot(out) == before


def test_bad_checkpoint_of_another_model_shape(wd, ref, capsys, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(ref, out)
    before = snapshot(out)
    bad(wd, capsys, "has n_layer=2 but the config says 3", "--n_layer=2", out_dir=out, init_from="resume", n_layer=3)
    bad(wd, capsys, "has n_embd=32 but the config says 48", out_dir=out, init_from="auto", n_embd=48)
    assert snapshot(out) == before


def test_bad_scratch_over_existing_checkpoint(wd, ref, capsys, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(ref, out)
    before = snapshot(out)
    bad(wd, capsys, "already holds a checkpoint", "--init_from=resume", out_dir=out, init_from="scratch")
    assert snapshot(out) == before


def test_out_of_memory_is_one_line_with_advice(wd):
    out = wd.path / "oom"
    bad_subprocess(wd.ran("oom"),  # oom_at 13
                   "out of memory with batch_size=4 x block_size=32 per micro-step: lower batch_size")
    # the checkpoint written before stays as it is
    assert checkpoint.latest_iter(out) == 10 and checkpoint.load(str(out))[1]["iter_num"] == 10


def test_unwritable_out_dir_is_one_line(wd, capsys, tmp_path):
    """An out_dir or a save that cannot be written (disk full, permissions; here: a file in the way)."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "checkpoints").write_text("in the way")
    bad(wd, capsys, "cannot write to out_dir", "pass a writable --out_dir", out_dir=out / "checkpoints" / "run")
    bad_subprocess(train(wd, out_dir=out, max_iters=10), "cannot write the iter 10 checkpoint to",
                   "earlier checkpoints are intact")


def test_gradient_accumulation_not_divisible_by_world_size(wd, capsys, tmp_path, monkeypatch):
    # checked before the process group starts: a lone rank with a world-size environment says so at once
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2").items():
        monkeypatch.setenv(k, v)
    expect = "gradient_accumulation_steps=3 is not divisible by the world size 2; make it a multiple of 2"
    bad(wd, capsys, expect, out_dir=tmp_path / "o", gradient_accumulation_steps=3)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k)
    # under torchrun each rank prints that one line and no traceback (torchrun adds its own failure report);
    # torchrun terminates the other ranks as soon as one exits, so a rank may be killed before it prints
    proc = torchrun(wd, max_restarts=0, out_dir=tmp_path / "o", gradient_accumulation_steps=3)
    assert proc.returncode != 0
    assert proc.stderr.count("error: " + expect) >= 1, proc.stderr[-3000:]
    assert "[rank0]" not in proc.stderr and "[rank1]" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "o").exists()
