"""Helpers of benchmarks/gpu_suite.sh: environment and backend probes, and the final report.

    python benchmarks/suite_report.py env --run=DIR        # DIR/env.json: versions, device
    python benchmarks/suite_report.py backends --run=DIR   # DIR/backends.json: which backends run on cuda
    python benchmarks/suite_report.py tests                # the device-aware test files, one line
    python benchmarks/suite_report.py report --run=DIR --out=benchmarks/results/NAME [--gpu=...] [--total_s=...]
        # NAME.json and NAME.md from DIR/{stages.jsonl,env.json,backends.json,pytest.xml,roofline.json,
        #                                   bench.json,kernels.json} (whatever the stages left)

Works on any partial run: a missing stage output is reported as missing, never fatal.
"""
import argparse
import datetime
import json
import os
import platform
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def cmd_env(run):
    import torch
    from nanogpt_kernels import registry
    cuda = torch.cuda.is_available()
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if cuda else None,
            "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
            "sm_count": torch.cuda.get_device_properties(0).multi_processor_count if cuda else None,
            "memory_GiB": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
            "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    why = registry.backend_unavailable("ext", "cpu")  # the extension loads at all
    if why is None:
        from nanogpt_kernels import ext
        info["ext"] = {"cuda": ext._C.has_cuda(), "cpu_isa": ext._C.cpu_isa()}
    else:
        info["ext"] = why
    print(json.dumps(info, indent=1))
    with open(os.path.join(run, "env.json"), "w") as f:
        json.dump(info, f, indent=1)


def cmd_backends(run):
    from nanogpt_kernels import registry
    status = {b: (registry.backend_unavailable(b, "cuda") or "available") for b in registry.BACKENDS}
    # ops a backend that runs here still lacks (e.g. ext's attention is CPU only)
    missing = {f"{op} on {b}": why for op in registry.OPS for b in registry.BACKENDS
               if status[b] == "available" and (why := registry.unavailable(op, b, "cuda"))}
    try:
        auto = registry.resolve("auto", "cuda")
    except Exception as e:  # noqa: BLE001
        auto = f"{type(e).__name__}: {e}"
    out = {"status": status, "missing_ops": missing, "auto": auto}
    print(json.dumps(out, indent=1))
    with open(os.path.join(run, "backends.json"), "w") as f:
        json.dump(out, f, indent=1)


def device_tests():
    """The test files that run on NANOGPT_TEST_DEVICE: one per registry op (tests/test_<op>.py), the
    extension's, the model's and the measured auto's; the rest is CPU-only and CI runs it, as it runs the
    compile-only checks (nvcc's and Triton's for sm_80/sm_90), which would spend device time learning nothing new."""
    from nanogpt_kernels import registry
    patterns = [f"test_{op}.py" for op in registry.OPS] + ["test_kernels_*.py", "test_ext_*.py", "test_model*.py",
                                                          "test_autotune.py", "test_ns_gram.py"]
    compile_only = {"test_ext_nvcc.py", "test_kernels_compile.py"}
    return sorted({str(p.relative_to(ROOT)) for pat in patterns for p in (ROOT / "tests").glob(pat)
                   if p.name not in compile_only})


def parse_junit(path):
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time_s": 0.0, "failed": []}
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            out[k] += int(s.get(k, 0))
        out["time_s"] += float(s.get("time", 0.0))
        for case in s.iter("testcase"):
            bad = case.find("failure")
            if bad is None:
                bad = case.find("error")
            if bad is not None:
                out["failed"].append({"test": f"{case.get('classname')}::{case.get('name')}",
                                      "message": (bad.get("message") or "")[:300]})
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    return out


def parse_pytest_log(path):
    """Counts from a `pytest -q` log when there is no JUnit XML (e.g. the stage timed out)."""
    import re
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time_s": 0.0, "failed": [], "from": "log"}
    summary = re.findall(r"=* ?([0-9]+ (?:passed|failed|skipped|error|errors|xfailed|xpassed|deselected)"
                         r"(?:, [0-9]+ \w+)*)(?: in ([0-9.]+)s)?", text)
    if summary:
        words = dict((w, int(n)) for n, w in re.findall(r"([0-9]+) (\w+)", summary[-1][0]))
        out["failures"] = words.get("failed", 0)
        out["errors"] = words.get("errors", 0) + words.get("error", 0)
        out["skipped"] = words.get("skipped", 0)
        out["passed"] = words.get("passed", 0)
        out["tests"] = out["passed"] + out["failures"] + out["errors"] + out["skipped"]
        out["time_s"] = float(summary[-1][1] or 0)
    else:  # no summary line: count the progress characters
        prog = "".join(re.findall(r"^([.FEsxX]+)(?:\s+\[\s*\d+%\])?$", text, flags=re.M))
        out["passed"], out["failures"], out["errors"] = prog.count("."), prog.count("F"), prog.count("E")
        out["skipped"] = prog.count("s")
        out["tests"] = len(prog)
        out["incomplete"] = True
    out["failed"] = [{"test": t, "message": ""} for t in re.findall(r"^FAILED (\S+)", text, flags=re.M)]
    return out


def _tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def _ext_line(ext):
    if isinstance(ext, dict):
        return f"{'built with CUDA' if ext['cuda'] else 'built WITHOUT CUDA'}, CPU ISA clone {ext['cpu_isa']}"
    return ext or "not probed"


def build_report(run, gpu=None, total_s=None):
    stages = []
    try:
        with open(os.path.join(run, "stages.jsonl")) as f:
            stages = [json.loads(line) for line in f if line.strip()]
    except OSError:
        pass
    return {
        "name": os.path.basename(os.path.normpath(run)),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu, "total_s": total_s, "command": "bash benchmarks/gpu_suite.sh",
        "env": _read_json(os.path.join(run, "env.json")),
        "stages": stages,
        "backends": _read_json(os.path.join(run, "backends.json")),
        "tests": parse_junit(os.path.join(run, "pytest.xml")) or parse_pytest_log(os.path.join(run, "tests.log")),
        "roofline": _read_json(os.path.join(run, "roofline.json")),
        "bench": _read_json(os.path.join(run, "bench.json")),
        "kernels_regression": _read_json(os.path.join(run, "kernels.json")),
        "bench_lce_none": _read_json(os.path.join(run, "bench_lce_none.json")),
        "muon": _tail(os.path.join(run, "muon.log"), 6) or None,
        "logs": run,
    }


def markdown(rep, run):
    env = rep["env"] or {}
    L = [f"# GPU suite: {rep['gpu'] or env.get('device')}, {rep['date'][:10]}", ""]
    L += [f"- device: {env.get('device')} (sm {env.get('capability')}, {env.get('sm_count')} SMs, "
          f"{env.get('memory_GiB')} GiB)",
          f"- torch {env.get('torch')} (CUDA {env.get('cuda')}), triton {env.get('triton')}, "
          f"python {env.get('python')}",
          f"- extension nanogpt_kernels._C: {_ext_line(env.get('ext'))}",
          f"- date (UTC): {rep['date']}; suite time {rep['total_s']} s; command `{rep['command']}`",
          f"- stage logs: `{run}`", ""]
    L += ["## Stages", "", "| stage | status | rc | seconds | command |", "|---|---|---|---|---|"]
    for s in rep["stages"]:
        L.append(f"| {s['stage']} | {s['status']} | {s.get('rc')} | {s.get('seconds')} | `{s['cmd'][:160]}` |")
    L.append("")
    t = rep["tests"]
    L += ["## Tests (`NANOGPT_TEST_DEVICE=cuda pytest` on the device-aware files, `suite_report.py tests`)", ""]
    if t:
        L.append(f"{t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped "
                 f"({t['tests']} run, {t['time_s']:.0f} s)"
                 + (" (from the log, the run did not finish)" if t.get("incomplete") else ""))
        for f in t["failed"][:20]:
            L.append(f"- FAILED `{f['test']}`: {f['message']}")
    else:
        L.append("no JUnit XML: the tests stage did not finish (see its log)")
    L.append("")
    b = rep["backends"]
    if b:
        L += ["## Backends on cuda", ""]
        L += [f"- {k}: {v}" for k, v in b["status"].items()]
        L += [f"- {k}: {v}" for k, v in b.get("missing_ops", {}).items()]
        L += [f"- auto's fixed order (--autotune=False) gives: {b['auto']}; the measured auto's choice is in the "
              "training-step table", ""]
    r = rep["roofline"]
    L += ["## Kernels (`benchmarks/kernel_roofline.py --device=cuda`)", ""]
    if r and not r.get("complete", True):
        L.append("**incomplete**: the roofline stage was cut off; the rows below are what it measured\n")
    if r and r.get("ceilings"):
        c = r["ceilings"]
        L += [f"Ceilings: copy {c['copy_GBps']:.0f} GB/s ({c['copy_bytes'] / 2**30:.0f} GiB device-to-device, "
              f"read + write), matmul {c['matmul_TFLOPs']:.1f} TFLOP/s ({c['matmul_dtype']} {c['matmul_n']}^3). "
              f"Shapes: {r.get('shapes')}", "",
              "| op | pass | backend | ms | achieved | % of ceiling | vs torch |", "|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            if "error" in row:
                L.append(f"| {row['op']} | {row['pass']} | {row['backend']} | FAILED: {row['error'][:120]} | | | |")
                continue
            ach = f"{row['GBps']:.0f} GB/s" if "GBps" in row else f"{row['TFLOPs']:.1f} TFLOP/s"
            L.append(f"| {row['op']} | {row['pass']} | {row['backend']} | {row['ms']:.3f} | {ach} | "
                     f"{100 * row['frac_of_ceiling']:.0f}% of {row['ceiling']} | "
                     f"{_f(row.get('speedup_vs_torch'), '.2f')}x |")
        for k, v in (r.get("backends") or {}).items():
            if v != "available":
                L.append(f"\n{k}: not run: {v}")
    else:
        L.append("no result (see the roofline stage log)")
    L.append("")
    bench = rep["bench"]
    L += ["## Training step (`benchmarks/bench.py`, GPT-2 124M, batch 12, block 1024, bf16)", ""]
    if bench and not bench.get("complete", True):
        L.append("**incomplete**: the bench stage was cut off or failed after writing this\n")
    if bench:
        chk = bench.get("check") or {}
        L.append(f"First-step loss check: {'ok' if chk.get('ok') else 'FAILED'} "
                 f"(tolerance {chk.get('rel_tolerance')}, losses {chk.get('losses')})")
        L += ["", f"| mode | backends | median ms | p10 | p90 | tokens/s | MFU | peak MiB | vs {bench.get('baseline')} |",
              "|---|---|---|---|---|---|---|---|---|"]
        for e in bench["modes"]:
            if "ms_median" not in e:
                why = (e.get("reason") or "")[:150] if e["status"] != "ok" else "not timed (the run stopped before)"
                L.append(f"| {e['mode']} | {e['status']}: {why} | | | | | | | |")
                continue
            be = ", ".join(f"{k}={v}" for k, v in e["backends"].items())
            L.append(f"| {e['mode']} | {be} | {e['ms_median']:.1f} | {e['ms_p10']:.1f} | {e['ms_p90']:.1f} | "
                     f"{e['tokens_per_s']:,.0f} | {100 * e['mfu']:.1f}% | {_f(e.get('peak_mem_mb'), '.0f')} | "
                     f"{e['ratio_to_baseline']:.2f}x |")
        L.append(f"\nPeak memory: {bench.get('memory_method')}. MFU against {bench.get('peak_flops', 0) / 1e12:.0f} "
                 f"TFLOP/s (nanogpt.mfu).")
        gate = bench.get("auto_gate") or {}
        for c in gate.get("checked", []):
            L.append(f"\nGate: {c['mode']} takes {c['ratio_to_torch']:.3f}x torch's (eager) time in {c['dtype']} "
                     f"(fails above {1 + gate['max_slowdown']:.2f}x)")
        L += [f"\n**Gate FAILED**: {msg}" for msg in gate.get("failed", [])]
    else:
        L.append("no result (see the bench stage log)")
    L.append("")
    L += ["## Fused loss and Muon (open issues' GPU goals)", ""]
    auto = next((e for e in (bench or {}).get("modes", []) if e["mode"] == "auto" and "ms_median" in e), None)
    none = next((e for e in (rep.get("bench_lce_none") or {}).get("modes", []) if "ms_median" in e), None)
    if auto and none:
        L.append(f"Training step, auto with the measured loss ({auto['backends'].get('linear_cross_entropy')}): "
                 f"{auto['ms_median']:.1f} ms, peak {_f(auto.get('peak_mem_mb'), '.0f')} MiB; with the unfused "
                 f"loss (lce stage): {none['ms_median']:.1f} ms, peak {_f(none.get('peak_mem_mb'), '.0f')} MiB "
                 "(separate runs).")
    else:
        L.append("no fused-vs-unfused comparison (see the bench and lce stage logs)")
    L += ["", "Muon's step (muon stage):", "", "```", (rep.get("muon") or "no result").rstrip(), "```", ""]
    kr = rep["kernels_regression"]
    if kr:
        L += ["## Kernel regression (pytest-benchmark)", "", "| test | median ms |", "|---|---|"]
        for bm in kr.get("benchmarks", []):
            L.append(f"| {bm['name']} | {bm['stats']['median'] * 1e3:.3f} |")
        L.append("")
    bad = [s for s in rep["stages"] if s["status"] not in ("ok",)]
    if bad:
        L += ["## Stages that did not succeed", ""]
        for s in bad:
            if s["status"] == "skipped":
                L += [f"### {s['stage']}: skipped ({s.get('reason')})", ""]
                continue
            L += [f"### {s['stage']}: {s['status']} (rc {s.get('rc')})", "", "```",
                  _tail(os.path.join(run, s.get("log") or f"{s['stage']}.log")).rstrip(), "```", ""]
    return "\n".join(L) + "\n"


def cmd_report(run, out, gpu, total_s):
    rep = build_report(run, gpu, total_s)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(rep, f, indent=2)
    with open(out + ".md", "w") as f:
        f.write(markdown(rep, run))
    print(f"wrote {out}.json and {out}.md")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("env", "backends", "tests", "report"))
    ap.add_argument("--run", help="the suite's stage-output directory")
    ap.add_argument("--out", help="report path without extension")
    ap.add_argument("--gpu")
    ap.add_argument("--total_s", type=int)
    a = ap.parse_args(argv)
    if a.what == "tests":
        print(" ".join(device_tests()))
        return
    if not a.run:
        sys.exit(f"error: {a.what} needs --run=DIR")
    os.makedirs(a.run, exist_ok=True)
    if a.what == "env":
        cmd_env(a.run)
    elif a.what == "backends":
        cmd_backends(a.run)
    else:
        if not a.out:
            sys.exit("error: report needs --out=PATH (without extension)")
        cmd_report(a.run, a.out, a.gpu, a.total_s)


if __name__ == "__main__":
    main()
