import pytest

from nanogpt.configurator import ConfigError, configure

DEFAULTS = dict(batch_size=12, learning_rate=6e-4, compile=True, init_from="scratch", wandb_run_name=None)


def test_overrides_parse_and_type_check():
    c = configure(DEFAULTS, ["--batch_size=32", "--learning_rate=1", "--compile=False", "--init_from=resume",
                             "--wandb_run_name='run 1'"])
    assert c == dict(batch_size=32, learning_rate=1.0, compile=False, init_from="resume", wandb_run_name="run 1")
    assert isinstance(c["learning_rate"], float)
    assert configure(DEFAULTS, ["--init_from=123"])["init_from"] == "123"


@pytest.mark.parametrize("arg,match", [
    ("--batch_sise=3", "unknown config key 'batch_sise'"),
    ("--batch_size=3.5", "batch_size must be int"),
    ("--compile=1", "compile must be bool"),
    ("--batch_size=big", "--batch_size: cannot parse 'big'"),
    ("--init_from=a=b", "--init_from: value 'a=b' contains '='"),
    ("--batch_size", "expected --key=value"),
])
def test_override_errors_name_the_key(arg, match):
    with pytest.raises(ConfigError, match=match) as e:
        configure(DEFAULTS, [arg])
    assert "\n" not in str(e.value)


def test_config_file(tmp_path):
    good = tmp_path / "good.py"
    good.write_text("import math\nbatch_size = 4\nlearning_rate = 3e-4\n_private = 1\n")
    c = configure(DEFAULTS, [str(good), "--batch_size=8"])  # later arguments win
    assert c["batch_size"] == 8 and c["learning_rate"] == 3e-4
    bad = tmp_path / "bad.py"
    bad.write_text("batch_sizes = 4\n")
    with pytest.raises(ConfigError, match="bad.py: unknown config key 'batch_sizes'"):
        configure(DEFAULTS, [str(bad)])
    with pytest.raises(ConfigError, match="cannot read config file"):
        configure(DEFAULTS, [str(tmp_path / "missing.py")])


def test_shipped_configs_load():
    from pathlib import Path

    from nanogpt.train import DEFAULTS as TRAIN
    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("*.py")):
        configure(TRAIN, [str(path)])
    cpu = configure(TRAIN, [str(root / "train_shakespeare_char_cpu.py")])
    assert (cpu["n_layer"], cpu["n_embd"], cpu["block_size"], cpu["batch_size"], cpu["device"]) == (4, 128, 64, 12, "cpu")
    assert cpu["dataset"] == "shakespeare_char" and cpu["max_iters"] == 2000


@pytest.mark.parametrize("native,attention,want", [(True, "ext", "bfloat16"), (False, "ext", "float32"),
                                                   (True, "torch", "float32")])
def test_auto_dtype_on_cpu_needs_bf16_units_and_our_attention(monkeypatch, native, attention, want):
    from nanogpt import ops

    seen = []
    monkeypatch.setattr(ops, "cpu_native_bf16", lambda: native)
    monkeypatch.setattr(ops, "resolve", lambda spec, device_type: seen.append(spec) or {"attention": attention})
    assert ops.auto_dtype("cpu", "attention:torch") == want
    assert seen in ([], ["attention:torch"])  # the kernels asked for decide, not auto's


def test_dtype_auto_resolves_before_training(tmp_path, monkeypatch):
    import copy

    from nanogpt import ops, train

    monkeypatch.setattr(train, "check_data", lambda *a: None)  # no prepared dataset needed for this check
    c = copy.deepcopy(train.DEFAULTS) | dict(device="cpu", dtype="auto", kernels="torch", out_dir=str(tmp_path / "o"))
    train.check_config(c, 1)
    assert c["dtype"] == ops.auto_dtype("cpu", "torch") == "float32"  # torch's CPU attention: float32
