"""Triton fused bias + GELU (interpreter on CPU) vs a float64 PyTorch reference."""
import os

_OLD_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels  # noqa: E402
from kernels._testing import assert_close_to_ref  # noqa: E402

assert kernels.unavailable("cpu") is None, kernels.unavailable("cpu")  # triton imported before TRITON_INTERPRET=1?
# the rest of the session (other tests, their subprocesses) must not see TRITON_INTERPRET=1
if _OLD_INTERPRET is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _OLD_INTERPRET


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    """kernels.unavailable("cpu") and the launchers see the interpreter during each kernel test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _run(shape, dtype, bias, approximate):
    N = shape[-1]
    x = (torch.randn(shape) * 2).to(dtype).requires_grad_()
    b = torch.randn(N).to(dtype).requires_grad_() if bias else None
    dy = torch.randn(shape).to(dtype)
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
def test_bias_gelu_matches_float64(N, approximate, dtype):
    _run((2, 17, N), dtype, bias=True, approximate=approximate)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_gelu_without_bias(dtype, approximate):
    _run((1, 1, 1000), dtype, bias=False, approximate=approximate)


def test_bias_gelu_many_rows_and_wide():
    # more rows than one program's share and N > 256: several row groups and column blocks
    _run((3, 100, 3072 + 5), torch.float32, bias=True, approximate="tanh")


def test_bias_gelu_dbias_is_deterministic():
    x = torch.randn(300, 1000, requires_grad=True)
    b = torch.randn(1000, requires_grad=True)
    dy = torch.randn(300, 1000)
    out = []
    for _ in range(2):
        x.grad = b.grad = None
        kernels.bias_gelu(x, b).backward(dy)
        out.append(b.grad.clone())
    assert torch.equal(out[0], out[1])


def test_bias_gelu_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="approximate"):
        kernels.bias_gelu(torch.randn(2, 4), None, "erf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bias_gelu_gpu_block_config(monkeypatch, dtype):
    """The interpreter normally gets tall tiles; run the exact GPU BLOCK_M choice too."""
    import sys

    monkeypatch.setattr(sys.modules["kernels.bias_gelu"], "interpreting", lambda: False)
    _run((2, 17, 1000), dtype, bias=True, approximate="none")
    _run((1, 33, 300), dtype, bias=False, approximate="tanh")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_bias_gelu_fp32_bias_low_precision_input(dtype):
    """Autocast: F.linear gives bf16/fp16 activations while the bias parameter stays fp32."""
    N = 1023
    x = (torch.randn(2, 17, N) * 2).to(dtype).requires_grad_()
    b = torch.randn(N).requires_grad_()
    dy = torch.randn(2, 17, N).to(dtype)
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
