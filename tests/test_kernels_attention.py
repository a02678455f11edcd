"""Triton FlashAttention vs a float64 PyTorch reference: output and dq, dk, dv.

Runs on the test device (NANOGPT_TEST_DEVICE): CPU through Triton's interpreter (tests/conftest.py turns it
on), or the compiled kernels on CUDA.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels._testing import assert_close_to_ref, kernel_test_setup


@pytest.fixture(autouse=True)
def _setup(device):
    with kernel_test_setup(device):
        yield


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [32, 64, 128]


def _qkv(device, B, H, T, D, dtype):
    """q, k, v as the model makes them: (B, H, T, D) transposed views of one (B, T, 3, H, D) buffer."""
    qkv = torch.randn(B, T, 3, H, D).to(device, dtype)
    return [qkv[:, :, i].transpose(1, 2).detach().requires_grad_() for i in range(3)]


def _sdpa(q, k, v, causal, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def _check(device, B, H, T, D, dtype, causal, scale=None):
    q, k, v = _qkv(device, B, H, T, D, dtype)
    assert not q.is_contiguous() or T == 1
    do = torch.randn(B, H, T, D).to(device, dtype)
    o = kernels.attention(q, k, v, causal=causal, scale=scale)
    o.backward(do)
    ours = [o, q.grad, k.grad, v.grad]

    r64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o64 = _sdpa(*r64, causal, scale)
    o64.backward(do.double())
    ref = [o64] + [t.grad for t in r64]

    rt = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ot = _sdpa(*rt, causal, scale)
    ot.backward(do)
    tor = [ot] + [t.grad for t in rt]

    # dq and dk are sums of p * (dp - delta) terms that cancel: their rounding error scales with |dp| (and
    # sqrt(D) terms per dot), not with the (possibly ~0, e.g. T=1) exact result
    sm = scale if scale is not None else 1 / math.sqrt(D)
    dp = (do.double() @ r64[2].detach().transpose(-1, -2)).abs().max().item()
    hint = {"dq": math.sqrt(D) * dp * r64[1].abs().max().item() * sm,
            "dk": math.sqrt(D) * dp * r64[0].abs().max().item() * sm}
    assert o.shape == q.shape and o.dtype == dtype
    for name, a, t, r in zip(("out", "dq", "dk", "dv"), ours, tor, ref):
        assert a.dtype == dtype and a.shape == q.shape
        assert_close_to_ref(f"attention {name} T={T} D={D} causal={causal}", a, t, r, dtype, hint.get(name, 0.0))


CASES = [(T, HEAD_DIMS[i % 3], causal) for i, (T, causal) in
         enumerate((T, c) for T in (1, 17, 100, 257) for c in (True, False))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,D,causal", CASES)
def test_attention_matches_float64(device, T, D, causal, dtype):
    _check(device, 1, 2, T, D, dtype, causal)


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_attention_every_head_dim_batched(device, D):
    _check(device, 2, 3, 33, D, torch.float32, True)


def test_attention_custom_scale(device):
    _check(device, 1, 2, 40, 64, torch.float32, False, scale=0.3)
    _check(device, 1, 1, 40, 32, torch.float16, True, scale=0.05)


def test_attention_contiguous_inputs_and_output_layout(device):
    q, k, v = (torch.randn(2, 2, 50, 64).to(device) for _ in range(3))
    o = kernels.attention(q, k, v)
    torch.testing.assert_close(o, _sdpa(q, k, v, True, None), atol=2e-6, rtol=1e-5)
    assert o.transpose(1, 2).is_contiguous()  # (B, T, H, D) storage: the model's transpose-back is free


def test_attention_rejects_unsupported_head_dim(device):
    q = torch.randn(1, 1, 8, 48).to(device)
    with pytest.raises(ValueError, match="head dim 48"):
        kernels.attention(q, q, q)


def test_attention_dropout_falls_back_to_sdpa_with_one_warning(device):
    import kernels.attention as _  # noqa: F401  (module, not the function)
    mod = __import__("sys").modules["kernels.attention"]
    mod._warned_dropout = False
    q, k, v = (torch.randn(1, 2, 16, 32).to(device) for _ in range(3))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        torch.manual_seed(0)
        a = kernels.attention(q, k, v, dropout_p=0.5)
        kernels.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    b = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, is_causal=True)
    assert torch.equal(a, b)
    assert sum("dropout_p > 0" in str(w.message) for w in rec) == 1
