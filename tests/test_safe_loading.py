"""No file we load runs code (CPU, tiny model):

- checkpoint files (model, state, nanoGPT's ckpt.pt), meta.pkl and a Hugging Face pytorch_model.bin whose
  pickles would create a marker are refused with a one-line error and exit 2 through every entry point
  (nanogpt-sample, nanogpt-train --init_from=resume, auto, scratch, a model directory), and the marker never
  appears;
- a checkpoint written as releases before weights-only loading wrote it (numpy's RNG state as an ndarray)
  loads through the allow-list and resumes bitwise;
- malformed but harmless checkpoints and vocabularies are one-line errors too.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from nanogpt import checkpoint
from nanogpt import prepare as P
from nanogpt.codec import read_meta
from nanogpt.data import DataError
from test_reliability import TIMEOUT, Workdir, _env, _args, _one_line, assert_same_run, bad, ok, snapshot, train

SHORT = dict(max_iters=8, eval_interval=4)  # the reference run; its first half stops at 4

# train.rng_state as releases before weights-only loading had it: numpy's state is a tuple holding an ndarray
LEGACY_TRAIN = """
import random, sys
import numpy as np, torch
from nanogpt import train
train.rng_state = lambda: {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                           "cuda": None}
train.main(sys.argv[1:])
"""


class Marker:
    """Unpickles as os.mkdir(path): a file that would run code when loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


MKDIR = f"{os.mkdir.__module__}.mkdir"  # what the refusal names (posix.mkdir here)


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    w = Workdir(tmp_path_factory.mktemp("safe"))
    P.prepare("shakespeare_char", w.data)
    return w


@pytest.fixture(scope="module")
def ref(wd):
    ok(train(wd, out_dir="ref", **SHORT))
    return wd.path / "ref"


def model_file(out):
    return out / json.loads((out / "latest.json").read_text())["model"]


def state_file(out):
    return out / json.loads((out / "latest.json").read_text())["state"]


def bad_cli(capsys, main, *expect, **args):
    """A command's main in-process: a one-line error and exit 2."""
    capsys.readouterr()
    with torch.random.fork_rng(), pytest.raises(SystemExit) as e:
        main([f"--{k}={v}" for k, v in args.items()])
    return _one_line(capsys.readouterr().err, e.value.code, *expect)


def bad_sample(capsys, *expect, **over):
    from nanogpt.sample import main
    args = dict(device="cpu", dtype="float32", kernels="torch", num_samples=1, max_new_tokens=4) | over
    return bad_cli(capsys, main, *expect, **args)


# ---------------------------------------------------------------- checkpoints of earlier releases

def test_checkpoint_of_earlier_release_loads_and_resumes_bitwise(wd, ref):
    legacy_train = wd.path / "legacy_train.py"
    legacy_train.write_text(LEGACY_TRAIN)
    old = wd.path / "old"
    ok(subprocess.run([sys.executable, str(legacy_train), *_args(wd, out_dir=old, **(SHORT | dict(max_iters=4)))],
                      cwd=wd.path, env=_env(), capture_output=True, text=True, timeout=TIMEOUT))
    # the fixture holds what weights-only loading refuses by default; what we write now holds nothing of it
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(state_file(old))
    for f in (model_file(ref), state_file(ref)):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(f) == []

    from nanogpt.train import rng_state, set_rng_state
    saved = rng_state()
    try:  # both forms of numpy's state set the generator they describe
        legacy = checkpoint.load(str(old))[1]["ranks"][0]["rng"]
        set_rng_state(legacy)
        assert np.array_equal(np.random.get_state()[1], legacy["numpy"][1])
        current = checkpoint.load(str(ref))[1]["ranks"][0]["rng"]
        set_rng_state(current)
        assert np.random.get_state()[1].tolist() == current["numpy"]["state"]["key"]
    finally:
        set_rng_state(saved)

    assert "resuming from iter 4" in ok(train(wd, out_dir=old, init_from="resume", **SHORT)).stdout
    assert_same_run(old, ref)


# ---------------------------------------------------------------- files that would run code

@pytest.mark.parametrize("where", ["model", "state", "nanogpt"])
def test_checkpoint_that_would_run_code_is_refused(wd, ref, capsys, tmp_path, where):
    out, marker = tmp_path / "o", tmp_path / "marker"
    if where == "nanogpt":
        out.mkdir()
        path = out / checkpoint.NANOGPT_FILE
    else:
        shutil.copytree(ref, out)
        path = model_file(out) if where == "model" else state_file(out)
    torch.save({"model": Marker(marker), "model_args": {}, "optimizer": {}, "iter_num": 4, "best_val_loss": 1.0},
               path)
    before = snapshot(out)
    expect = (f"checkpoint file {path} is refused: it holds {MKDIR}", "could run code")
    if where != "state":  # sampling, export and eval read the model file only
        from nanogpt import export, harness
        bad_sample(capsys, *expect, out_dir=out)
        bad_cli(capsys, export.main, *expect, out_dir=out, to=tmp_path / "exported")
        bad_cli(capsys, harness.main, *expect, out_dir=out, device="cpu", dtype="float32", kernels="torch")
    for init_from in ("resume", "auto"):
        bad(wd, capsys, *expect, out_dir=out, init_from=init_from)
    assert not marker.exists() and snapshot(out) == before


def test_cli_refuses_with_one_line_and_exit_2(wd, tmp_path):
    """The console command as a user runs it (the tests above call the same main() in-process)."""
    out, marker = tmp_path / "o", tmp_path / "marker"
    out.mkdir()
    torch.save({"model": Marker(marker)}, out / "ckpt.pt")
    proc = subprocess.run([sys.executable, "-m", "nanogpt.sample", f"--out_dir={out}", "--device=cpu"], cwd=wd.path,
                          env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    _one_line(proc.stderr, proc.returncode, "ckpt.pt is refused", MKDIR)
    assert not marker.exists() and os.listdir(out) == ["ckpt.pt"]


def plant_meta(wd, tmp_path, meta_pkl):
    """A copy of the prepared data whose vocabulary is only the given meta.pkl bytes (a nanoGPT-made dir has no
    meta.json); its manifest still says complete."""
    data = tmp_path / "data"
    shutil.copytree(wd.data, data)
    (data / "meta.json").unlink()
    (data / "meta.pkl").write_bytes(meta_pkl)
    manifest = json.loads((data / P.MANIFEST).read_text())
    for name in ("meta.json", "meta.pkl"):
        del manifest["files"][name]
    (data / P.MANIFEST).write_text(json.dumps(manifest))
    return data


def out_dir_reading(ref, tmp_path, data):
    """A copy of ref whose run's config names `data` (where sampling finds its vocabulary)."""
    out = tmp_path / "o"
    shutil.copytree(ref, out)
    payload = checkpoint.load(str(out), with_state=False)[0]
    payload["config"]["data_dir"] = str(data)
    torch.save(payload, model_file(out))
    return out


def test_meta_pkl_that_would_run_code_is_refused(wd, ref, capsys, tmp_path):
    marker = tmp_path / "marker"
    data = plant_meta(wd, tmp_path, pickle.dumps({"vocab_size": 65, "stoi": Marker(marker), "itos": {}}))
    expect = (f"{data / 'meta.pkl'} is refused: it names {MKDIR}", "could run code", "nanogpt-prepare shakespeare_char")
    bad_sample(capsys, *expect, out_dir=out_dir_reading(ref, tmp_path, data))
    for init_from in ("scratch", "auto"):
        bad(wd, capsys, *expect, data_dir=data, out_dir=tmp_path / "new", init_from=init_from)
    assert not marker.exists() and not (tmp_path / "new").exists()
    # beside a meta.json, meta.pkl is never read
    shutil.copy(os.path.join(wd.data, "meta.json"), data)
    assert read_meta(data)["vocab_size"] == 65 and not marker.exists()


def test_pretrained_weights_that_would_run_code_are_refused(wd, capsys, tmp_path):
    from transformers import GPT2Config
    hf, marker = tmp_path / "tiny-gpt2", tmp_path / "marker"
    GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=65).save_pretrained(hf)
    torch.save({"transformer.wte.weight": Marker(marker)}, hf / "pytorch_model.bin")
    expect = (f"the pretrained model '{hf}' is refused: its weights hold {MKDIR}",)
    bad_sample(capsys, *expect, init_from=hf)
    bad(wd, capsys, *expect, init_from=hf, out_dir=tmp_path / "o")
    assert not marker.exists()


# ---------------------------------------------------------------- malformed but harmless files

def _damage_model(out, change):
    payload = checkpoint.load(str(out), with_state=False)[0]
    torch.save(change(payload), model_file(out))


def _damage_state(out, change):
    state = checkpoint.load(str(out))[1]
    torch.save(change(state), state_file(out))


MALFORMED = {  # what to do to a copy of ref, and what the error says
    "model-int": (lambda o: torch.save(0, model_file(o)), "is malformed (it holds int, not a dict)"),
    "no-model": (lambda o: _damage_model(o, lambda p: {k: v for k, v in p.items() if k != "model"}), "no 'model'"),
    "model-args-list": (lambda o: _damage_model(o, lambda p: p | {"model_args": [2, 2]}),
                        "'model_args' has type list"),
    "weight-not-tensor": (lambda o: _damage_model(o, lambda p: p | {"model": p["model"] | {"lm_head.weight": 1.0}}),
                          "model entry 'lm_head.weight' is not a named tensor"),
    "unknown-model-arg": (lambda o: _damage_model(o, lambda p: p | {"model_args": p["model_args"] | {"n_layers": 2}}),
                          "unknown model arg 'n_layers'"),
    "model-arg-type": (lambda o: _damage_model(o, lambda p: p | {"model_args": p["model_args"] | {"n_layer": "2"}}),
                       "model arg 'n_layer' has type str"),
    "iter-str": (lambda o: _damage_state(o, lambda s: s | {"iter_num": "8"}), "'iter_num' has type str"),
    "optimizer-list": (lambda o: _damage_state(o, lambda s: s | {"optimizer": {"state": {}, "param_groups": 1}}),
                       "'optimizer' is not an optimizer state_dict"),
    "rng-int": (lambda o: _damage_state(o, lambda s: s | {"ranks": [{"rng": 1, "batcher": {}}]}),
                "the training state in", "does not fit this run (TypeError"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_checkpoint_is_one_line(wd, ref, capsys, tmp_path, case):
    damage, *expect = MALFORMED[case]
    out = tmp_path / "o"
    shutil.copytree(ref, out)
    damage(out)
    before = snapshot(out)
    bad(wd, capsys, *expect, out_dir=out, init_from="resume")
    if case.startswith(("model", "no-model", "weight", "unknown")):
        bad_sample(capsys, *expect, out_dir=out)
    assert snapshot(out) == before


@pytest.mark.parametrize("content,expect", [
    (pickle.dumps([1, 2]), "is not a character vocabulary"),
    (pickle.dumps({"vocab_size": "65", "stoi": {}, "itos": {}}), "is not a character vocabulary"),
    (pickle.dumps({"vocab_size": 2, "stoi": {"a": 0}, "itos": {0: 1}}), "is not a character vocabulary"),
    (pickle.dumps({"vocab_size": 65})[:-3], "is corrupt (pickle data was truncated"),
], ids=["list", "vocab-size-str", "itos-values", "truncated"])
def test_malformed_meta_pkl_is_one_line(wd, ref, capsys, tmp_path, content, expect):
    data = plant_meta(wd, tmp_path, content)
    with pytest.raises(DataError, match="nanogpt-prepare shakespeare_char"):
        read_meta(data)
    bad_sample(capsys, f"{data / 'meta.pkl'} {expect}", out_dir=out_dir_reading(ref, tmp_path, data))


@pytest.mark.parametrize("content", ["{not json", json.dumps({"vocab_size": 2, "itos": "ab"})])
def test_malformed_meta_json_is_one_line(tmp_path, content):
    (tmp_path / "meta.json").write_text(content)
    with pytest.raises(DataError, match=r"meta\.json is (unreadable|not a character vocabulary)"):
        read_meta(tmp_path)
