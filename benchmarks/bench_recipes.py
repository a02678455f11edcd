"""The GPT-2 recipe against the modern one on the CPU char quick start, side by side (issue 15's goal).

    python benchmarks/bench_recipes.py                  # the goal: 3 seeds of each recipe
    python benchmarks/bench_recipes.py --seeds=1 --json=out/recipes.json

Trains configs/train_shakespeare_char_cpu.py (the GPT-2 recipe: the README quick start, 2000 iters) and
configs/train_shakespeare_char_modern.py (rope, rmsnorm, qk_norm, relu2, untied head, logit softcap, zero-init
projections, optimizer=muon) with seeds seed, seed+1, ..., interleaved (GPT-2 seed 0, modern seed 0, GPT-2 seed
1, ...) so that a drift in the machine's load hits both alike, one run at a time, each in its own process
(`nanogpt.train`, the configs as they are, plus --eval_interval and --plot=False). Both evaluate every
`eval_interval` iters with the configs' eval_iters (20 batches per split, the same batches at every eval and in
every run), so the GPT-2 recipe's val loss at 2000 is the quick start's.

Time: each evaluation is timed inside the run (the trainer's `evaluate`, wrapped here) and a record
{"iter", "elapsed_s", "eval_s"} goes into the run's metrics.jsonl before it: elapsed_s is the wall time since
the training loop started (the first evaluation), everything included; eval_s the part of it spent in earlier
evaluations (and the checkpoints they save). `--time=train` (the default) counts elapsed_s - eval_s, the
training steps alone, for both recipes; `--time=wall` counts elapsed_s (evaluations included, the same cadence
for both). Start-up (imports, the kernel autotune, loading data) is not in either; the table shows each
process's whole wall time too.

Reported, per recipe and seed: the final val loss, iterations, time and ms/iter. Then the goal, against the
GPT-2 recipe's mean final val loss (the target) and mean time T:
- time to target: when each modern run's val loss first reaches the target (interpolated linearly between
  evaluations), as a ratio to T; goal: the mean <= max_ratio (0.6);
- loss at T: each modern run's val loss at time T (interpolated; the final one when the run had ended by T);
  goal: the mean at least min_gain (0.08) below the target.
Exit code 0 when either goal is met, 1 when neither is, 2 when a run failed (or bad arguments).
"""
import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ("gpt2", "modern")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python benchmarks/bench_recipes.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="runs per recipe")
    p.add_argument("--seed", type=int, default=1337, help="the first run's seed (the quick start's)")
    p.add_argument("--gpt2_config", default="configs/train_shakespeare_char_cpu.py", help="the GPT-2 recipe")
    p.add_argument("--modern_config", default="configs/train_shakespeare_char_modern.py", help="the modern recipe")
    p.add_argument("--eval_interval", type=int, default=100, help="evaluate every this many iters (both)")
    p.add_argument("--time", choices=("train", "wall"), default="train",
                   help="train: the training steps' time (evaluations excluded); wall: evaluations included")
    p.add_argument("--max_ratio", type=float, default=0.6, help="goal: modern's time to target / GPT-2's time")
    p.add_argument("--min_gain", type=float, default=0.08, help="goal: modern's val loss this much lower at T")
    p.add_argument("--train_args", default="", help="more --key=value for both runs, e.g. --data_dir=/tmp/d")
    p.add_argument("--out_dir", default="out-bench-recipes", help="the runs' out_dirs go under it (replaced)")
    p.add_argument("--json", default="", help="write the results here too")
    c = p.parse_args(argv)
    if c.seeds < 1 or c.eval_interval < 1:
        p.error("--seeds and --eval_interval must be >= 1")
    return c


# ------------------------------------------------------------ one run, timed (in its own process)

def train_timed(argv):
    """nanogpt-train argv, with a record {"iter", "elapsed_s", "eval_s"} in metrics.jsonl before each
    evaluation (see the module's docstring)."""
    sys.path.insert(0, ROOT)
    from nanogpt import train
    evaluate, clock = train.evaluate, {"eval_s": 0.0}

    def timed(run, lr, metrics):
        t = time.perf_counter()
        clock.setdefault("start", t)  # the first evaluation is the loop's first statement
        metrics.write({"iter": run.iter_num, "elapsed_s": t - clock["start"], "eval_s": clock["eval_s"]})
        try:
            evaluate(run, lr, metrics)
        finally:
            clock["eval_s"] += time.perf_counter() - t

    train.evaluate = timed
    train.main(argv)


def run_one(c, recipe, seed, log):
    """Train one recipe with one seed in a child process; its result (curve, times, backends)."""
    out = os.path.join(c.out_dir, f"{recipe}-s{seed}")
    shutil.rmtree(out, ignore_errors=True)
    config = getattr(c, f"{recipe}_config")
    if not os.path.exists(config):  # run from elsewhere than the repository's root
        config = os.path.join(ROOT, config)
    cmd = [sys.executable, os.path.abspath(__file__), "_train", config, f"--seed={seed}", f"--out_dir={out}",
           f"--eval_interval={c.eval_interval}", "--plot=False", *c.train_args.split()]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    process_s = time.perf_counter() - t0
    r = dict(recipe=recipe, seed=seed, config=config, rc=proc.returncode, process_s=process_s,
             backends=next((line for line in proc.stdout.splitlines() if line.startswith("kernels (")), None))
    if proc.returncode:
        r["error"] = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        log(f"{recipe} seed {seed}: FAILED (exit {proc.returncode}): {r['error']}")
        return r
    r["curve"] = read_curve(os.path.join(out, "metrics.jsonl"))
    last = r["curve"][-1]
    r |= dict(final_val=last["val"], iters=last["iter"], train_s=last["train"], wall_s=last["wall"],
              ms_per_iter=1000 * last["train"] / max(last["iter"], 1))
    log(f"{recipe} seed {seed}: val {r['final_val']:.4f} at iter {r['iters']}, {r['train_s']:.1f} s training, "
        f"{r['wall_s']:.1f} s with evals, {process_s:.1f} s in all, load {os.getloadavg()[0]:.2f}; {r['backends']}")
    return r


# ------------------------------------------------------------ the analysis (pure: tests/test_bench_recipes.py)

def read_curve(path):
    """[{iter, val, wall, train}] per evaluation from a metrics.jsonl with the timing records: wall = elapsed_s,
    train = elapsed_s - eval_s."""
    timing, curve = {}, []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "elapsed_s" in r:
                timing[r["iter"]] = r
            elif "val_loss" in r:
                t = timing.get(r["iter"])
                if t is None:
                    raise ValueError(f"{path}: no timing record before the evaluation at iter {r['iter']}")
                curve.append(dict(iter=r["iter"], val=r["val_loss"], wall=t["elapsed_s"],
                                  train=t["elapsed_s"] - t["eval_s"]))
    if not curve:
        raise ValueError(f"{path}: no evaluations")
    return curve


def time_to(curve, target, key="train"):
    """The time (curve's `key`) when the val loss first reaches target, linear between evaluations; None if never."""
    for i, p in enumerate(curve):
        if p["val"] <= target:
            if i == 0:
                return p[key]
            q = curve[i - 1]
            return q[key] + (q["val"] - target) / (q["val"] - p["val"]) * (p[key] - q[key])
    return None


def loss_at(curve, t, key="train"):
    """(the val loss at time t, linear between evaluations; whether the run had ended by t: then its last)."""
    if t >= curve[-1][key]:
        return curve[-1]["val"], t > curve[-1][key]
    if t <= curve[0][key]:
        return curve[0]["val"], False
    for q, p in zip(curve, curve[1:]):
        if q[key] <= t <= p[key]:
            return q["val"] + (t - q[key]) / (p[key] - q[key]) * (p["val"] - q["val"]), False
    raise AssertionError("unreachable: the times are increasing")


def mean(xs):
    return sum(xs) / len(xs)


def analyse(runs, key="train", max_ratio=0.6, min_gain=0.08):
    """The goal from the runs' results (each with recipe and curve)."""
    gpt2 = [r for r in runs if r["recipe"] == "gpt2"]
    modern = [r for r in runs if r["recipe"] == "modern"]
    target = mean([r["curve"][-1]["val"] for r in gpt2])
    T = mean([r["curve"][-1][key] for r in gpt2])
    per_seed = []
    for r in modern:
        t = time_to(r["curve"], target, key)
        loss, ended = loss_at(r["curve"], T, key)
        per_seed.append(dict(seed=r["seed"], time_to_target=t, ratio=None if t is None else t / T, loss_at_T=loss,
                             ended_before_T=ended))
    ratios = [s["ratio"] for s in per_seed]
    ratio = None if None in ratios else mean(ratios)
    loss = mean([s["loss_at_T"] for s in per_seed])
    a = ratio is not None and ratio <= max_ratio
    b = target - loss >= min_gain
    return dict(time=key, target=target, T=T, per_seed=per_seed, mean_ratio=ratio, mean_loss_at_T=loss,
                gain=target - loss, goal_time=a, goal_loss=b, goal_met=a or b, max_ratio=max_ratio,
                min_gain=min_gain)


def report(runs, a, log=print):
    """The markdown tables."""
    log("| recipe | seed | val loss (final) | iters | training s | s with evals | ms/iter | process s |")
    log("|---|---|---|---|---|---|---|---|")
    for r in runs:
        log(f"| {r['recipe']} | {r['seed']} | {r['final_val']:.4f} | {r['iters']} | {r['train_s']:.1f} | "
            f"{r['wall_s']:.1f} | {r['ms_per_iter']:.1f} | {r['process_s']:.1f} |")
    ms = {k: mean([r["ms_per_iter"] for r in runs if r["recipe"] == k]) for k in RECIPES}
    log(f"\nms/iter (training, mean): GPT-2 {ms['gpt2']:.1f}, modern {ms['modern']:.1f} "
        f"({ms['modern'] / ms['gpt2']:.2f}x)")
    log(f"target: the GPT-2 recipe's mean final val loss {a['target']:.4f}; its mean time T = {a['T']:.1f} s "
        f"({'training steps only' if a['time'] == 'train' else 'evaluations included'})\n")
    log("| modern seed | time to target (s) | / T | val loss at T | below target by |")
    log("|---|---|---|---|---|")
    for s in a["per_seed"]:
        t = "not reached" if s["time_to_target"] is None else f"{s['time_to_target']:.1f}"
        x = "-" if s["ratio"] is None else f"{s['ratio']:.2f}x"
        ended = " (run ended before T)" if s["ended_before_T"] else ""
        log(f"| {s['seed']} | {t} | {x} | {s['loss_at_T']:.4f}{ended} | {a['target'] - s['loss_at_T']:+.4f} |")
    ratio = "not reached by every run" if a["mean_ratio"] is None else f"{a['mean_ratio']:.2f}x"
    log(f"| mean | | {ratio} | {a['mean_loss_at_T']:.4f} | {a['gain']:+.4f} |")
    log(f"\ngoal, time to target <= {a['max_ratio']}x: {'met' if a['goal_time'] else 'not met'} ({ratio}); "
        f"val loss at T >= {a['min_gain']} lower: {'met' if a['goal_loss'] else 'not met'} ({a['gain']:+.4f})")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_train"]:  # a child: one timed training run
        return train_timed(argv[1:])
    c = parse_args(argv)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    result = dict(command=" ".join(["python", "benchmarks/bench_recipes.py", *argv]), cpu=cpu, cores=os.cpu_count(),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  loadavg_before=os.getloadavg(), args=vars(c), runs=[])
    print(f"{cpu}, {os.cpu_count()} cores, {result['date']}, load average {result['loadavg_before'][0]:.2f}")
    for i in range(c.seeds):
        for recipe in RECIPES:
            result["runs"].append(run_one(c, recipe, c.seed + i, print))
    result["loadavg_after"] = os.getloadavg()
    failed = [r for r in result["runs"] if r["rc"]]
    if not failed:
        result["goal"] = analyse(result["runs"], c.time, c.max_ratio, c.min_gain)
        print()
        report(result["runs"], result["goal"])
    print(f"load average after: {result['loadavg_after'][0]:.2f}")
    if c.json:
        os.makedirs(os.path.dirname(os.path.abspath(c.json)), exist_ok=True)
        with open(c.json, "w") as f:
            json.dump(result, f, indent=1)
    if failed:
        print(f"error: {len(failed)} run(s) failed", file=sys.stderr)
        sys.exit(2)
    sys.exit(0 if result["goal"]["goal_met"] else 1)


if __name__ == "__main__":
    main()
