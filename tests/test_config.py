import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nanogpt.configurator import ConfigError, Keys, configure

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = Keys("test", "A test command.", {"g": dict(
    batch_size=(12, "b"), learning_rate=(6e-4, "lr"), compile=(True, "c"), init_from=("scratch", "i"),
    wandb_run_name=(None, "w"))})


def test_overrides_parse_and_type_check():
    c = configure(DEFAULTS, ["--batch_size=32", "--learning_rate=1", "--compile=False", "--init_from=resume",
                             "--wandb_run_name='run 1'"])
    assert c == dict(batch_size=32, learning_rate=1.0, compile=False, init_from="resume", wandb_run_name="run 1")
    assert isinstance(c["learning_rate"], float)
    assert configure(DEFAULTS, ["--init_from=123"])["init_from"] == "123"


@pytest.mark.parametrize("arg,match", [
    ("--batch_sise=3", r"unknown config key 'batch_sise' in --batch_sise=3; did you mean batch_size\? --help lists"),
    ("--zzz=3", "unknown config key 'zzz' in --zzz=3; --help lists the keys"),
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
    with pytest.raises(ConfigError, match=r"bad.py: unknown config key 'batch_sizes'; did you mean batch_size\? --help"):
        configure(DEFAULTS, [str(bad)])
    with pytest.raises(ConfigError, match="cannot read config file"):
        configure(DEFAULTS, [str(tmp_path / "missing.py")])


def test_shipped_configs_load():
    from nanogpt.train import DEFAULTS as TRAIN
    root = ROOT / "configs"
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


@pytest.mark.parametrize("cap,native", [("AVX2", False), ("avx512_core", False), ("AVX512_CORE_BF16", True),
                                        ("AVX512_CORE_AMX", True), ("ALL", True)])
def test_cpu_native_bf16_follows_onednn_cap(monkeypatch, cap, native):
    # oneDNN runs torch's bf16 matmuls: capped below bf16 units, bf16 is emulated whatever the CPU has
    import torch

    from nanogpt import ops

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert ops.cpu_native_bf16() is native


def test_capped_isa_gets_its_own_compile_cache(monkeypatch, tmp_path):
    # torch.compile's cache ignores ATEN_CPU_CAPABILITY: a capped process (the trainer, bench.py, the tests) must not
    # share the uncapped one's
    import os

    from nanogpt import ops, train

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    with pytest.raises(SystemExit):
        train.main(["--help"])  # the trainer sets it before anything compiles
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].endswith("torchinductor_avx2")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # the user's own choice stands
    ops.separate_inductor_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    ops.separate_inductor_cache()  # uncapped: torch's default
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_dtype_auto_resolves_before_training(tmp_path, monkeypatch):
    import copy

    from nanogpt import ops, train

    monkeypatch.setattr(train, "check_data", lambda *a: None)  # no prepared dataset needed for this check
    c = copy.deepcopy(train.DEFAULTS) | dict(device="cpu", dtype="auto", kernels="torch", out_dir=str(tmp_path / "o"))
    train.check_config(c, 1)
    assert c["dtype"] == ops.auto_dtype("cpu", "torch") == "float32"  # torch's CPU attention: float32


# ---------------------------------------------------------------- --help, from the definition the keys are checked against

def _load(path):
    spec = importlib.util.spec_from_file_location(f"cli_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _commands():
    """(name, main, its Keys) of every command that takes --key=value."""
    from nanogpt import export, harness, sample, train
    bench, gen, roof, scale, mu = (_load(ROOT / "benchmarks" / f"{n}.py")
                                   for n in ("bench", "bench_generate", "kernel_roofline", "bench_scaleout", "bench_muon"))
    return [("nanogpt-train", train.main, train.DEFAULTS), ("nanogpt-sample", sample.main, sample.DEFAULTS),
            ("nanogpt-export", export.main, export.DEFAULTS), ("nanogpt-eval", harness.main, harness.DEFAULTS),
            ("bench.py", bench.main, bench.defaults(bench.default_device())),
            ("bench_generate.py", gen.main, gen.DEFAULTS), ("kernel_roofline.py", roof.main, roof.DEFAULTS),
            ("bench_scaleout.py", scale.main, scale.DEFAULTS), ("bench_muon.py", mu.main, mu.DEFAULTS)]


def help_lines(capsys, main, argv):
    """What main(argv) prints, checking that it exits 0."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    return out.splitlines()


def test_every_configured_command_is_checked():
    """A new command that reads --key=value joins _commands(), so the test below checks its --help too."""
    users = {p.name for d in ("nanogpt", "benchmarks") for p in (ROOT / d).glob("*.py")
             if "configure(" in p.read_text() and p.name != "configurator.py"}
    assert users == {"train.py", "sample.py", "export.py", "harness.py", "bench.py", "bench_generate.py",
                     "kernel_roofline.py", "bench_scaleout.py", "bench_muon.py"}


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_key_of_every_command(capsys, flag):
    for name, main, keys in _commands():
        lines = help_lines(capsys, main, [flag])
        assert lines[0].startswith("usage: ") and name in lines[0]
        listed = {m.group(1): line for line in lines if (m := re.match(r"  --(\w+)=", line))}
        assert list(listed) == list(keys), name  # every key, in the definition's order, nothing else
        for key, default in keys.items():
            group, about = keys.about[key]
            assert f"{about} (default: {default!r})" in listed[key], (name, key)
        assert [line[:-1] for line in lines if line.endswith(":") and not line.startswith(" ")] == \
            list(dict.fromkeys(g for g, _ in keys.about.values())), name  # the groups, in order


def test_help_shows_the_values_after_the_config_file(tmp_path, capsys):
    from nanogpt import train
    lines = help_lines(capsys, train.main, [str(ROOT / "configs" / "quickstart.py"), "--n_layer=3", "--help", "--x"])
    assert any(line.startswith("  --out_dir=STR ") and line.endswith("(default: 'out-shakespeare-char')") for line in lines)
    assert any(line.startswith("  --n_layer=INT ") and line.endswith("(default: 3)") for line in lines)
    assert any(line.startswith("  --init_from=STR ") and line.endswith("(default: 'auto')") for line in lines)
    # the console command: exit 0, nothing started or written
    proc = subprocess.run([sys.executable, "-m", "nanogpt.train", "--help"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "--max_iters=INT" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_key_is_defined_once():
    with pytest.raises(ValueError, match="'a' is defined twice"):
        Keys("x", "doc", {"g": dict(a=(1, "one")), "h": dict(a=(2, "two"))})


def test_readme_config_table_matches_the_definition():
    """README's "Config keys" table: the groups of nanogpt-train --help, in order, each with its keys."""
    from nanogpt.train import DEFAULTS as TRAIN
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Config keys (`nanogpt-train`)")[1].split("\n## ")[0]
    rows = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    groups = {}
    for key, (group, _) in TRAIN.about.items():
        groups.setdefault(group, []).append(key)
    assert [g.strip() for g, _ in rows] == list(groups)
    for (group, cell), keys in zip(rows, groups.values()):
        assert [k for k in re.findall(r"`(\w+)`", cell) if k in TRAIN] == keys, group
    from nanogpt.sample import DEFAULTS as SAMPLE
    sampling = readme.split("## Sampling")[1].split("\n## ")[0]
    assert set(SAMPLE) <= set(re.findall(r"`(\w+)`", sampling))
