"""Triton LayerNorm vs a float64 PyTorch reference, forward and all gradients.

Runs on the test device (NANOGPT_TEST_DEVICE): CPU through Triton's interpreter (tests/conftest.py turns it
on), or the compiled kernels on CUDA.
"""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels._testing import assert_close_to_ref, cpu_only


pytestmark = pytest.mark.usefixtures("triton_kernels")  # tests/conftest.py


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _run(device, shape, dtype, bias, eps=1e-5):
    N = shape[-1]
    x = (torch.randn(shape) * 2 + 0.5).to(device, dtype).requires_grad_()
    w = (torch.randn(N) * 0.5 + 1).to(device, dtype).requires_grad_()
    b = (torch.randn(N) * 0.3).to(device, dtype).requires_grad_() if bias else None
    dy = torch.randn(shape).to(device, dtype)
    leaves = [t for t in (x, w, b) if t is not None]

    y = kernels.layer_norm(x, w, b, eps)
    y.backward(dy)
    ours = [y] + [t.grad for t in leaves]

    r64 = [t.detach().double().requires_grad_() for t in leaves]
    y64 = F.layer_norm(r64[0], (N,), r64[1], r64[2] if bias else None, eps)
    y64.backward(dy.double())
    ref = [y64] + [t.grad for t in r64]

    rt = [t.detach().clone().requires_grad_() for t in leaves]
    yt = F.layer_norm(rt[0], (N,), rt[1], rt[2] if bias else None, eps)
    yt.backward(dy)
    tor = [yt] + [t.grad for t in rt]

    assert y.dtype == dtype and y.shape == x.shape
    for name, o, t, r in zip(("y", "dx", "dweight", "dbias"), ours, tor, ref):
        assert o.dtype == dtype
        assert_close_to_ref(f"layer_norm {name} {tuple(shape)}", o, t, r, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", [768, 1000, 1023])
def test_layer_norm_matches_float64(device, N, dtype):
    _run(device, (2, 17, N), dtype, bias=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_no_bias_odd_rows(device, dtype):
    _run(device, (1, 1, 1000), dtype, bias=False)
    _run(device, (3, 37, 100), dtype, bias=False)


def test_layer_norm_small_and_large_n(device):
    _run(device, (5, 7), torch.float32, bias=True)
    _run(device, (9, 4099), torch.float32, bias=True)  # several warps, masked tail


def test_layer_norm_dweight_is_deterministic(device):
    x = torch.randn(64, 768).to(device).requires_grad_()
    w = torch.randn(768).to(device).requires_grad_()
    b = torch.randn(768).to(device).requires_grad_()
    dy = torch.randn(64, 768).to(device)
    grads = []
    for _ in range(2):
        x.grad = w.grad = b.grad = None
        kernels.layer_norm(x, w, b).backward(dy)
        grads.append((w.grad.clone(), b.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_layer_norm_non_contiguous_input(device):
    x = torch.randn(8, 2, 64).to(device).transpose(0, 1)  # rows not contiguous across the reshape
    w, b = torch.randn(64).to(device), torch.randn(64).to(device)
    torch.testing.assert_close(kernels.layer_norm(x, w, b), F.layer_norm(x, (64,), w, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_gpu_block_config(device, monkeypatch, dtype):
    """The interpreter normally gets tall blocks; run the exact GPU rows-per-program choice too."""
    import sys

    cpu_only(device, "on CUDA every test already runs the GPU block config")
    monkeypatch.setattr(sys.modules["kernels.layer_norm"], "interpreting", lambda: False)
    _run(device, (2, 17, 768), dtype, bias=True)
    _run(device, (3, 5, 100), dtype, bias=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_layer_norm_fp32_params_low_precision_input(device, dtype):
    """Autocast: bf16/fp16 activations with fp32 weight and bias; dweight / dbias come back fp32."""
    N = 1000
    x = (torch.randn(2, 17, N) * 2).to(device, dtype).requires_grad_()
    w = (torch.randn(N) * 0.5 + 1).to(device).requires_grad_()
    b = torch.randn(N).to(device).requires_grad_()
    dy = torch.randn(2, 17, N).to(device, dtype)
    y = kernels.layer_norm(x, w, b)
    y.backward(dy)
    assert y.dtype == dtype and x.grad.dtype == dtype and w.grad.dtype == b.grad.dtype == torch.float32
    r = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y64 = F.layer_norm(r[0], (N,), r[1], r[2])
    y64.backward(dy.double())
    # torch's own mixed-dtype op: fp32 math on the upcast input, rounded output
    rt = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    yt = F.layer_norm(rt[0].float(), (N,), rt[1], rt[2]).to(dtype)
    yt.backward(dy)
    for name, o, t, ref in (("y", y, yt, y64), ("dx", x.grad, rt[0].grad, r[0].grad)):
        assert_close_to_ref(f"layer_norm mixed {name}", o, t, ref, dtype)
    for name, o, t, ref in (("dweight", w.grad, rt[1].grad, r[1].grad), ("dbias", b.grad, rt[2].grad, r[2].grad)):
        assert_close_to_ref(f"layer_norm mixed {name}", o, t, ref, torch.float32)
