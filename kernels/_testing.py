"""Kept only for tests/test_linear_cross_entropy.py until it imports tests/budget.py, the kernel tests' one error
budget (delete this file then)."""
from nanogpt_kernels.contract import max_err, within_budget


def assert_close_to_ref(name, out, torch_out, ref64, dtype, scale_hint=0.0):
    ok, err, tol = within_budget(out, torch_out, ref64, dtype, scale_hint)
    assert ok, f"{name}: error {err:.3g} vs float64 exceeds budget {tol:.3g} (torch {max_err(torch_out, ref64):.3g})"
