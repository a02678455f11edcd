"""Helpers for the kernel tests: error budgets against a float64 reference (tensors on any device)."""
import contextlib

import torch

# absolute floors per dtype, added to the "2x PyTorch's own error" budget
ABS_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def max_err(out, ref64):
    """max |out - ref| in float64; NaN (e.g. an unwritten poisoned element) propagates."""
    d = (out.detach().double().cpu() - ref64.detach().double().cpu()).abs()  # either may be on the GPU
    if torch.isnan(d).any():
        return float("nan")
    return d.max().item() if d.numel() else 0.0


def budget(torch_out, ref64, dtype, scale_hint=0.0):
    """2x PyTorch's same-dtype error vs float64, plus a floor of one unit roundoff at the output's scale.

    scale_hint: magnitude of intermediate terms that cancel in the result (e.g. dp - delta in attention's
    backward), for outputs whose exact value can be ~0 while their rounding error cannot.
    """
    eps = torch.finfo(dtype).eps
    scale = max(ref64.detach().abs().max().item() if ref64.numel() else 0.0, scale_hint)
    return 2.0 * max_err(torch_out, ref64) + max(ABS_FLOOR[dtype], eps * scale)


def assert_close_to_ref(name, out, torch_out, ref64, dtype, scale_hint=0.0):
    err, tol = max_err(out, ref64), budget(torch_out, ref64, dtype, scale_hint)
    assert err == err and err <= tol, f"{name}: error {err:.3g} vs float64 exceeds budget {tol:.3g} " \
                                      f"(torch {max_err(torch_out, ref64):.3g}, dtype {dtype})"


@contextlib.contextmanager
def kernel_test_setup(device):
    """Around each kernel test (an autouse fixture: `with kernel_test_setup(device): yield`).

    Fails the test when the Triton kernels cannot run on the test device (e.g. triton was imported before
    tests/conftest.py set TRITON_INTERPRET=1 on CPU, or TRITON_INTERPRET=1 leaked into a CUDA run), and pins
    fp32 matmuls to full precision for the test: an earlier test in the same session may have turned TF32 on
    process-wide (benchmarks/bench.py's run() and nanogpt.train do), which would make the fp32 matmuls of the
    references on CUDA noisier than the tolerances assume.
    """
    import pytest

    import kernels

    reason = kernels.unavailable(torch.device(device).type)
    if reason:
        pytest.fail(f"the Triton kernels cannot run on {device}: {reason}")
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def cpu_only(device, why):
    """Skip the calling test off CPU: `why` says what it checks that only the interpreter needs."""
    import pytest

    if torch.device(device).type != "cpu":
        pytest.skip(f"CPU (Triton interpreter) only: {why}")
