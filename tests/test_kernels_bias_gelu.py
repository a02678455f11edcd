"""Triton fused bias + GELU vs a float64 PyTorch reference.

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


def _run(device, shape, dtype, bias, approximate):
    N = shape[-1]
    x = (torch.randn(shape) * 2).to(device, dtype).requires_grad_()
    b = torch.randn(N).to(device, dtype).requires_grad_() if bias else None
    dy = torch.randn(shape).to(device, dtype)
    leaves = [t for t in (x, b) if t is not None]

    y = kernels.bias_gelu(x, b, approximate)
    y.backward(dy)
    ours = [y] + [t.grad for t in leaves]

    def ref(ts, g):
        out = F.gelu(ts[0] + ts[1] if bias else ts[0], approximate=approximate)
        out.backward(g)
        return [out] + [t.grad for t in ts]

    ref64 = ref([t.detach().double().requires_grad_() for t in leaves], dy.double())
    tor = ref([t.detach().clone().requires_grad_() for t in leaves], dy)
    assert y.dtype == dtype and y.shape == x.shape
    for name, o, t, r in zip(("y", "dx", "dbias"), ours, tor, ref64):
        assert o.dtype == dtype
        assert_close_to_ref(f"bias_gelu[{approximate}] {name} {tuple(shape)}", o, t, r, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("N", [768, 1000, 1023])
def test_bias_gelu_matches_float64(device, N, approximate, dtype):
    _run(device, (2, 17, N), dtype, bias=True, approximate=approximate)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_gelu_without_bias(device, dtype, approximate):
    _run(device, (1, 1, 1000), dtype, bias=False, approximate=approximate)


def test_bias_gelu_many_rows_and_wide(device):
    # more rows than one program's share and N > 256: several row groups and column blocks
    _run(device, (3, 100, 3072 + 5), torch.float32, bias=True, approximate="tanh")


def test_bias_gelu_dbias_is_deterministic(device):
    x = torch.randn(300, 1000).to(device).requires_grad_()
    b = torch.randn(1000).to(device).requires_grad_()
    dy = torch.randn(300, 1000).to(device)
    out = []
    for _ in range(2):
        x.grad = b.grad = None
        kernels.bias_gelu(x, b).backward(dy)
        out.append(b.grad.clone())
    assert torch.equal(out[0], out[1])


def test_bias_gelu_rejects_unknown_approximation(device):
    with pytest.raises(ValueError, match="approximate"):
        kernels.bias_gelu(torch.randn(2, 4).to(device), None, "erf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bias_gelu_gpu_block_config(device, monkeypatch, dtype):
    """The interpreter normally gets tall tiles; run the exact GPU BLOCK_M choice too."""
    import sys

    cpu_only(device, "on CUDA every test already runs the GPU BLOCK_M")
    monkeypatch.setattr(sys.modules["kernels.bias_gelu"], "interpreting", lambda: False)
    _run(device, (2, 17, 1000), dtype, bias=True, approximate="none")
    _run(device, (1, 33, 300), dtype, bias=False, approximate="tanh")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_bias_gelu_fp32_bias_low_precision_input(device, dtype):
    """Autocast: F.linear gives bf16/fp16 activations while the bias parameter stays fp32."""
    N = 1023
    x = (torch.randn(2, 17, N) * 2).to(device, dtype).requires_grad_()
    b = torch.randn(N).to(device).requires_grad_()
    dy = torch.randn(2, 17, N).to(device, dtype)
    y = kernels.bias_gelu(x, b, "tanh")
    y.backward(dy)
    assert y.dtype == dtype and x.grad.dtype == dtype and b.grad.dtype == torch.float32
    r = [t.detach().double().requires_grad_() for t in (x, b)]
    y64 = F.gelu(r[0] + r[1], approximate="tanh")
    y64.backward(dy.double())
    rt = [t.detach().clone().requires_grad_() for t in (x, b)]
    yt = F.gelu(rt[0] + rt[1], approximate="tanh").to(dtype)  # type promotion: fp32 math, rounded output
    yt.backward(dy)
    assert_close_to_ref("bias_gelu mixed y", y, yt, y64, dtype)
    assert_close_to_ref("bias_gelu mixed dx", x.grad, rt[0].grad, r[0].grad, dtype)
    assert_close_to_ref("bias_gelu mixed dbias", b.grad, rt[1].grad, r[1].grad, torch.float32)
