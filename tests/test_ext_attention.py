"""The ext backend's CPU attention kernel (csrc/cpu/attention.cpp) against a float64 reference.

Output, dq, dk, dv on fresh random inputs in the model's layout (strided views of one qkv buffer),
odd T and head dims that are not multiples of the kernel's 16-wide tiles, causal and not, float32
and bfloat16: our error at most 2x that of torch's own SDPA in the same dtype. Outputs are
NaN-poisoned before the kernel writes them (NANOGPT_POISON=1). Dropout must draw exactly the
Triton kernels' mask (kernels.attention.dropout_mask, run by Triton's interpreter). On CUDA the
extension has no attention kernel (ext.attention is torch's SDPA there), so these tests are CPU-only.
"""
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F

from kernels._testing import check_attention
from nanogpt import ext, ops


@pytest.fixture(autouse=True)
def _poison(monkeypatch, device):
    if torch.device(device).type != "cpu":
        pytest.skip("the extension's attention kernel is CPU-only (CUDA runs torch SDPA)")
    reason = ext.unavailable("cpu")
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("NANOGPT_POISON", "1")


CASES = [(T, D, causal) for T, D in ((1, 32), (17, 64), (100, 128), (257, 20), (64, 48)) for causal in (True, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T,D,causal", CASES)
def test_attention_matches_float64(device, T, D, causal, dtype):
    check_attention(ext.attention, device, 2, 3, T, D, dtype, causal)


def test_attention_custom_scale(device):
    check_attention(ext.attention, device, 1, 2, 40, 64, torch.float32, False, scale=0.3)
    check_attention(ext.attention, device, 1, 1, 40, 32, torch.bfloat16, True, scale=0.05)


def test_attention_contiguous_inputs_and_output_layout(device):
    q, k, v = (torch.randn(2, 2, 50, 64) for _ in range(3))
    o = ext.attention(q, k, v)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-6, rtol=1e-5)
    assert o.transpose(1, 2).is_contiguous()  # (B, T, H, D) storage: the model's transpose-back is free


def test_attention_deterministic_and_thread_count_independent(device):
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 70, 32, requires_grad=True) for _ in range(3))
    do = torch.randn(3, 4, 70, 32)
    before = torch.get_num_threads()
    out = []
    try:
        for n in (1, max(2, before), max(2, before)):
            torch.set_num_threads(n)
            for t in (q, k, v):
                t.grad = None
            o = ext.attention(q, k, v)
            o.backward(do)
            out.append([o.detach(), q.grad, k.grad, v.grad])
    finally:
        torch.set_num_threads(before)
    for run in out[1:]:
        for a, b in zip(out[0], run):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T,D,causal", [(17, 32, True), (100, 48, False), (64, 64, True)])
def test_attention_dropout_matches_triton_mask_float64(device, T, D, causal, dtype):
    triton_attention = importlib.import_module("kernels.attention")
    B, H, p = 2, 3, 0.3
    check_attention(ext.attention, device, B, H, T, D, dtype, causal,
                    dropout=(p, lambda seed: triton_attention.dropout_mask(B, H, T, seed, p)))


def test_attention_other_dtypes_fall_back_to_sdpa_with_one_warning(device):
    ops._announced.clear()
    q, k, v = (torch.randn(1, 2, 16, 32, dtype=torch.float16) for _ in range(3))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        a = ext.attention(q, k, v)
        ext.attention(q, k, v)
    assert torch.equal(a, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert sum("float16" in str(w.message) for w in rec) == 1


def test_attention_bad_inputs_raise_clear_errors(device):
    q = torch.randn(1, 2, 8, 16)
    E = torch.ops.nanogpt_ext
    with pytest.raises(RuntimeError, match="k has shape"):
        E.attention_fwd(q, torch.randn(1, 2, 9, 16), q, True, 0.25, 0.0, None)
    with pytest.raises(RuntimeError, match="v is BFloat16"):
        E.attention_fwd(q, q, q.bfloat16(), True, 0.25, 0.0, None)
    with pytest.raises(RuntimeError, match=r"\(B, H, T, D\)"):
        E.attention_fwd(q[0], q[0], q[0], True, 0.25, 0.0, None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        E.attention_fwd(q.double(), q.double(), q.double(), True, 0.25, 0.0, None)
    with pytest.raises(RuntimeError, match="needs seed"):
        E.attention_fwd(q, q, q, True, 0.25, 0.1, None)
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\)"):
        E.attention_fwd(q, q, q, True, 0.25, 1.0, torch.tensor(1))
    with pytest.raises(ValueError, match="dropout_p"):
        ext.attention(q, q, q, dropout_p=-0.1)
    o, lse = E.attention_fwd(q, q, q, True, 0.25, 0.0, None)
    with pytest.raises(RuntimeError, match="lse must be"):
        E.attention_bwd(o, q, q, q, o, lse[0], True, 0.25, 0.0, None)
