"""bias_relu2 (relu(x + bias)^2, the modern GPT's MLP activation) on every backend (tests/conftest.py's
`backend`) against float64, forward and every gradient.

Runs on the test device (NANOGPT_TEST_DEVICE): Triton on CPU through its interpreter (tests/conftest.py turns it
on), or compiled on CUDA. Outputs are NaN-poisoned before the kernels write them (NANOGPT_POISON=1).
"""
import sys

import pytest
import torch
import torch.nn.functional as F

from budget import ISA_DTYPES, check_compiled, check_op, rand_input
from test_layer_norm import DTYPES, GRID, SAME, case_id, skip_unsupported

OP = "bias_relu2"
# (shape, bias, dtypes) for every backend; GRID (test_layer_norm.py) for the compiled ones
CASES = ([((2, 17, n), True, d) for n in (768, 1023) for d in SAME] + [((1, 1, 1000), False, d) for d in SAME]
         + [((3, 100, 3072 + 5), True, SAME[0])] + [((2, 17, 1023), True, d) for d in DTYPES[3:]])


def torch_bias_relu2(x, bias):
    """PyTorch's op in these dtypes: an fp32 bias promotes the sum to fp32 (autocast), rounded back to x's dtype."""
    return F.relu(x if bias is None else x + bias).square().to(x.dtype)


def check(impl, backend, device, shape, bias, dtypes):
    skip_unsupported(backend, device, dtypes)
    act, par = dtypes
    x = (torch.randn(shape) * 2).to(device, act).requires_grad_()
    b = torch.randn(shape[-1]).to(device, par).requires_grad_() if bias else None
    check_op(f"bias_relu2[{backend}] {shape} {act}/{par}", impl, torch_bias_relu2, dict(x=x, bias=b),
             torch.randn(shape).to(device, act))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bias_relu2_matches_float64(impl, backend, device, case):
    check(impl, backend, device, *case)


@pytest.mark.backends("triton", "ext")  # the torch reference is the budget's own baseline
@pytest.mark.compiled_only("a grid of 90 cases")
@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_bias_relu2_grid_matches_float64(impl, backend, device, case):
    check(impl, backend, device, *case)


def test_bias_relu2_zero_and_negative_inputs(impl, device):
    """relu's kink: exactly 0 and negative pre-activations give 0 and a 0 gradient."""
    x = torch.tensor([-3.0, -1e-30, 0.0, 1e-30, 2.0]).to(device).requires_grad_()
    y = impl(x)
    y.backward(torch.ones_like(y))
    assert torch.equal(y.detach().cpu(), torch.tensor([0.0, 0.0, 0.0, 0.0, 4.0]))
    assert torch.equal(x.grad.cpu(), torch.tensor([0.0, 0.0, 0.0, 2e-30, 4.0]))


def test_bias_relu2_grads_are_deterministic(impl, device):
    x = torch.randn(300, 1000).to(device).requires_grad_()
    b = torch.randn(1000).to(device).requires_grad_()
    dy = torch.randn(300, 1000).to(device)
    grads = []
    for _ in range(2):
        x.grad = b.grad = None
        impl(x, b).backward(dy)
        grads.append([x.grad.clone(), b.grad.clone()])
    assert all(torch.equal(g0, g1) for g0, g1 in zip(*grads))


@pytest.mark.backends("triton", "ext")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_bias_relu2_torch_compile_fullgraph_matches_eager(impl, device, bias):
    x, b = torch.randn(2, 9, 100).to(device).requires_grad_(), torch.randn(100).to(device).requires_grad_()
    check_compiled((lambda x, b: impl(x, b)) if bias else (lambda x, b: impl(x) + b), x, b)


@pytest.mark.backends("triton")
@pytest.mark.cpu_only("on CUDA every test already runs the GPU BLOCK_M")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bias_relu2_gpu_block_config(impl, backend, device, monkeypatch, dtype):
    """The interpreter normally gets tall tiles; run the exact GPU BLOCK_M choice too."""
    monkeypatch.setattr(sys.modules["nanogpt_kernels.triton.bias_gelu"], "interpreting", lambda: False)
    check(impl, backend, device, (2, 17, 1000), True, (dtype, dtype))
    check(impl, backend, device, (1, 33, 300), False, (dtype, dtype))


@pytest.mark.backends("ext")
@pytest.mark.cpu_only("CPU threading")
def test_bias_relu2_ext_does_not_depend_on_thread_count(impl, same_at_thread_counts):
    same_at_thread_counts(impl, torch.randn(1000, 768), torch.randn(768), grad_out=torch.randn(1000, 768))


@pytest.mark.backends("ext")
def test_bias_relu2_ext_bad_inputs_raise_clear_errors(backend, device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        torch.ops.nanogpt_ext.bias_relu2_fwd(x, torch.ones(7, device=device))
    with pytest.raises(RuntimeError, match="unsupported dtypes|dtype"):
        torch.ops.nanogpt_ext.bias_relu2_fwd(x.double(), None)


# ---------------------------------------------------------------- the extension's CPU kernel, every ISA clone

@pytest.mark.cpu_only("the ISA clones are the CPU kernels'")
@pytest.mark.parametrize("dtype", ISA_DTYPES)
def test_ext_bias_relu2_every_cpu_isa(isa, dtype):
    x, b = rand_input(37, 1023, dtype=dtype, scale=3.0), rand_input(1023, dtype=dtype)
    check_op(f"bias_relu2 {isa}", torch.ops.nanogpt_ext.bias_relu2, lambda x, b: F.relu(x + b).square(),
             {"x": x, "bias": b}, rand_input(37, 1023, dtype=dtype, grad=False))
