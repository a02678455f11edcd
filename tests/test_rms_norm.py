"""rms_norm on every backend (tests/conftest.py's `backend`) against float64, forward and every gradient.

Runs on the test device (NANOGPT_TEST_DEVICE): Triton on CPU through its interpreter (tests/conftest.py turns it
on), or compiled on CUDA. Outputs are NaN-poisoned before the kernels write them (NANOGPT_POISON=1), so an
element a kernel forgets to write fails the budget check. QK-norm is this op over the head dimension, without
a weight or with one.
"""
import sys

import pytest
import torch
import torch.nn.functional as F

from budget import ISA_DTYPES, check_bf16_out_is_the_cast, check_compiled, check_op, rand_input
from test_layer_norm import DTYPES, GRID, SAME, case_id, skip_unsupported

OP = "rms_norm"
# (shape, weight, dtypes): N a multiple of 16 and odd, one row, tiny N, a QK-norm (B, T, H, D) shape, fp32 weights
CASES = ([((2, 17, n), True, d) for n in (768, 1023) for d in SAME] + [((1, 1, 1000), False, d) for d in SAME]
         + [((2, 9, 3, 64), False, SAME[0]), ((5, 7), True, SAME[0])] + [((2, 17, 1000), True, d) for d in DTYPES[3:]])


def torch_rms_norm(x, weight, eps):
    """PyTorch's op in these dtypes; fp32 weights mean fp32 math on the upcast input (autocast)."""
    return F.rms_norm(x.to(weight.dtype if weight is not None else x.dtype), (x.shape[-1],), weight, eps).to(x.dtype)


def check(impl, backend, device, shape, weight, dtypes, eps=None):
    skip_unsupported(backend, device, dtypes)
    act, par = dtypes
    N = shape[-1]
    x = (torch.randn(shape) * 2 + 0.5).to(device, act).requires_grad_()
    w = (torch.randn(N) * 0.5 + 1).to(device, par).requires_grad_() if weight else None
    check_op(f"rms_norm[{backend}] {shape} {act}/{par} eps={eps}", lambda x, w: impl(x, w, eps),
             lambda x, w: torch_rms_norm(x, w, eps), dict(x=x, weight=w), torch.randn(shape).to(device, act))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_rms_norm_matches_float64(impl, backend, device, case):
    check(impl, backend, device, *case)


@pytest.mark.parametrize("eps", [1e-6, 0.5])  # 0.5: eps large enough that dropping it would fail
def test_rms_norm_explicit_eps(impl, backend, device, eps):
    check(impl, backend, device, (3, 33, 100), True, SAME[0], eps)


@pytest.mark.backends("triton", "ext")  # the torch reference is the budget's own baseline
@pytest.mark.compiled_only("a grid of 90 cases")
@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_rms_norm_grid_matches_float64(impl, backend, device, case):
    check(impl, backend, device, *case)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("weight", [True, False], ids=["weight", "noweight"])
def test_rms_norm_out_dtype_matches_float64(impl, backend, device, out_dtype, weight):
    """The autocast path: fp32 x (and weight), the output (and its gradient) in the dtype the next matmul takes."""
    shape = (3, 37, 1000)
    x = (torch.randn(shape) * 2 + 0.5).to(device).requires_grad_()
    w = (torch.randn(1000) * 0.5 + 1).to(device).requires_grad_() if weight else None

    def torch_fn(x, w):  # float64 inputs: the reference, float64 throughout
        y = F.rms_norm(x, (x.shape[-1],), w)
        return y if x.dtype == torch.float64 else y.to(out_dtype)

    check_op(f"rms_norm[{backend}] out_dtype={out_dtype}", lambda x, w: impl(x, w, out_dtype=out_dtype), torch_fn,
             dict(x=x, weight=w), torch.randn(shape).to(device, out_dtype))


def test_rms_norm_grads_are_deterministic(impl, device):
    x = torch.randn(64, 768).to(device).requires_grad_()
    w = torch.randn(768).to(device).requires_grad_()
    dy = torch.randn(64, 768).to(device)
    grads = []
    for _ in range(2):
        x.grad = w.grad = None
        impl(x, w).backward(dy)
        grads.append([x.grad.clone(), w.grad.clone()])
    assert all(torch.equal(g0, g1) for g0, g1 in zip(*grads))


def test_rms_norm_non_contiguous_input(impl, device):
    x = torch.randn(8, 2, 64).to(device).transpose(0, 1)  # rows not contiguous across the reshape
    w = torch.randn(64).to(device)
    y = impl(x, w)
    assert y.shape == x.shape
    torch.testing.assert_close(y, F.rms_norm(x, (64,), w), atol=1e-5, rtol=1e-5)


@pytest.mark.backends("triton", "ext")
@pytest.mark.compiled_only("12288 rows")
def test_rms_norm_many_rows_matches_float64(impl, backend, device):
    """GPT-2's 12 x 1024 rows: the column sums (dweight) over hundreds of row chunks within budget (an fp32 running
    sum over the chunks was not: up to 4.6x PyTorch's error at 12288 x 3072 bf16, on CPU and on an H200)."""
    check(impl, backend, device, (12288, 768), True, DTYPES[-1])

@pytest.mark.backends("triton", "ext")
@pytest.mark.parametrize("weight", [True, False], ids=["weight", "noweight"])
def test_rms_norm_torch_compile_fullgraph_matches_eager(impl, device, weight):
    x, w = torch.randn(2, 9, 100).to(device).requires_grad_(), torch.randn(100).to(device).requires_grad_()
    check_compiled((lambda x, w: impl(x, w)) if weight else (lambda x, w: impl(x) * w), x, w)


@pytest.mark.backends("triton")
@pytest.mark.cpu_only("on CUDA every test already runs the GPU block config")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_gpu_block_config(impl, backend, device, monkeypatch, dtype):
    """The interpreter normally gets tall blocks; run the exact GPU rows-per-program choice too."""
    monkeypatch.setattr(sys.modules["nanogpt_kernels.triton.rms_norm"], "interpreting", lambda: False)
    check(impl, backend, device, (2, 17, 768), True, (dtype, dtype))
    check(impl, backend, device, (3, 5, 100), False, (dtype, dtype))


@pytest.mark.backends("ext")
@pytest.mark.cpu_only("CPU threading")
def test_rms_norm_ext_does_not_depend_on_thread_count(impl, same_at_thread_counts):
    same_at_thread_counts(impl, torch.randn(1000, 768), torch.randn(768), grad_out=torch.randn(1000, 768))


@pytest.mark.backends("ext")
def test_rms_norm_ext_bad_inputs_raise_clear_errors(backend, device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.nanogpt_ext.rms_norm_fwd(x, torch.ones(7, device=device), 1e-5)
    with pytest.raises(RuntimeError, match="unsupported dtypes|dtype"):
        torch.ops.nanogpt_ext.rms_norm_fwd(x.double(), None, 1e-5)


# ---------------------------------------------------------------- the extension's CPU kernel, every ISA clone

@pytest.mark.cpu_only("the ISA clones are the CPU kernels'")
@pytest.mark.parametrize("dtype", ISA_DTYPES)
@pytest.mark.parametrize("weight", [True, False], ids=["weight", "noweight"])
def test_ext_rms_norm_every_cpu_isa(isa, dtype, weight):
    x, w = rand_input(3, 37, 1023, dtype=dtype, scale=2.0), rand_input(1023, dtype=dtype) if weight else None
    check_op(f"rms_norm {isa}", lambda x, w: torch.ops.nanogpt_ext.rms_norm(x, w, 1e-6),
             lambda x, w: F.rms_norm(x, (1023,), w, 1e-6), {"x": x, "weight": w},
             rand_input(3, 37, 1023, dtype=dtype, grad=False))


@pytest.mark.cpu_only("the ISA clones are the CPU kernels'")
def test_ext_rms_norm_bf16_output_is_the_cast_fp32_output_every_cpu_isa(isa):
    """As layer_norm's: out_dtype=bf16 from fp32 x gives the values of the cast path."""
    eps = torch.finfo(torch.float32).eps
    check_bf16_out_is_the_cast(lambda x, w, out: torch.ops.nanogpt_ext.rms_norm(x, w, eps, out),
                               [rand_input(3, 37, 1023, dtype=torch.float32, scale=2.0),
                                rand_input(1023, dtype=torch.float32)],
                               rand_input(3, 37, 1023, dtype=torch.bfloat16, grad=False))
