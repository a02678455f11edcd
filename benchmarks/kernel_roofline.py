"""Every kernel against the machine's measured ceilings, and against PyTorch.

    python benchmarks/kernel_roofline.py [--device=cuda] [--preset=gpt2|cpu|tiny] [--json=PATH]

Measures two ceilings first:
  copy bandwidth   a large device-to-device copy (cuda: 1 GiB; cpu: 256 MiB), GB/s counting read + write
  matmul rate      an N^3 matmul in the preset's dtype (cuda: bf16 8192^3; cpu: float32 1024^3), TFLOP/s
then times every op x pass x available backend (see kernel_cases.py for the work model) and reports
the achieved GB/s (memory-bound ops: layer_norm, bias_gelu, adamw) or TFLOP/s (attention), the fraction
of the matching ceiling, and the speed-up over the PyTorch backend (t_torch / t_backend; > 1 is faster).
With --compile_ref=True (default on cuda) the PyTorch op under torch.compile is timed as well
("torch.compile" rows) for the elementwise ops and attention.

Timing: cuda uses triton.testing.do_bench (median; falls back to CUDA events without triton); cpu
runs the call until `rep_ms` has passed and takes the median.
"""
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_cases import (OPS, PASSES, PRESETS, default_device, default_preset, device_name,  # noqa: E402
                          require_device, UNFUSED, make_case, sync, unavailable)
from nanogpt_kernels import registry  # noqa: E402
from nanogpt.configurator import Keys, configure  # noqa: E402
from nanogpt.errors import run_cli  # noqa: E402


DEFAULTS = Keys("python benchmarks/kernel_roofline.py", __doc__, {"run": dict(
    device=(default_device(), "cpu | cuda | cuda:N"),
    preset=("", f"the shapes: {' | '.join(PRESETS)} (\"\": the device's default)"),
    ops=("", "comma-separated ops to measure (\"\": all)"),
    backends=("", "comma-separated backends to measure (\"\": every one that runs here)"),
    json=("", "write the results here too (rewritten after every row)"),
    rep_ms=(100.0, "milliseconds of repetitions per timing"),
    compile_ref=(None, "True | False: also time the PyTorch op under torch.compile (None: on cuda)"),
    threads=(0, "torch.set_num_threads when > 0 (CPU); 0 keeps torch's default"),
)})


def time_ms(fn, device, warmup_ms=25, rep_ms=100):
    """Median milliseconds per call."""
    if torch.device(device).type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            try:
                return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
            except TypeError:  # a triton without return_mode
                return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5])[0])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        fn()
        torch.cuda.synchronize()
        times = []
        t_end = time.perf_counter() + rep_ms / 1e3
        while time.perf_counter() < t_end or len(times) < 5:
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    t_end = time.perf_counter() + warmup_ms / 1e3
    fn()
    while time.perf_counter() < t_end:
        fn()
    times = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while time.perf_counter() < t_end or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def ceilings(device, preset, rep_ms):
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    n_bytes = 2**30 if cuda else (2**28 if preset != "tiny" else 2**24)
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, rep_ms=rep_ms)
    copy_gbs = 2 * n_bytes / (ms / 1e3) / 1e9
    del src, dst
    dt = getattr(torch, PRESETS[preset]["dtype"])
    n = 8192 if cuda else (1024 if preset != "tiny" else 256)
    a = torch.randn(n, n, device=dev, dtype=dt)
    b = torch.randn(n, n, device=dev, dtype=dt)
    ms_mm = time_ms(lambda: torch.mm(a, b), device, rep_ms=rep_ms)
    mm_tflops = 2 * n**3 / (ms_mm / 1e3) / 1e12
    return {"copy_bytes": n_bytes, "copy_ms": ms, "copy_GBps": copy_gbs,
            "matmul_n": n, "matmul_dtype": str(dt).replace("torch.", ""), "matmul_ms": ms_mm,
            "matmul_TFLOPs": mm_tflops}


def run(cfg, argv=(), log=print):
    device = cfg["device"]
    require_device(device)
    preset = cfg["preset"] or default_preset(device)
    if preset not in PRESETS:
        raise SystemExit(f"error: preset must be one of {', '.join(PRESETS)}")
    compile_ref = cfg["compile_ref"] if cfg["compile_ref"] is not None else torch.device(device).type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    dev_name = device_name(device)
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(["python", "benchmarks/kernel_roofline.py", *argv]),
           "device": device, "device_name": dev_name, "torch": torch.__version__, "preset": preset,
           "threads": torch.get_num_threads(), "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
           "shapes": PRESETS[preset], "backends": {}, "rows": []}
    try:
        import triton
        res["triton"] = triton.__version__
    except ImportError:
        res["triton"] = None
    log(f"kernel_roofline: {dev_name} ({device}), preset {preset}, torch {torch.__version__}")
    ceil = ceilings(device, preset, cfg["rep_ms"])
    res["ceilings"] = ceil
    res["complete"] = False
    _save(cfg, res)
    log(f"ceilings: copy {ceil['copy_GBps']:.1f} GB/s ({ceil['copy_bytes'] / 2**20:.0f} MiB copy), "
        f"matmul {ceil['matmul_TFLOPs']:.2f} TFLOP/s ({ceil['matmul_dtype']} {ceil['matmul_n']}^3)")

    chosen = [b.strip() for b in cfg["backends"].split(",")] if cfg["backends"] else list(registry.BACKENDS)
    if set(chosen) - set(registry.BACKENDS):
        raise SystemExit(f"error: unknown backend(s) {', '.join(sorted(set(chosen) - set(registry.BACKENDS)))}; "
                         f"backends are {', '.join(registry.BACKENDS)}")
    for name in registry.BACKENDS:
        why = (registry.backend_unavailable(name, torch.device(device).type) if name in chosen
               else "not in --backends")
        res["backends"][name] = why or "available"
        if why:
            log(f"backend {name}: skipped: {why}")
    # (row label, backend, compiled?): "torch.compile" is the torch backend under torch.compile
    columns = [(name, name, False) for name in registry.BACKENDS if name in chosen] + (
        [("torch.compile", "torch", True)] if compile_ref and "torch" in chosen else [])
    # an optional op (linear_cross_entropy) is also timed as the model runs without it, eager and compiled
    columns += [(UNFUSED, UNFUSED, False)] + ([(UNFUSED + "+compile", UNFUSED, True)] if compile_ref else [])
    wanted = [o.strip() for o in cfg["ops"].split(",")] if cfg["ops"] else list(OPS)
    W = max(map(len, OPS))  # the op column of the log
    for op in wanted:
        if op not in OPS:
            raise SystemExit(f"error: unknown op {op!r}; ops are {', '.join(OPS)}")
        runnable = []
        for name, backend, compiled in columns:
            why = unavailable(op, backend, device)
            if backend == UNFUSED:
                if not why:
                    runnable.append((name, backend, compiled))
            elif why and res["backends"][backend] == "available":  # the backend runs, but not this op
                log(f"{op:{W}s} {name}: skipped: {why}")
            elif not why and not (compiled and registry.REGISTRY[op].kind == "optimizer"):
                runnable.append((name, backend, compiled))
        for pass_ in PASSES[op]:
            base_ms = None
            for name, backend, compiled in runnable:
                row = {"op": op, "pass": pass_, "backend": name}
                try:
                    fn, work, unit = make_case(op, pass_, backend, preset, device, compile_fn=compiled)
                    ms = time_ms(fn, device, rep_ms=cfg["rep_ms"])
                except Exception as e:  # noqa: BLE001 - one broken kernel must not hide the rest
                    row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
                    log(f"{op:{W}s} {pass_:5s} {name:13s} FAILED: {row['error']}")
                    res["rows"].append(row)
                    continue
                sync(device)
                if name == "torch":
                    base_ms = ms
                rate = work / (ms / 1e3)
                if unit == "byte":
                    row.update(ms=ms, bytes=work, GBps=rate / 1e9, frac_of_ceiling=rate / 1e9 / ceil["copy_GBps"],
                               ceiling="copy")
                else:
                    row.update(ms=ms, flops=work, TFLOPs=rate / 1e12,
                               frac_of_ceiling=rate / 1e12 / ceil["matmul_TFLOPs"], ceiling="matmul")
                row["speedup_vs_torch"] = base_ms / ms if base_ms else None
                res["rows"].append(row)
                _save(cfg, res)
                achieved = f"{row['GBps']:8.1f} GB/s " if unit == "byte" else f"{row['TFLOPs']:8.3f} TFLOP/s"
                vs = f"{row['speedup_vs_torch']:.2f}x" if row["speedup_vs_torch"] else "-"
                log(f"{op:{W}s} {pass_:5s} {name:13s} {ms:9.3f} ms  {achieved}  {100 * row['frac_of_ceiling']:5.1f}% "
                    f"of {row['ceiling']:6s}  vs torch {vs}")
    res["complete"] = True
    if _save(cfg, res):
        log(f"wrote {cfg['json']}")
    return res


def _save(cfg, res):
    """(Re)write the JSON: after every row, so a run cut off by a time limit keeps what it measured."""
    if not cfg["json"]:
        return False
    os.makedirs(os.path.dirname(os.path.abspath(cfg["json"])), exist_ok=True)
    tmp = cfg["json"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=2)
    os.replace(tmp, cfg["json"])
    return True


def load_config(argv):
    cfg = configure(DEFAULTS, argv)
    if isinstance(cfg["compile_ref"], str):
        cfg["compile_ref"] = cfg["compile_ref"].lower() in ("1", "true", "yes")
    return cfg


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(load_config(argv), argv)


if __name__ == "__main__":
    run_cli(main)
