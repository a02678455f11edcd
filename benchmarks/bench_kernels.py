"""Kernel regression benchmarks (pytest-benchmark): every registry op x pass x backend available here.

    pytest benchmarks/bench_kernels.py --benchmark-only -p no:cacheprovider \
        --benchmark-storage=benchmarks/baselines/<machine> --benchmark-compare --benchmark-compare-fail=median:10%

Device: $NANOGPT_BENCH_DEVICE, else cuda when available, else cpu. Shapes: GPT-2 124M on cuda
(LN 12288x768, bias+GELU 12288x3072, attention B=12 H=12 T=1024 D=64 causal, AdamW over 124M
params), the "cpu" preset of kernel_cases.py on cpu; $NANOGPT_BENCH_PRESET overrides.
CPU runs use 1 thread unless $NANOGPT_BENCH_THREADS is set (0 = torch's default).
A backend that cannot run here is skipped with its reason. See benchmarks/README.md.
"""
import os

import pytest
import torch

from kernel_cases import CASES, PRESETS, default_device, default_preset, make_case, sync, unavailable
from nanogpt_kernels.registry import BACKENDS

DEVICE = default_device()
PRESET = os.environ.get("NANOGPT_BENCH_PRESET") or default_preset(DEVICE)
# CPU: 1 intra-op thread unless $NANOGPT_BENCH_THREADS says otherwise (0 = torch's default): on a shared
# machine two OpenMP threads stall on each other and the timings swing far more than any regression
THREADS = int(os.environ.get("NANOGPT_BENCH_THREADS", "1" if DEVICE.startswith("cpu") else "0"))
if THREADS > 0:
    torch.set_num_threads(THREADS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,pass_", CASES, ids=[f"{o}-{p}" for o, p in CASES])
def test_kernel(benchmark, op, pass_, backend):
    why = unavailable(op, backend, DEVICE)
    if why:
        pytest.skip(f"{backend} cannot run {op} on {DEVICE}: {why}")
    fn, work, unit = make_case(op, pass_, backend, PRESET, DEVICE)
    fn()  # warm-up: autotuning, lazy init, allocation

    def call():
        fn()
        sync(DEVICE)

    sync(DEVICE)
    benchmark.group = f"{op}-{pass_}"
    benchmark.extra_info.update(device=DEVICE, preset=PRESET, shapes={k: v for k, v in PRESETS[PRESET].items()},
                                work=work, unit=unit, torch=torch.__version__,
                                threads=torch.get_num_threads())
    benchmark(call)
    med = benchmark.stats.stats.median if benchmark.stats else None
    if med:
        benchmark.extra_info["rate"] = work / med / (1e9 if unit == "byte" else 1e12)
        benchmark.extra_info["rate_unit"] = "GB/s" if unit == "byte" else "TFLOP/s"
