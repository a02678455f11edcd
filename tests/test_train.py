"""The trainer and sampler end to end, as subprocesses, on a tiny model and the embedded Shakespeare text."""
import os
import subprocess
import sys

import pytest
import torch

from nanogpt import checkpoint

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--device=cpu", "--dtype=float32",
        "--compile=False", "--eval_iters=2", "--log_interval=1", "--dropout=0.0", "--dataset=shakespeare_char",
        "--warmup_iters=2", "--lr_decay_iters=8", "--learning_rate=3e-3", "--kernels=torch"]


def run(args, cwd, timeout=300, **kw):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    run(["nanogpt.prepare", "shakespeare_char"], d)
    return d


def final_params(out_dir):
    return checkpoint.load(str(out_dir), "latest", with_state=False)[0]["model"]


def test_train_then_sample(workdir):
    out = run(["nanogpt.train", *TINY, "--out_dir=out-tiny", "--batch_size=4", "--max_iters=8",
               "--eval_interval=4", "--gradient_accumulation_steps=2"], workdir).stdout
    assert ("kernels (cpu, float32): attention=torch, layer_norm=torch, bias_gelu=torch, adamw=torch, "
            "linear_cross_entropy=torch") in out
    assert "step 8: train loss" in out and "saved checkpoint at iter 8" in out
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in out.splitlines() if line.startswith("iter ")]
    assert len(losses) == 9 and losses[-1] < losses[0]
    (workdir / "prompt.txt").write_text("ROMEO:")
    sample = run(["nanogpt.sample", "--out_dir=out-tiny", "--start=FILE:prompt.txt", "--num_samples=2",
                  "--max_new_tokens=40", "--device=cpu", "--dtype=float32", "--kernels=torch"], workdir).stdout
    texts = sample.split("---------------")
    assert len(texts) == 3 and all(t.strip().startswith("ROMEO:") for t in texts[:2])
    assert all(len(t.strip()) == len("ROMEO:") + 40 for t in texts[:2])  # char-level: one char per token
    bad = subprocess.run([sys.executable, "-m", "nanogpt.sample", "--out_dir=out-tiny", "--start=\u00e9", "--device=cpu"],
                         cwd=workdir, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not in the 65-char vocab" in bad.stderr


def test_ddp_two_ranks_equal_one_process(workdir):
    """2 gloo ranks x 2 micro-steps x batch 4 end with the parameters of 1 process x 2 micro-steps x batch 8."""
    common = [*TINY, "--max_iters=5", "--eval_interval=5"]
    run(["nanogpt.train", *common, "--out_dir=out-single", "--batch_size=8", "--gradient_accumulation_steps=2"], workdir)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run(["torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanogpt.train", *common,
         "--out_dir=out-ddp", "--batch_size=4", "--gradient_accumulation_steps=4"], workdir, env=env)
    single, ddp = final_params(workdir / "out-single"), final_params(workdir / "out-ddp")
    assert single.keys() == ddp.keys()
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], atol=2e-6, rtol=1e-5, msg=k)


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
