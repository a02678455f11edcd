"""The benchmark tools in benchmarks/ (CPU, tiny shapes): bench.py, plot.py, kernel_roofline.py."""
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

from nanogpt_kernels import registry

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
TINY = ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
        "--vocab_size=65", "--warmup=1", "--iters=3"]
MODE_FIELDS = {"mode", "kernels", "compile", "dtype", "activation_checkpointing", "status", "backends", "first_loss", "first_grad_norm", "n", "ms_median",
               "ms_p10", "ms_p90", "tokens_per_s", "mfu", "peak_mem_mb", "ratio_to_baseline"}


def _load(name):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module", autouse=True)
def _autotune_cache(tmp_path_factory):
    """The measured auto's verdicts go to a throw-away cache, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOGPT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def bench():
    return _load("bench")


@pytest.fixture(scope="module")
def tiny_result(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "result.json"
    argv = TINY + ["--modes=torch,torch+compile,auto,auto@bfloat16", "--memory=False", f"--json={out}"]
    bench.main(argv)
    return json.loads(out.read_text()), out


def test_bench_writes_json_and_losses_agree(tiny_result):
    res, _ = tiny_result
    assert res["check"]["ok"] and res["check"]["mismatched"] == []
    assert res["baseline"] == "torch+compile"
    assert res["cpu_memory"].startswith("CPU memory: ")  # set as nanogpt-train sets it (nanogpt.cpu_memory)
    assert [m["mode"] for m in res["modes"]] == ["torch", "torch+compile", "auto", "auto@bfloat16"]
    for m in res["modes"]:
        assert MODE_FIELDS <= set(m), MODE_FIELDS - set(m)
        assert m["status"] == "ok" and m["n"] == 3
        assert m["ms_p10"] <= m["ms_median"] <= m["ms_p90"]
        assert m["tokens_per_s"] > 0 and m["mfu"] > 0 and math.isfinite(m["first_loss"])
        assert set(m["backends"]) == {"attention", "layer_norm", "bias_gelu", "adamw", "linear_cross_entropy"}  # GPT-2's
    by = {m["mode"]: m for m in res["modes"]}
    assert by["torch+compile"]["ratio_to_baseline"] == 1.0
    assert set(by["torch"]["backends"].values()) == {"torch"}
    assert [m["dtype"] for m in res["modes"]] == ["float32"] * 3 + ["bfloat16"]
    losses = res["check"]["losses"]
    assert abs(losses["torch"] - losses["auto"]) <= 1e-4 * losses["torch"]
    assert res["check"]["rel_tolerance"] == 2e-2  # a bf16 mode loosens the gate for all
    assert 0 < abs(losses["torch"] - losses["auto@bfloat16"]) <= 2e-2 * losses["torch"]
    for key in ("device", "device_name", "torch", "config", "date", "tokens_per_iter", "backend_status"):
        assert key in res


def test_bench_fails_loudly_when_modes_disagree(bench, tmp_path):
    out = tmp_path / "bad.json"
    cfg = bench.load_config(TINY + ["--modes=torch,auto", "--memory=False", f"--json={out}"])
    with pytest.raises(bench.LossMismatch, match="disagree"):
        bench.run(cfg, perturb={"auto": 4242}, log=lambda *a: None)
    res = json.loads(out.read_text())
    assert res["check"]["ok"] is False and res["check"]["mismatched"] == ["auto"]


def test_bench_skips_unavailable_backend_and_profiles(bench, monkeypatch, tmp_path):
    real = registry.backend_unavailable
    monkeypatch.setattr(registry, "backend_unavailable",
                        lambda name, dev: "not built in this test" if name == "ext" else real(name, dev))
    cfg = bench.load_config(TINY + ["--modes=torch,ext,auto", "--iters=2", "--memory=False", "--profile=auto",
                                    "--profile_steps=2", f"--profile_dir={tmp_path}"])
    lines = []
    res = bench.run(cfg, log=lines.append)
    by = {m["mode"]: m for m in res["modes"]}
    assert by["ext"]["status"] == "skipped" and "not built in this test" in by["ext"]["reason"]
    assert any("mode ext: skipped" in line for line in lines)
    assert by["auto"]["status"] == "ok" and "ext" not in by["auto"]["backends"].values()
    assert res["baseline"] == "torch"  # no torch+compile mode: the first timed mode
    # --profile: a Chrome trace and the top ops by self time
    prof = res["profile"]["auto"]
    assert Path(prof["chrome_trace"]).stat().st_size > 0 and prof["top_ops"]
    assert json.loads(Path(prof["chrome_trace"]).read_text())["traceEvents"]


def test_bench_cpu_memory_probe(bench):
    # CPU memory: one fresh subprocess per mode, peak-RSS growth in MiB (the mode's activation checkpointing too)
    argv = TINY + ["--modes=torch", "--activation_checkpointing=block", "--iters=1", "--warmup=0", "--threads=1",
                   "--mem_steps=1"]
    threads = torch.get_num_threads()
    try:
        res = bench.run(bench.load_config(argv), argv=argv, log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)  # --threads=1 sets this process's: later tests key caches by it
    assert res["modes"][0]["mode"] == "torch+block"
    mem = res["modes"][0]["peak_mem_mb"]
    assert mem is not None and mem >= 0, res["modes"][0]
    assert "subprocess" in res["memory_method"]


def test_bench_rejects_bad_mode(bench):
    with pytest.raises(bench.UserError, match="mode"):
        bench.parse_modes("torch+fast", "auto", "float32")
    with pytest.raises(bench.UserError, match="dtype after @"):
        bench.parse_modes("auto@fp8", "auto", "float32")


def test_plot_bench_loss_and_health(tiny_result, tmp_path):
    plot = _load("plot")
    _, result_json = tiny_result
    png = tmp_path / "modes.png"
    plot.main(["bench", str(result_json), "-o", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    with metrics.open("w") as f:
        for i in range(50):
            f.write(json.dumps({"iter": i, "loss": 4.0 * math.exp(-i / 20) + 1, "lr": 1e-3, "ms": 10.0,
                                "tokens_per_s": 1e4, "mfu": 0.01, "grad_norm": 1.0, "clipped": i % 7 == 0,
                                "grad_norm/h.0": 0.5, "update_ratio/decay": 1e-3, "peak_mem_mb": 100.0}) + "\n")
            if i == 30:
                f.write(json.dumps({"iter": i, "event": "spike", "loss": 9.0, "mean": 2.0, "std": 0.1,
                                    "rows": [[0, 64]]}) + "\n")
            if i % 10 == 0:
                f.write(json.dumps({"iter": i, "train_loss": 4.0 * math.exp(-i / 20) + 1,
                                    "val_loss": 4.1 * math.exp(-i / 20) + 1.1}) + "\n")
    png2 = tmp_path / "loss.png"
    plot.main(["loss", str(metrics), "-o", str(png2)])
    assert png2.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png3 = tmp_path / "health.png"  # nanogpt.health's metrics
    plot.main(["health", str(metrics), "-o", str(png3)])
    assert png3.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kernel_roofline_cpu(tmp_path):
    roof = _load("kernel_roofline")
    out = tmp_path / "roof.json"
    # the Triton interpreter's timings mean nothing, and take most of the time: torch and the extension only
    res = roof.main(["--device=cpu", "--preset=tiny", "--rep_ms=2", "--compile_ref=False", "--backends=torch,ext",
                     f"--json={out}"])
    assert json.loads(out.read_text())["ceilings"]["copy_GBps"] > 0
    assert res["ceilings"]["matmul_TFLOPs"] > 0
    rows = [r for r in res["rows"] if r["backend"] == "torch"]
    assert {(r["op"], r["pass"]) for r in rows} == {(op, p) for op in registry.OPS for p in roof.PASSES[op]}
    assert {("layer_norm", "full"), ("attention", "bwd"), ("adamw", "step")} <= {(r["op"], r["pass"]) for r in rows}
    assert {r["backend"] for r in res["rows"]} == {"torch", "ext", "unfused"}
    assert res["backends"]["triton"] == "not in --backends"
    # the optional op also as the model runs without it
    assert {r["op"] for r in res["rows"] if r["backend"] == "unfused"} == {"linear_cross_entropy"}
    for r in res["rows"]:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["frac_of_ceiling"] > 0 and r["speedup_vs_torch"] > 0


def test_kernel_cases_follow_the_registry(monkeypatch):
    # a new registry op shows up in the kernel benchmarks: an optimizer needs nothing, a layer op its LAYER_CASES row
    monkeypatch.setitem(registry.REGISTRY, "adamw2", registry.REGISTRY["adamw"])
    monkeypatch.setitem(registry.REGISTRY, "gelu2", registry.REGISTRY["bias_gelu"])
    monkeypatch.setattr(registry, "OPS", tuple(registry.REGISTRY))
    cases = _load("kernel_cases")
    assert {("adamw2", "step"), ("gelu2", "fwd"), ("gelu2", "full")} <= set(cases.CASES)
    fn, work, unit = cases.make_case("adamw2", "step", "torch", "tiny", "cpu")
    fn()
    assert unit == "byte" and work > 0
    with pytest.raises(NotImplementedError, match="LAYER_CASES"):
        cases.make_case("gelu2", "fwd", "torch", "tiny", "cpu")


def test_suite_report_from_partial_run(tiny_result, tmp_path):
    rep = _load("suite_report")
    run = tmp_path / "logs"
    run.mkdir()
    (run / "stages.jsonl").write_text(
        json.dumps({"stage": "bench", "cmd": "python benchmarks/bench.py", "rc": 0, "status": "ok", "seconds": 1.0,
                    "log": "bench.log"}) + "\n"
        + json.dumps({"stage": "tests", "cmd": "pytest tests", "rc": 1, "status": "failed", "seconds": 2.0,
                      "log": "tests.log"}) + "\n")
    (run / "tests.log").write_text("E   boom\n1 failed, 3 passed\n")
    (run / "bench.json").write_text(tiny_result[1].read_text())
    (run / "pytest.xml").write_text(
        '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="0" time="2.5">'
        '<testcase classname="tests.test_x" name="test_a"><failure message="boom"/></testcase>'
        '</testsuite></testsuites>')
    rep.main(["report", f"--run={run}", f"--out={tmp_path / 'res'}", "--gpu=TestGPU", "--total_s=3"])
    md = (tmp_path / "res.md").read_text()
    assert "3 passed, 1 failed" in md and "tests.test_x::test_a" in md and "torch+compile" in md
    assert "no result (see the roofline stage log)" in md and "E   boom" in md
    assert "Gate: auto takes" in md  # the measured auto against eager torch, float32
    data = json.loads((tmp_path / "res.json").read_text())
    assert data["tests"]["passed"] == 3 and data["bench"]["check"]["ok"]
    # no JUnit XML (the tests stage timed out): counts come from the log
    (run / "pytest.xml").unlink()
    (run / "tests.log").write_text("....F.s\nFAILED tests/test_x.py::test_a - boom\n1 failed, 5 passed, 1 skipped in 2.00s\n")
    rep.main(["report", f"--run={run}", f"--out={tmp_path / 'res2'}"])
    t = json.loads((tmp_path / "res2.json").read_text())["tests"]
    assert (t["passed"], t["failures"], t["skipped"]) == (5, 1, 1) and t["failed"][0]["test"] == "tests/test_x.py::test_a"
    # the GPU suite's test files: the device-aware ones, by registry op among them
    assert "tests/test_model.py" in rep.device_tests() and "tests/test_bench.py" not in rep.device_tests()


def test_bench_reports_a_crashing_mode_and_goes_on(bench, monkeypatch):
    real_step = bench.Runner.step

    def step(self):
        if self.name == "auto":
            raise RuntimeError("kernel exploded")
        return real_step(self)

    monkeypatch.setattr(bench.Runner, "step", step)
    cfg = bench.load_config(TINY + ["--modes=torch,auto", "--memory=False"])
    res = bench.run(cfg, log=lambda *a: None)
    by = {m["mode"]: m for m in res["modes"]}
    assert by["auto"]["status"] == "failed" and "kernel exploded" in by["auto"]["reason"]
    assert by["torch"]["status"] == "ok" and by["torch"]["n"] == 3
    assert res["failed_modes"] == ["auto"] and res["complete"]


def _fake_times(bench, monkeypatch, ms):
    """Runner.timed_step records ms[mode] instead of timing: the gate's input, exactly."""
    monkeypatch.setattr(bench.Runner, "timed_step", lambda self: self.times.append(ms[self.name]))


def test_bench_auto_measured_once_per_dtype(bench, monkeypatch):
    # auto and ours share one measurement per dtype, taken in the mode's own autocast context
    calls = []

    def select_kernels(model, X, Y, ctx, kernels, autotune, optim, log):
        calls.append((kernels, getattr(ctx, "fast_dtype", None), autotune, optim["grad_clip"]))
        choice = dict(model.backends, layer_norm="torch")
        model.set_backends(choice)
        return choice

    monkeypatch.setattr(bench.ops, "select_kernels", select_kernels)
    cfg = bench.load_config(TINY + ["--modes=torch,auto,ours,auto@bfloat16", "--memory=False", "--iters=1"])
    res = bench.run(cfg, log=lambda *a: None)
    assert [c[0] for c in calls] == ["auto", "auto"] and calls[1][1] == torch.bfloat16
    assert all(c[2:] == (True, 1.0) for c in calls)
    by = {m["mode"]: m for m in res["modes"]}
    for mode in ("auto", "ours", "auto@bfloat16"):
        assert by[mode]["measured"] and by[mode]["backends"]["layer_norm"] == "torch", by[mode]
    assert not by["torch"]["measured"]


@pytest.mark.parametrize("auto_ms,rc", [(10.5, 1), (10.2, 0)])
def test_bench_gate_auto_not_slower_than_torch(bench, monkeypatch, capsys, auto_ms, rc):
    # auto (eager) more than 3% slower than torch (eager) in the same dtype: exit code 1 and one line why;
    # auto@bfloat16 has no torch@bfloat16 to be compared with, so its slowness is not a failure
    _fake_times(bench, monkeypatch, {"torch": 10.0, "auto": auto_ms, "auto@bfloat16": 50.0})
    assert bench.cli(TINY + ["--modes=torch,auto,auto@bfloat16", "--memory=False"]) == rc
    err = capsys.readouterr().err.strip().splitlines()
    if rc:
        assert err == [err[0]] and "auto is 5.0% slower than torch (eager) in float32" in err[0]
    else:
        assert err == []


def test_bench_activation_checkpointing_modes_and_costs(bench, monkeypatch):
    # --activation_checkpointing runs each mode in each; a +block/+selective mode is reported against the same
    # mode without it (time and memory); the speed gate compares auto with torch in the same checkpointing
    assert bench.parse_modes("auto+compile+block@bfloat16,torch", "auto", "float32", "none,selective") == [
        ("auto+compile+block@bfloat16", "auto", True, "bfloat16", "block"),
        ("torch", "torch", False, "float32", "none"), ("torch+selective", "torch", False, "float32", "selective")]
    for bad in ("torch+block+compile", "torch+block+selective", "torch+none"):
        with pytest.raises(bench.UserError, match="expected <kernels>"):
            bench.parse_modes(bad, "auto", "float32")
    with pytest.raises(bench.UserError, match="unknown activation_checkpointing 'fast'"):
        bench.parse_modes("torch", "auto", "float32", "none,fast")
    applied, real = [], bench.parallel.checkpoint_activations
    monkeypatch.setattr(bench.parallel, "checkpoint_activations", lambda m, mode: applied.append(mode) or real(m, mode))
    _fake_times(bench, monkeypatch, {"torch": 10.0, "torch+block": 13.0, "torch+selective": 11.0,
                                     "auto": 10.0, "auto+block": 13.2, "auto+selective": 11.5})
    mib = {"torch": 100.0, "torch+block": 40.0, "torch+selective": 80.0, "auto": 90.0, "auto+block": 45.0,
           "auto+selective": None}
    monkeypatch.setattr(bench, "probe_memory_cpu", lambda cfg, argv, name, backends: (mib[name], None))
    cfg = bench.load_config(TINY + ["--modes=torch,auto", "--activation_checkpointing=none,block,selective",
                                    "--iters=1", "--warmup=0", "--autotune=False"])
    lines = []
    res = bench.run(cfg, log=lines.append)
    assert applied == ["none", "block", "selective"] * 2
    by = {m["mode"]: m for m in res["modes"]}
    assert list(by) == ["torch", "torch+block", "torch+selective", "auto", "auto+block", "auto+selective"]
    assert by["torch+block"]["first_loss"] == by["torch+selective"]["first_loss"] == by["torch"]["first_loss"]
    assert by["torch+block"]["vs_no_checkpointing"] == {"mode": "torch", "ms_ratio": 1.3, "peak_mem_ratio": 0.4}
    assert by["auto+block"]["vs_no_checkpointing"] == {"mode": "auto", "ms_ratio": pytest.approx(1.32),
                                                       "peak_mem_ratio": 0.5}
    assert by["auto+selective"]["vs_no_checkpointing"]["peak_mem_ratio"] is None
    assert "vs_no_checkpointing" not in by["torch"]
    assert "activation checkpointing: torch+block takes 13.00 ms/step, 1.30x torch's; peak memory 40 MiB, 0.40x" \
        in lines
    assert len(res["auto_gate"]["checked"]) == 3
    assert [f.split(" is ")[0] for f in res["auto_gate"]["failed"]] == ["auto+selective"]  # 11.5 vs 11.0


def test_bench_capped_isa_gets_its_own_compile_cache(bench, monkeypatch):
    # as the trainer does (tests/test_config.py): a capped run must not share the uncapped one's torch.compile cache
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].endswith("torchinductor_avx2")
