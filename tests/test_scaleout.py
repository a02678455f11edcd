"""Scale-out and training health (CPU, gloo, tiny model):

- FSDP over 2 ranks (our extension's kernels, selective activation checkpointing, async sharded checkpoint)
  trains as one process does on the same global batch, losses within 1e-5 per step for 20 steps (gradient
  accumulation 2); its iter-10 checkpoint resumed at 2 ranks continues bitwise as the uninterrupted run (losses
  and final weights); resumed at 1 rank under FSDP (DCP reshards), then as a plain single process (consolidated
  on load), whose checkpoint FSDP resumes again, within 1e-6 of it (one rank adds in another order);
- optimizer=muon under FSDP (uneven shards, in the same torchrun launch): losses within MUON_TOL of one process
  (Newton-Schulz's bf16 rounding; the bitwise step on equal gradients is tests/test_modern.py's), Muon's
  momentum sharded in the checkpoint, resumed at 2 ranks bitwise and at 1 within MUON_TOL;
- kill -9 while an async save is being written leaves the previous checkpoint loadable;
- activation checkpointing (block, selective) gives the gradients of none;
- the health metrics are in metrics.jsonl under their documented names, and a planted loss spike (the loss
  scaled once, by a monkeypatch in the test) is logged with the rows of its batch;
- DCP's metadata pickle is read without running code.
"""
import json
import os
import pickle
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from nanogpt import checkpoint, dcp, parallel, train
from nanogpt.model import GPT, MODERN, GPTConfig

TIMEOUT = 300
BASE = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, eval_iters=1, compile=False, device="cpu",
            dtype="float32", dataset="shakespeare_char", log_interval=1, eval_interval=4, dropout=0.0,
            learning_rate=1e-3, warmup_iters=2, lr_decay_iters=8, autotune=False, plot=False)  # (matplotlib: seconds)
# one process: 2 micro-steps of 8 rows; 2 ranks: 2 micro-steps of 4 rows each (the same global batch)
SINGLE = dict(batch_size=8, gradient_accumulation_steps=2, kernels="adamw:torch")  # the rest: ext (auto's order)
TWO = dict(batch_size=4, gradient_accumulation_steps=4, kernels="ext")


def _args(data, **over):
    return [f"--{k}={v}" for k, v in (BASE | {"data_dir": data} | over).items()]


def _env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TORCHELASTIC_") and k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    return env | dict(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out_dir):
    return {r["iter"]: r["loss"] for r in records(out_dir) if "loss" in r and "event" not in r}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from nanogpt.prepare import main
    d = tmp_path_factory.mktemp("scaleout") / "sc"
    main(["shakespeare_char", f"--data_dir={d}"])
    return str(d)


# the 2 ranks' script, one torchrun launch for every 2-rank run of this module (a start costs seconds): for each
# job (argv[1], JSON) an uninterrupted run of 20 steps, whose iter-10 checkpoint, once in place, is copied into the
# out_dirs of runs that stopped there; then (in the same processes) the first of these resumes at 2 ranks
TWO_RANK_DRIVER = """
import json, os, shutil, sys
from nanogpt import checkpoint, train

jobs = json.loads(sys.argv[1])
copies = {job["uninterrupted"]: job["resumed"] for job in jobs}
real = checkpoint.write_pointers

def write_pointers(out_dir, entry, best, collect=True):
    real(out_dir, entry, best, collect)
    if entry["iter"] == RESUME_AT:
        for d in copies.get(out_dir, ()):
            shutil.copytree(os.path.join(out_dir, entry["dcp"]), os.path.join(d, entry["dcp"]))
            real(d, entry, False)

checkpoint.write_pointers = write_pointers
for i, job in enumerate(jobs):  # each init joins as a torchrun restart does: a fresh rendezvous key space
    os.environ["TORCHELASTIC_RESTART_COUNT"] = str(2 * i)
    train.main(job["args"] + [f"--out_dir={job['uninterrupted']}"])
    os.environ["TORCHELASTIC_RESTART_COUNT"] = str(2 * i + 1)
    train.main(job["args"] + [f"--out_dir={job['resumed'][0]}", "--init_from=resume"])
"""
STEPS, RESUME_AT = 20, 10
LAST = dict(max_iters=STEPS - 1, eval_interval=RESUME_AT)  # iters 0-19; saves at 10 and 19
# optimizer=muon under FSDP: n_embd 33 makes most hidden matrices' rows odd, so the 2 ranks' shards are uneven
MUON = dict(optimizer="muon", muon_momentum_warmup=4, n_embd=33, n_head=3)


class TwoRanks:
    """The module's 2 FSDP ranks, started in the background (the first test to ask starts them, and trains its
    one-process reference meanwhile): jobs[name] = (uninterrupted, resumed at 2, resumed at 1) out_dirs."""

    def __init__(self, data, tmp):
        specs = {"adamw": dict(activation_checkpointing="selective", async_checkpoint=True),
                 "muon": MUON}
        self.jobs = {name: tuple(tmp / f"{name}-{d}" for d in ("fsdp", "at2", "at1")) for name in specs}
        jobs = [{"uninterrupted": str(dirs[0]), "resumed": [str(d) for d in dirs[1:]],
                 "args": _args(data, parallelism="fsdp", **spec, **LAST, **TWO)}
                for (name, dirs), spec in zip(self.jobs.items(), specs.values())]
        driver = tmp / "driver.py"
        driver.write_text(TWO_RANK_DRIVER.replace("RESUME_AT", str(RESUME_AT)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
               json.dumps(jobs)]
        self.proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.outs = []
        self.reader = threading.Thread(target=lambda: self.outs.extend(self.proc.communicate(timeout=TIMEOUT)))
        self.reader.start()

    def wait(self):
        """rank 0's stdout, once the ranks have exited successfully."""
        self.reader.join()
        assert self.proc.returncode == 0, self.outs[0][-3000:] + self.outs[1][-5000:]
        return self.outs[0]


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory):
    ranks = TwoRanks(data, tmp_path_factory.mktemp("two_ranks"))
    yield ranks
    if ranks.proc.poll() is None:  # a test failed before waiting
        ranks.proc.kill()
    ranks.reader.join()


def final(d):
    return checkpoint.load(str(d), with_state=False)[0]["model"]


def test_fsdp_two_ranks_equal_one_process_and_resume_at_two_and_one(data, tmp_path, capsys, two_ranks):
    ref = tmp_path / "ref"
    fsdp, at2, at1 = two_ranks.jobs["adamw"]
    train.main(_args(data, out_dir=ref, **LAST, **SINGLE))  # one process, while the 2 FSDP ranks run
    capsys.readouterr()
    out = two_ranks.wait()
    assert "adamw: the ext backend cannot step FSDP's sharded parameters" in out  # announced, fell back
    assert f"saved checkpoint at iter {RESUME_AT}" in out and "(in the background)" in out
    assert {"checkpoint_ms", "checkpoint_staging_ms"} <= {k for r in records(fsdp) for k in r}  # the loop's stall
    assert sorted(os.listdir(at1 / "checkpoints" / f"iter_{RESUME_AT:06d}")) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "train.pt"]
    want, got = losses(ref), losses(fsdp)
    assert sorted(got) == list(range(STEPS))
    for it in got:
        assert abs(got[it] - want[it]) <= 1e-5, (it, got[it], want[it])
    # per-layer gradient norms summed over the shards: the one process's
    step = {r["iter"]: r for r in records(ref) if "loss" in r}
    for r in records(fsdp):
        for k in (k for k in r if k.startswith(("grad_norm/", "update_ratio/"))):
            assert r[k] == pytest.approx(step[r["iter"]][k], rel=1e-4, abs=1e-7), (r["iter"], k)

    # resumed at 2 ranks: the same ranks add in the same order, so the continuation is bitwise the uninterrupted one
    uninterrupted, resumed = losses(fsdp), losses(at2)
    assert sorted(resumed) == list(range(RESUME_AT, STEPS))
    assert all(resumed[it] == uninterrupted[it] for it in resumed), (resumed, uninterrupted)
    for k, v in final(fsdp).items():
        assert torch.equal(final(at2)[k], v), k

    # resumed at 1: FSDP in one process loads the shards (DCP reshards), then a plain process (consolidated)
    # writes DDP's format, which FSDP resumes; one rank adds the gradients in another order: within 1e-6
    train.main(_args(data, out_dir=at1, max_iters=13, init_from="resume", parallelism="fsdp", **SINGLE))
    assert "resharding: the checkpoint was written by 2 ranks, this run has 1" in capsys.readouterr().out
    assert checkpoint.latest_iter(at1) == 13 and "dcp" in json.loads((at1 / "latest.json").read_text())
    from nanogpt.sample import load_model  # nanogpt-sample reads the sharded checkpoint, consolidated
    model, _ = load_model({"init_from": "resume", "out_dir": str(at1), "which": "latest", "device": "cpu",
                           "kernels": "torch"})
    assert model.lm_head.weight.shape == (65, 32)
    train.main(_args(data, out_dir=at1, max_iters=16, init_from="resume", **SINGLE))
    assert "model" in json.loads((at1 / "latest.json").read_text())
    train.main(_args(data, out_dir=at1, **LAST, init_from="resume", parallelism="fsdp", **SINGLE))
    resumed = losses(at1)
    assert sorted(resumed) == list(range(RESUME_AT, STEPS))
    for it in resumed:
        assert abs(resumed[it] - uninterrupted[it]) <= 1e-6, (it, resumed[it], uninterrupted[it])
    for k, v in final(fsdp).items():
        torch.testing.assert_close(final(at1)[k], v, atol=1e-6, rtol=1e-6, msg=k)



# Muon's losses over 20 steps of 2 ranks against one process. Newton-Schulz rounds its input to bf16 and iterates
# in bf16: a gradient 1 float32 ulp off flips a bf16 rounding now and then (~2^-16 of the elements), after which
# the iteration's bf16 roundings differ and the update moves by about a bf16 ulp (2^-8 relative) of muon_lr x its
# elements, not by float32's 2^-24 as AdamW's does (1e-5 there). Measured in one process, this test's model and
# data: every gradient element nudged 1 ulp up or down at random before each step moved the losses by up to
# 1.6e-5, 2.3e-5 and 6.0e-5 (3 seeds; AdamW's: 0); 2 FSDP ranks against one process: 4.5e-5. 2e-4 is 3x the
# worst; a wrong row, a lost momentum or a skipped share moves them by 1e-3 or more.
MUON_TOL = 2e-4


def test_fsdp_muon_two_ranks_equal_one_process_and_resume_at_two_and_one(data, tmp_path, capsys, two_ranks):
    """optimizer=muon under FSDP: each rank all-gathers the hidden matrices' updates, orthogonalises its share of
    them, and applies its rows (uneven shards here). The losses are the one process's within MUON_TOL (see the
    derivation at its use); its iter-10 checkpoint, Muon's momentum sharded in DCP like AdamW's moments, resumes
    at 2 ranks bitwise, at 1 (DCP reshards the momentum) within MUON_TOL."""
    ref = tmp_path / "ref"
    fsdp, at2, at1 = two_ranks.jobs["muon"]
    train.main(_args(data, out_dir=ref, **MUON, **LAST, **SINGLE))  # (the adamw test has started the ranks)
    two_ranks.wait()
    # Muon's momentum is in the checkpoint, sharded: both ranks wrote a chunk of each buffer (uneven: 50 + 49 rows)
    _, meta = dcp._metadata(str(at1 / "checkpoints" / f"iter_{RESUME_AT:06d}"))
    buf = meta["optim/transformer.h.0.attn.c_attn.weight/momentum_buffer"]
    assert tuple(buf.size) == (99, 33) and sorted(c.sizes[0] for c in buf.chunks) == [49, 50]
    # the same global batch: the gradients agree to float32 rounding only (the ranks add in another order); with
    # the same gradients the step is the one process's bitwise (tests/test_modern.py), so MUON_TOL is what Muon
    # makes of 1-ulp gradient differences (see MUON_TOL)
    want, got = losses(ref), losses(fsdp)
    assert sorted(got) == list(range(STEPS))
    for it in got:
        assert abs(got[it] - want[it]) <= MUON_TOL, (it, got[it], want[it])

    # resumed at 2 ranks: bitwise the uninterrupted run (the momentum restored exactly)
    uninterrupted, resumed = losses(fsdp), losses(at2)
    assert sorted(resumed) == list(range(RESUME_AT, STEPS))
    assert all(resumed[it] == uninterrupted[it] for it in resumed), (resumed, uninterrupted)
    for k, v in final(fsdp).items():
        assert torch.equal(final(at2)[k], v), k
    # resumed at 1 (FSDP in one process: DCP reshards the weights and the momentum)
    train.main(_args(data, out_dir=at1, init_from="resume", parallelism="fsdp", **MUON, **LAST, **SINGLE))
    assert "resharding: the checkpoint was written by 2 ranks, this run has 1" in capsys.readouterr().out
    resumed = losses(at1)
    assert sorted(resumed) == list(range(RESUME_AT, STEPS))
    for it in resumed:
        assert abs(resumed[it] - uninterrupted[it]) <= MUON_TOL, (it, resumed[it], uninterrupted[it])


KILL_DRIVER = """
import sys, time
from torch.distributed.checkpoint import FileSystemWriter
from nanogpt import train

real = FileSystemWriter.write_data
def write_data(self, plan, planner):  # iter 4's save: stop in the middle of the background write
    if "iter_000004" in str(self.path):
        print("pausing inside the background save", flush=True)
        time.sleep(3600)
    return real(self, plan, planner)

FileSystemWriter.write_data = write_data
train.main(sys.argv[1:])
"""


def test_kill9_during_async_save_leaves_the_previous_checkpoint(data, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DRIVER)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(driver), *_args(data, out_dir=out, max_iters=8, eval_interval=2,
                                                                 parallelism="fsdp", async_checkpoint=True, **SINGLE)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(TIMEOUT, proc.kill)
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:  # until the loop has gone on past the save in flight
            lines.append(line)
            if line.startswith("iter 5:") and any("pausing inside the background save" in x for x in lines):
                break
        proc.kill()  # SIGKILL
        proc.wait()
    finally:
        watchdog.cancel()
    assert lines[-1].startswith("iter 5:"), "".join(lines)[-3000:]
    assert os.path.isdir(out / "checkpoints" / "iter_000004.tmp")  # the torn save is there, named by no pointer
    model_payload, state = checkpoint.load(str(out))
    assert model_payload["iter_num"] == state["iter_num"] == 2
    assert set(model_payload["model"]) >= {"lm_head.weight", "transformer.h.1.mlp.c_fc.weight"}


def test_async_save_holds_the_weights_of_its_iteration(tmp_path, monkeypatch):
    # the background copy is made late: the optimizer step right after the save must wait for it (its step
    # pre-hook), so the checkpoint holds the weights of the save's iteration, not the next step's
    import torch.distributed as dist
    real = dcp._stage
    monkeypatch.setattr(dcp, "_stage", lambda tensors: time.sleep(0.2) or real(tensors))
    parallel.init_single_process_group("gloo")
    try:
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64, kernels="torch"), "cpu")
        parallel.shard(model, train.Process(True, 0, 0, 1, "cpu"), "float32", False)
        opt = parallel.fsdp_optimizer(model, lambda: model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu"), print)
        idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))

        def step():
            model(idx, idx)[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        step()
        want = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
        dcp.save(str(tmp_path), 1, model, opt, {"model_args": {}}, {}, background=True)
        step()
        assert dcp.last_staging_wait() is not None  # the step waited
        dcp.wait()
    finally:
        dcp.close()
        dist.destroy_process_group()
    got, _ = dcp.read(str(tmp_path), {"dcp": "checkpoints/iter_000001"}, with_state=False)
    assert got["model"].keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got["model"][k], v), k


@pytest.mark.parametrize("kernels,options", [("torch", {}), ("ext", {}), ("ext", MODERN)],
                         ids=["torch", "ext", "ext-modern"])
def test_activation_checkpointing_gives_the_same_gradients(kernels, options):
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = {}
    for mode in parallel.ACTIVATION_CHECKPOINTING:
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.1,
                              kernels=kernels, **options), "cpu")
        parallel.checkpoint_activations(model, mode)
        torch.manual_seed(1)  # the dropout masks: recomputation must draw the same
        model(idx, idx)[1].backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
    for mode in ("block", "selective"):
        for n, g in grads["none"].items():
            assert torch.equal(grads[mode][n], g), (mode, n)


def test_health_metrics_and_a_planted_spike(data, tmp_path, monkeypatch, capsys):
    from nanogpt import model as model_module
    spike_at, seen = 11, {}
    real_step, real_forward = train.train_step, model_module.GPT.forward

    def train_step(run, stop):
        seen["iter"] = run.iter_num
        return real_step(run, stop)

    def forward(self, idx, targets=None, **kw):
        logits, loss = real_forward(self, idx, targets, **kw)
        if targets is not None and self.training and seen.get("iter") == spike_at:
            seen.setdefault("batches", []).append(idx.clone())
            loss = loss * 20  # the planted spike
        return logits, loss
    monkeypatch.setattr(train, "train_step", train_step)
    monkeypatch.setattr(model_module.GPT, "forward", forward)
    out = tmp_path / "health"
    train.main(_args(data, out_dir=out, max_iters=11, eval_interval=100, batch_size=2, gradient_accumulation_steps=2,
                     kernels="torch", spike_k=4.0))
    assert f"iter {spike_at}: loss spike" in capsys.readouterr().out
    recs = records(out)
    step = next(r for r in recs if r["iter"] == 3 and "loss" in r)
    for name in ("loss", "lr", "grad_norm", "clipped", "skipped", "tokens_per_s", "mfu", "peak_mem_mb",
                 "grad_norm/wte", "grad_norm/wpe", "grad_norm/h.0", "grad_norm/h.1", "grad_norm/ln_f",
                 "update_ratio/decay", "update_ratio/no_decay"):
        assert name in step, name
    assert step["peak_mem_mb"] > 10 and 0 < step["update_ratio/decay"] < 1
    layers = sum(step[f"grad_norm/{k}"] ** 2 for k in ("wte", "wpe", "h.0", "h.1", "ln_f"))
    assert layers ** 0.5 == pytest.approx(step["grad_norm"], rel=1e-4)  # the layers make up the whole
    spikes = [r for r in recs if r.get("event") == "spike"]
    assert [s["iter"] for s in spikes] == [spike_at]
    assert spikes[0]["loss"] > spikes[0]["mean"] + 4 * spikes[0]["std"]
    tokens = np.memmap(os.path.join(data, "train.bin"), dtype=np.uint16, mode="r")
    for rows, batch in zip(spikes[0]["rows"], seen["batches"]):  # the rows are the spiking batch's
        assert np.array_equal(np.stack([tokens[r:r + 32] for r in rows]), batch.numpy())


def test_tensorboard_is_optional_and_mirrors_the_numbers(monkeypatch):
    from nanogpt import health
    from nanogpt.errors import UserError
    from nanogpt.metrics import MetricsLog
    keys = dict(tensorboard=True, spike_k=6.0, spike_window=100)
    monkeypatch.setattr(health.importlib.util, "find_spec", lambda name: None)  # not installed
    with pytest.raises(UserError, match="pip install tensorboard"):
        health.check(keys)
    scalars = []

    class Writer:  # SummaryWriter's two calls
        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            scalars.append("closed")
    with MetricsLog(tensorboard=Writer()) as log:
        log.write({"iter": 3, "loss": 2.5, "grad_norm/h.0": 0.1, "mfu": None, "clipped": False})
        log.write({"iter": 4, "event": "spike", "loss": 9.0, "rows": [[1, 2]]})
    assert scalars == [("loss", 2.5, 3), ("grad_norm/h.0", 0.1, 3), ("clipped", False, 3), ("spike/loss", 9.0, 4),
                       "closed"]


def test_dcp_metadata_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "ckpt"
    path.mkdir()

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))
    (path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(checkpoint.CheckpointError, match="refused .*it names posix.system"):
        dcp.SafeReader(str(path)).read_metadata()
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")
