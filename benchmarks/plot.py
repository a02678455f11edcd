"""Plots for bench.py results and training logs (matplotlib, Agg backend: no display needed).

    python benchmarks/plot.py bench RESULT.json [RESULT2.json ...] -o modes.png
        ms/iter per mode (median bars, p10-p90 error bars), labelled with the ratio to the
        torch.compile baseline; several JSONs are drawn as grouped bars (one colour per file)
    python benchmarks/plot.py loss OUT_DIR/metrics.jsonl [OTHER/metrics.jsonl ...] -o loss.png
        training loss per iter (line) and eval train/val loss (markers), one colour per run
    python benchmarks/plot.py health OUT_DIR/metrics.jsonl -o health.png
        the health metrics (nanogpt.health): loss with clips and spikes marked, per-layer gradient
        norms, update-to-weight ratios, tokens/s and peak memory
"""
import argparse
import json
import os

from nanogpt.errors import UserError, run_cli
from nanogpt.plot import plot_health, plot_loss, plt  # plt: matplotlib with the Agg backend


def _load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}; pass bench.py --json results") from None


def plot_bench(paths, out, title=None):
    results = [_load_json(p) for p in paths]
    modes = []
    for r in results:
        for e in r.get("modes", []):
            if "ms_median" in e and e["mode"] not in modes:
                modes.append(e["mode"])
    if not modes:
        raise UserError(f"no timed modes in {', '.join(paths)}; pass bench.py --json results of a run that timed some")
    n = len(results)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(modes) * max(1, n * 0.7)), 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ymax = 0.0
    for j, (path, r) in enumerate(zip(paths, results)):
        by = {e["mode"]: e for e in r.get("modes", []) if "ms_median" in e}
        xs, ys, lo, hi, labels = [], [], [], [], []
        for i, m in enumerate(modes):
            if m not in by:
                continue
            e = by[m]
            xs.append(i + (j - (n - 1) / 2) * width)
            ys.append(e["ms_median"])
            lo.append(e["ms_median"] - e.get("ms_p10", e["ms_median"]))
            hi.append(e.get("ms_p90", e["ms_median"]) - e["ms_median"])
            ratio = e.get("ratio_to_baseline")
            labels.append(f"{e['ms_median']:.3g} ms" + (f"\n{ratio:.2f}x" if ratio is not None else ""))
            ymax = max(ymax, e.get("ms_p90", e["ms_median"]))
        thr = f", {r['cpu_threads']} threads" if r.get("device") == "cpu" and r.get("cpu_threads") else ""
        label = f"{os.path.basename(path)}: {r.get('device_name', '?')}{thr}" if n > 1 else None
        bars = ax.bar(xs, ys, width * 0.9, yerr=[lo, hi], capsize=4, color=colors[j % len(colors)],
                      label=label, ecolor="black", error_kw={"linewidth": 1})
        for b, text, top in zip(bars, labels, [y + h for y, h in zip(ys, hi)]):
            ax.annotate(text, (b.get_x() + b.get_width() / 2, top), xytext=(0, 3),
                        textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(modes)))
    ax.set_xticklabels(modes)
    ax.set_ylabel("ms / training step (median; bars p10-p90)")
    ax.set_ylim(0, ymax * 1.3 if ymax > 0 else 1)
    r0 = results[0]
    cfg = r0.get("config", {})
    shape = (f"L{cfg.get('n_layer')} H{cfg.get('n_head')} C{cfg.get('n_embd')} T{cfg.get('block_size')} "
             f"B{cfg.get('batch_size')} {cfg.get('dtype')}")
    ax.set_title(title or f"{r0.get('device_name', '?')}\n{shape}; labels: median, ratio vs {r0.get('baseline')}",
                 fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if n > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    b = sub.add_parser("bench", help="bench.py --json results: ms/iter per mode")
    b.add_argument("json", nargs="+")
    b.add_argument("-o", "--out", default="modes.png")
    b.add_argument("--title")
    lo = sub.add_parser("loss", help="metrics.jsonl: train loss per iter and eval points")
    lo.add_argument("metrics", nargs="+")
    lo.add_argument("-o", "--out", default="loss.png")
    lo.add_argument("--title")
    lo.add_argument("--log", action="store_true", help="log-scale loss axis")
    he = sub.add_parser("health", help="metrics.jsonl: gradient norms, update ratios, clips, spikes, memory")
    he.add_argument("metrics")
    he.add_argument("-o", "--out", default="health.png")
    he.add_argument("--title")
    a = ap.parse_args(argv)
    if a.what == "bench":
        out = plot_bench(a.json, a.out, a.title)
    elif a.what == "health":
        out = plot_health(a.metrics, a.out, a.title)
    else:
        out = plot_loss(a.metrics, a.out, a.title, a.log)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
