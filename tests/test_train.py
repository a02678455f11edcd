"""The trainer and sampler end to end, as subprocesses, on a tiny model and the embedded Shakespeare text."""
import concurrent.futures
import os
import subprocess
import sys

import pytest
import torch
from budget import drift

from nanogpt import checkpoint
from nanogpt.model import MODERN as MODERN_OPTIONS

TINY = ["--plot=False", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--device=cpu", "--dtype=float32",
        "--compile=False", "--eval_iters=2", "--log_interval=1", "--dropout=0.0", "--dataset=shakespeare_char",
        "--warmup_iters=2", "--lr_decay_iters=8", "--learning_rate=3e-3", "--kernels=torch"]


def run(args, cwd, timeout=300, **kw):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


# {name: future of a trainer run}: the single-threaded runs that depend on no test, started by `workdir` on two
# workers beside the tests (on CI's 2 cores they would otherwise leave one idle)
LATER = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    run(["nanogpt.prepare", "shakespeare_char"], d)
    one_thread = dict(os.environ, OMP_NUM_THREADS="1")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for recipe, name in RECIPES:  # test_ddp_two_ranks_equal_one_process's single process
            args = ["nanogpt.train", *ddp_common(recipe), f"--out_dir=out-single{name}", "--batch_size=8",
                    "--gradient_accumulation_steps=2"]
            LATER[f"single{name}"] = pool.submit(run, args, d, env=one_thread)
        LATER["nompl"] = pool.submit(subprocess.run, [sys.executable, "-c", NO_MATPLOTLIB, *TINY, "--plot=True",
                                                      "--out_dir=out-nompl", "--batch_size=2", "--max_iters=2",
                                                      "--gradient_accumulation_steps=1"],
                                     cwd=d, env=one_thread, capture_output=True, text=True, timeout=300)
        yield d
        pool.shutdown(cancel_futures=True)
    LATER.clear()


def final_params(out_dir):
    return checkpoint.load(str(out_dir), "latest", with_state=False)[0]["model"]


def test_train_then_sample(workdir):
    out = run(["nanogpt.train", *TINY, "--out_dir=out-tiny", "--batch_size=4", "--max_iters=8",
               "--eval_interval=4", "--gradient_accumulation_steps=2"], workdir).stdout
    assert ("kernels (cpu, float32): attention=torch, layer_norm=torch, bias_gelu=torch, adamw=torch, "
            "linear_cross_entropy=torch") in out
    assert "CPU memory: glibc keeps freed blocks" in out  # cpu_keep_memory's default (nanogpt.cpu_memory)
    assert "step 8: train loss" in out and "saved checkpoint at iter 8" in out
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in out.splitlines() if line.startswith("iter ")]
    assert len(losses) == 9 and losses[-1] < losses[0]
    (workdir / "prompt.txt").write_text("ROMEO:")
    # a prompt outside the vocab, run beside the good sample (on another core)
    bad = subprocess.Popen([sys.executable, "-m", "nanogpt.sample", "--out_dir=out-tiny", "--start=\u00e9", "--device=cpu"],
                           cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        sample = run(["nanogpt.sample", "--out_dir=out-tiny", "--start=FILE:prompt.txt", "--num_samples=2",
                      "--max_new_tokens=40", "--device=cpu", "--dtype=float32", "--kernels=torch"], workdir).stdout
        _, bad_err = bad.communicate(timeout=300)
    finally:
        bad.kill()
    texts = sample.split("---------------")
    assert len(texts) == 3 and all(t.strip().startswith("ROMEO:") for t in texts[:2])
    assert all(len(t.strip()) == len("ROMEO:") + 40 for t in texts[:2])  # char-level: one char per token
    assert bad.returncode == 2 and bad_err.count("\n") == 1 and "not in the 65-char vocab" in bad_err


# every modern option (with AdamW: Muon's orthogonalisation lifts the gradient's smallest singular directions,
# where the all-reduced mean and the single process's sum differ by rounding, to full size; its sharding is
# tests/test_modern.py's)
MODERN = [f"--{k}={v}" for k, v in MODERN_OPTIONS.items()]
RECIPES = [([], ""), (MODERN, "-modern")]  # (options, out_dir suffix)


def ddp_common(recipe):
    return [*TINY, *recipe, "--max_iters=5", "--eval_interval=5"]


@pytest.mark.parametrize("recipe", [[], MODERN], ids=["gpt2", "modern"])
def test_ddp_two_ranks_equal_one_process(workdir, recipe):
    """2 gloo ranks x 2 micro-steps x batch 4 end with the parameters of 1 process x 2 micro-steps x batch 8."""
    common = ddp_common(recipe)
    name = "-modern" if recipe else ""
    LATER[f"single{name}"].result()  # `workdir` started it: batch 8, 2 micro-steps, out-single{name}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run(["torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanogpt.train", *common,
         f"--out_dir=out-ddp{name}", "--batch_size=4", "--gradient_accumulation_steps=4"], workdir, env=env)
    single, ddp = final_params(workdir / f"out-single{name}"), final_params(workdir / f"out-ddp{name}")
    assert single.keys() == ddp.keys()
    for k in single:  # the two sum each gradient in another order: up to n_embd-term dot products, 5 steps
        tol = drift(5, single[k].abs().max().item(), ulps=4 * 32)
        assert (ddp[k] - single[k]).abs().max().item() <= tol, k


def test_sample_from_a_local_hugging_face_gpt2(tmp_path):
    """init_from=<HF directory>: GPT-2 BPE through tiktoken, the prompt kept, max_new_tokens added."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=50257)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "tiny-gpt2")
    out = run(["nanogpt.sample", "--init_from=tiny-gpt2", "--start=Hello world", "--num_samples=1",
               "--max_new_tokens=5", "--device=cpu", "--dtype=float32", "--kernels=torch"], tmp_path).stdout
    from nanogpt.codec import load_codec
    encode, _ = load_codec(None)
    text = out.split("---------------")[0].rstrip("\n")
    assert text.startswith("Hello world") and len(encode(text)) >= len(encode("Hello world")) + 1


# ---------------------------------------------------------------- the quick start, run as a newcomer does

def readme_quick_start():
    """The trainer's part of README's quick-start command: [(console script, args)] after the install steps."""
    import shlex
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if "nanogpt-train configs/quickstart.py" in ln)
    steps = [shlex.split(part) for part in line.split(" && ")]
    return [(s[0], s[1:]) for s in steps if s[0].startswith("nanogpt-")]


def test_quick_start_runs_twice_and_draws_loss_png(tmp_path, monkeypatch, capsys):
    """README's command in a fresh directory (the installed console scripts' functions, in this process; a tiny
    model and max_iters): the second run trains nothing and samples again; a raised max_iters resumes."""
    import shutil
    from importlib.metadata import entry_points
    from pathlib import Path

    shutil.copytree(Path(__file__).resolve().parents[1] / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    tiny = {"nanogpt-train": [*TINY, "--plot=True", "--batch_size=2", "--max_iters=3"],
            "nanogpt-sample": ["--max_new_tokens=8", "--kernels=torch"]}
    steps = readme_quick_start()
    assert [s for s, _ in steps] == ["nanogpt-prepare", "nanogpt-train", "nanogpt-sample"]

    def run_readme():
        outs = {}
        for script, args in steps:
            (entry,) = entry_points(group="console_scripts", name=script)
            entry.load()([*args, *tiny.get(script, [])])  # an error would exit (SystemExit)
            outs[script] = capsys.readouterr().out
        assert outs["nanogpt-sample"].count("---------------") == 2
        return outs["nanogpt-train"]

    out_dir = tmp_path / "out-shakespeare-char"
    first = run_readme()
    assert "saved checkpoint at iter 3 to out-shakespeare-char" in first
    assert f"wrote {os.path.join('out-shakespeare-char', 'loss.png')}" in first
    assert (out_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = {p: p.stat().st_mtime_ns for p in out_dir.rglob("*")}

    second = run_readme()
    assert ("already trained to iter 3 in out-shakespeare-char; raise --max_iters to train further, or pass a new "
            "--out_dir") in second
    assert not any(line.startswith(("iter ", "step ")) for line in second.splitlines())  # not one step, no eval
    assert {p: p.stat().st_mtime_ns for p in out_dir.rglob("*")} == before  # nothing written

    # a run that stopped short of max_iters (here: max_iters raised) resumes
    train_args = dict(steps)["nanogpt-train"]
    from nanogpt.train import main
    main([*train_args, *tiny["nanogpt-train"], "--max_iters=5"])
    assert "resuming from iter 3" in capsys.readouterr().out and checkpoint.latest_iter(out_dir) == 5


NO_MATPLOTLIB = "import sys; sys.modules['matplotlib'] = None; from nanogpt.train import main; main(sys.argv[1:])"


def test_train_without_matplotlib(workdir):
    """matplotlib is optional: without it the run ends as usual, with a note instead of loss.png."""
    out = LATER["nompl"].result()  # `workdir` started it: NO_MATPLOTLIB with --plot=True, out-nompl, 2 iters
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "saved checkpoint at iter 2" in out.stdout and "matplotlib is not installed" in out.stdout
    assert not (workdir / "out-nompl" / "loss.png").exists()
