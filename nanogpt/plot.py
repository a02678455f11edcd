"""Loss curves of training runs, from their metrics.jsonl: what the trainer draws into out_dir/loss.png at the
end of a run and `benchmarks/plot.py loss` draws for several runs. Needs matplotlib (optional: pip install
matplotlib); the Agg backend needs no display."""
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nanogpt.errors import UserError  # noqa: E402


def read_metrics(path, events=None):
    """(per-iteration training records, eval records) of a metrics.jsonl; event records (a loss spike's) go into
    the list `events` when given."""
    train, evals = [], []
    try:
        f = open(path)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}; pass a run's out_dir/metrics.jsonl") from None
    with f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                print(f"warning: {path}:{lineno}: not JSON, skipped", file=sys.stderr)
                continue
            if "event" in rec:
                if events is not None:
                    events.append(rec)
            elif "loss" in rec and "iter" in rec:
                train.append(rec)
            if "val_loss" in rec or "train_loss" in rec:
                evals.append(rec)
    return train, evals


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def plot_loss(paths, out, title=None, log_y=False):
    """Training loss per iter (line) and eval train/val loss (markers) of each metrics.jsonl, one colour per run,
    into the image `out`; returns out."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = 0
    for j, path in enumerate(paths):
        train, evals = read_metrics(path)
        c = colors[j % len(colors)]
        run = os.path.basename(os.path.dirname(os.path.abspath(path))) if len(paths) > 1 else ""
        pre = f"{run}: " if run else ""
        pts = [(r["iter"], r["loss"]) for r in train if _finite(r["loss"])]
        if pts:
            ax.plot(*zip(*pts), color=c, lw=1, alpha=0.8, label=f"{pre}train loss (per iter)")
            drawn += 1
        tr = [(r["iter"], r["train_loss"]) for r in evals if _finite(r.get("train_loss"))]
        va = [(r["iter"], r["val_loss"]) for r in evals if _finite(r.get("val_loss"))]
        if tr:
            ax.plot(*zip(*tr), "o--", color=c, ms=5, lw=0.8, mfc="white", label=f"{pre}eval train loss")
            drawn += 1
        if va:
            ax.plot(*zip(*va), "s-", color=c if len(paths) > 1 else colors[1], ms=5, lw=1.2, label=f"{pre}eval val loss")
            drawn += 1
    if not drawn:
        plt.close(fig)
        raise UserError(f"no loss records in {', '.join(map(str, paths))}; pass a run's out_dir/metrics.jsonl")
    ax.set_xlabel("iter")
    ax.set_ylabel("loss")
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title or ", ".join(map(str, paths)), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_health(path, out, title=None):
    """The health metrics of one metrics.jsonl (nanogpt.health) into the image `out`: loss with clipped steps and
    spike events marked, per-layer gradient norms, update-to-weight ratios, tokens/s and peak memory; returns
    out."""
    events = []
    steps, _ = read_metrics(path, events)
    spikes = [e for e in events if e.get("event") == "spike"]
    if not steps:
        raise UserError(f"no step records in {path}; pass a run's out_dir/metrics.jsonl")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)

    def series(ax, prefix, log=True):
        keys = sorted({k for r in steps for k in r if k.startswith(prefix)})
        for k in keys:
            pts = [(r["iter"], r[k]) for r in steps if _finite(r.get(k)) and r[k] > 0]
            if pts:
                ax.plot(*zip(*pts), lw=1, label=k.split("/", 1)[-1])
        if log:
            ax.set_yscale("log")
        if keys:
            ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)

    ax = axes[0][0]
    ax.plot(*zip(*[(r["iter"], r["loss"]) for r in steps if _finite(r["loss"])]), lw=1, label="loss")
    clipped = [(r["iter"], r["loss"]) for r in steps if r.get("clipped") and _finite(r["loss"])]
    if clipped:
        ax.plot(*zip(*clipped), "|", color="grey", ms=8, label="clipped")
    if spikes:
        ax.plot([s["iter"] for s in spikes], [s["loss"] for s in spikes], "rv", ms=7, label="spike")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    series(axes[0][1], "grad_norm")
    axes[0][1].set_ylabel("gradient norm (global, per layer)")
    series(axes[1][0], "update_ratio/")
    axes[1][0].set_ylabel("|update| / |weights|")
    ax = axes[1][1]
    series(ax, "tokens_per_s", log=False)
    ax.set_ylabel("tokens/s")
    mem = [(r["iter"], r["peak_mem_mb"]) for r in steps if _finite(r.get("peak_mem_mb"))]
    if mem:
        twin = ax.twinx()
        twin.plot(*zip(*mem), color="tab:red", lw=1)
        twin.set_ylabel("peak memory (MiB)", color="tab:red")
    for ax in axes[1]:
        ax.set_xlabel("iter")
    fig.suptitle(title or str(path), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
