"""Triton FlashAttention vs a float64 PyTorch reference: output and dq, dk, dv.

Runs on the test device (NANOGPT_TEST_DEVICE): CPU through Triton's interpreter (tests/conftest.py turns it
on), or the compiled kernels on CUDA.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels._testing import check_attention


pytestmark = pytest.mark.usefixtures("triton_kernels")  # tests/conftest.py


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [32, 64, 128]


CASES = [(T, HEAD_DIMS[i % 3], causal) for i, (T, causal) in
         enumerate((T, c) for T in (1, 17, 100, 257) for c in (True, False))]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,D,causal", CASES)
def test_attention_matches_float64(device, T, D, causal, dtype):
    check_attention(kernels.attention, device, 1, 2, T, D, dtype, causal)


@pytest.mark.parametrize("D", HEAD_DIMS)
def test_attention_every_head_dim_batched(device, D):
    check_attention(kernels.attention, device, 2, 3, 33, D, torch.float32, True)


def test_attention_custom_scale(device):
    check_attention(kernels.attention, device, 1, 2, 40, 64, torch.float32, False, scale=0.3)
    check_attention(kernels.attention, device, 1, 1, 40, 32, torch.float16, True, scale=0.05)


def test_attention_contiguous_inputs_and_output_layout(device):
    q, k, v = (torch.randn(2, 2, 50, 64).to(device) for _ in range(3))
    o = kernels.attention(q, k, v)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-6, rtol=1e-5)
    assert o.transpose(1, 2).is_contiguous()  # (B, T, H, D) storage: the model's transpose-back is free


def test_attention_rejects_unsupported_head_dim(device):
    q = torch.randn(1, 1, 8, 48).to(device)
    with pytest.raises(ValueError, match="head dim 48"):
        kernels.attention(q, q, q)


_attn = importlib.import_module("kernels.attention")  # the module (kernels.attention is the function)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,D,causal", [(17, 32, True), (100, 64, False), (33, 128, True)])
def test_attention_dropout_matches_masked_float64(device, T, D, causal, dtype):
    B, H, p = 2, 2, 0.3
    check_attention(kernels.attention, device, B, H, T, D, dtype, causal,
                    dropout=(p, lambda seed: _attn.dropout_mask(B, H, T, seed, p)))


def test_attention_dropout_mask_statistics(device):
    B, H, T, p = 2, 3, 129, 0.25
    seeds = [torch.randint(2**31 - 1, (), device=device) for _ in range(2)]
    m = _attn.dropout_mask(B, H, T, seeds[0], p)
    kept = m != 0
    assert torch.isfinite(m).all() and torch.all(m[kept] == 1 / (1 - p))
    assert abs(kept.float().mean().item() - (1 - p)) < 0.01
    for i in range(B * H):  # heads draw different masks
        for j in range(i):
            assert not torch.equal(kept.flatten(0, 1)[i], kept.flatten(0, 1)[j])
    assert torch.equal(m, _attn.dropout_mask(B, H, T, seeds[0], p))  # a seed gives one mask
    assert not torch.equal(m, _attn.dropout_mask(B, H, T, seeds[1], p))


def test_attention_dropout_reproducible_and_rejects_bad_p(device):
    q, k, v = (torch.randn(1, 2, 16, 32).to(device) for _ in range(3))
    torch.manual_seed(5)
    a = kernels.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(5)
    assert torch.equal(a, kernels.attention(q, k, v, dropout_p=0.5))
    assert not torch.equal(a, kernels.attention(q, k, v, dropout_p=0.5))
    with pytest.raises(ValueError, match="dropout_p"):
        kernels.attention(q, k, v, dropout_p=1.0)
