"""benchmarks/bench_recipes.py's logic on synthetic metrics.jsonl (no training, nothing timed): the curve it reads,
the interpolated time to a target and loss at a time, the goal's verdict, the timing wrapper's records, --help."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_recipes.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_recipes", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def write_run(path, points, eval_s_per_eval=1.0):
    """A metrics.jsonl as a timed run writes it: per (iter, val loss, training s) a timing record, the
    evaluation's record and (sometimes) a checkpoint record; step records in between."""
    with open(path, "w") as f:
        for k, (it, val, train_s) in enumerate(points):
            f.write(json.dumps({"iter": it, "elapsed_s": train_s + k * eval_s_per_eval,
                                "eval_s": k * eval_s_per_eval}) + "\n")
            f.write(json.dumps({"iter": it, "train_loss": val - 0.1, "val_loss": val, "lr": 1e-3}) + "\n")
            if k % 2:
                f.write(json.dumps({"iter": it, "checkpoint_ms": 12.0}) + "\n")
            f.write(json.dumps({"iter": it, "loss": val, "lr": 1e-3, "ms": 30.0}) + "\n")
    return path


def test_curve_and_interpolation(bench, tmp_path):
    curve = bench.read_curve(write_run(tmp_path / "m.jsonl", [(0, 4.0, 0.0), (100, 2.5, 10.0), (200, 2.0, 20.0)],
                                       eval_s_per_eval=3.0))
    assert [p["iter"] for p in curve] == [0, 100, 200]
    assert [p["train"] for p in curve] == pytest.approx([0.0, 10.0, 20.0])  # elapsed minus the evaluations
    assert [p["wall"] for p in curve] == pytest.approx([0.0, 13.0, 26.0])
    assert bench.time_to(curve, 2.25) == pytest.approx(15.0)  # halfway from 2.5 to 2.0
    assert bench.time_to(curve, 2.25, "wall") == pytest.approx(19.5)
    assert bench.time_to(curve, 2.5) == pytest.approx(10.0)
    assert bench.time_to(curve, 5.0) == 0.0
    assert bench.time_to(curve, 1.9) is None
    assert bench.loss_at(curve, 5.0) == (pytest.approx(3.25), False)
    assert bench.loss_at(curve, 20.0) == (pytest.approx(2.0), False)
    assert bench.loss_at(curve, 25.0) == (pytest.approx(2.0), True)  # ended: its last loss


def test_time_to_is_the_first_crossing(bench):
    curve = [dict(iter=i, val=v, train=t) for i, v, t in [(0, 3.0, 0.0), (1, 1.8, 10.0), (2, 2.2, 20.0),
                                                           (3, 1.5, 30.0)]]
    assert bench.time_to(curve, 2.0) == pytest.approx(100 / 12)


def test_read_curve_needs_the_timing_records(bench, tmp_path):
    path = tmp_path / "plain.jsonl"  # what nanogpt-train writes by itself
    path.write_text(json.dumps({"iter": 0, "train_loss": 4.0, "val_loss": 4.1, "lr": 0.0}) + "\n")
    with pytest.raises(ValueError, match="no timing record"):
        bench.read_curve(path)


def _runs(bench, tmp_path, modern_points):
    """Two GPT-2 runs (final val 1.89 and 1.91 at 100 s) and the modern runs given."""
    def curve(name, points):
        return bench.read_curve(write_run(tmp_path / f"{name}.jsonl", points))
    gpt2 = [(0, 4.2, 0.0), (1000, 2.2, 50.0), (2000, 1.9, 100.0)]
    return ([dict(recipe="gpt2", seed=s, curve=curve(f"g{s}", [(i, v + d, t) for i, v, t in gpt2]))
             for s, d in ((0, -0.01), (1, 0.01))]
            + [dict(recipe="modern", seed=s, curve=curve(f"m{s}", pts)) for s, pts in enumerate(modern_points)])


def test_goal_verdicts(bench, tmp_path):
    """Target 1.9 (the GPT-2 runs' mean), T = 100 s."""
    fast = [(0, 4.2, 0.0), (500, 2.0, 30.0), (1000, 1.8, 80.0)]  # 1.9 at 55 s = 0.55 T; 1.80 at T (ended)
    a = bench.analyse(_runs(bench, tmp_path, [fast, fast]))
    assert a["target"] == pytest.approx(1.9) and a["T"] == pytest.approx(100.0)
    assert a["mean_ratio"] == pytest.approx(0.55) and a["goal_time"]
    assert a["gain"] == pytest.approx(0.1) and a["goal_loss"] and a["goal_met"]
    assert a["per_seed"][0]["ended_before_T"]
    slow = [(0, 4.2, 0.0), (1000, 1.95, 70.0), (2000, 1.85, 140.0)]  # 1.9 at 105 s; 1.9143 at T
    a = bench.analyse(_runs(bench, tmp_path, [slow, fast]))
    assert a["mean_ratio"] == pytest.approx((1.05 + 0.55) / 2) and not a["goal_time"]
    assert a["mean_loss_at_T"] == pytest.approx((1.95 - 0.1 * 30 / 70 + 1.8) / 2)
    assert not a["goal_loss"] and not a["goal_met"]
    never = [(0, 4.2, 0.0), (1000, 2.0, 100.0)]
    a = bench.analyse(_runs(bench, tmp_path, [never, fast]))
    assert a["mean_ratio"] is None and not a["goal_time"]
    lines = []
    runs = [r | dict(final_val=r["curve"][-1]["val"], iters=r["curve"][-1]["iter"], train_s=1.0, wall_s=1.0,
                     ms_per_iter=1.0, process_s=1.0) for r in _runs(bench, tmp_path, [never, fast])]
    bench.report(runs, a, lines.append)
    assert "not reached" in "\n".join(lines) and "not met" in lines[-1]


def test_timing_wrapper_records_before_each_evaluation(bench, monkeypatch):
    """The child's wrapper around nanogpt.train.evaluate: a timing record before each evaluation, eval_s the
    evaluations before it."""
    from nanogpt import train
    written = []

    class Metrics:
        def write(self, r):
            written.append(r)

    class Run:
        iter_num = 0

    def fake_evaluate(run, lr, metrics):
        metrics.write({"iter": run.iter_num, "val_loss": 1.0})

    def fake_main(argv):
        assert argv == ["cfg.py", "--seed=3"]
        for it in (0, 100):
            Run.iter_num = it
            train.evaluate(Run, 0.1, Metrics())

    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    monkeypatch.setattr(train, "main", fake_main)
    bench.main(["_train", "cfg.py", "--seed=3"])
    assert [sorted(r) for r in written] == [["elapsed_s", "eval_s", "iter"], ["iter", "val_loss"]] * 2
    assert written[0]["elapsed_s"] == 0.0 and written[0]["eval_s"] == 0.0
    assert written[2]["iter"] == 100 and 0.0 < written[2]["eval_s"] <= written[2]["elapsed_s"]


def test_help():
    out = subprocess.run([sys.executable, str(PATH), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.startswith("usage: python benchmarks/bench_recipes.py")
    for key in ("--seeds", "--time", "--max_ratio", "--min_gain", "--json"):
        assert key in out.stdout
