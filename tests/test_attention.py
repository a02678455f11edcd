"""attention on every backend (tests/conftest.py's `backend`) against float64: output and dq, dk, dv.

Inputs are fresh random (B, H, T, D) views of one (B, T, 3, H, D) buffer, as the model makes them; odd T, head
dims off the kernels' tiles, causal or not. Runs on the test device (NANOGPT_TEST_DEVICE): Triton on CPU through
its interpreter (tests/conftest.py turns it on), or compiled on CUDA. Outputs are NaN-poisoned before the kernels
write them (NANOGPT_POISON=1). Dropout is checked against the mask the Triton kernels draw
(nanogpt_kernels.triton.attention.dropout_mask), which the extension's CPU kernel must reproduce bit for bit.
"""
import importlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from budget import ISA_DTYPES, check_compiled, check_op
from nanogpt_kernels import contract

OP = "attention"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TRITON_HEAD_DIMS = (32, 64, 128)

# (B, H, T, D, causal): T of one row, odd, several tiles; every head dim batched
CASES = ([(1, 2, T, TRITON_HEAD_DIMS[i % 3], causal) for i, (T, causal) in
          enumerate((T, c) for T in (1, 17, 100, 257) for c in (True, False))]
         + [(2, 3, 33, D, True) for D in TRITON_HEAD_DIMS])
# more heads, and head dims off the CPU kernel's 16-wide tiles
GRID = [(2, 3, T, D, causal) for T, D in ((1, 32), (17, 64), (100, 128), (257, 20), (64, 48))
        for causal in (True, False)]
DROPOUT_CASES = [(17, 32, True), (100, 64, False), (33, 128, True), (100, 48, False),
                 pytest.param(64, 64, True, marks=pytest.mark.compiled_only("one more dropout case"))]


def triton_attention():
    return importlib.import_module("nanogpt_kernels.triton.attention")  # the module; .attention is the function


def skip_unsupported(backend, D, dtype, dropout=False):
    if backend == "triton" and D not in TRITON_HEAD_DIMS:
        pytest.skip(f"the Triton kernels take head dims {TRITON_HEAD_DIMS} (test_attention_triton_rejects_head_dim)")
    if backend == "ext" and dropout and dtype == torch.float16:
        pytest.skip("the extension's kernel takes float32/bfloat16; float16 falls back to SDPA, with SDPA's dropout")


def check_attention(attention, device, B, H, T, D, dtype, causal, scale=None, dropout_p=0.0):
    """attention(q, k, v, causal=, scale=, dropout_p=) within budget of float64 softmax(q k^T * scale) v.

    With dropout, attention runs after torch.manual_seed(SEED) and must have applied the Triton kernels' keep mask
    for the seed torch.randint(2**31 - 1, ()) then draws; the references apply that mask to the softmax weights.
    """
    SEED = 1234
    mask = None
    if dropout_p:
        torch.manual_seed(SEED)
        mask = triton_attention().dropout_mask(B, H, T, torch.randint(2**31 - 1, (), device=device), dropout_p)

    def ours(q, k, v):
        torch.manual_seed(SEED)
        return attention(q, k, v, causal=causal, scale=scale, **({"dropout_p": dropout_p} if dropout_p else {}))

    def sdpa(q, k, v):
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(D))
        if causal:
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        return (torch.softmax(s.float(), -1).to(q.dtype) * mask.to(q.device, q.dtype)) @ v

    qkv = torch.randn(B, T, 3, H, D).to(device, dtype)
    q, k, v = [qkv[:, :, i].transpose(1, 2).detach().requires_grad_() for i in range(3)]
    assert not q.is_contiguous() or T == 1
    do = torch.randn(B, H, T, D).to(device, dtype)
    dq_hint, dk_hint = contract.attention_grad_hints(q, k, v, do, scale)
    check_op(f"attention B={B} H={H} T={T} D={D} causal={causal} scale={scale} p={dropout_p}", ours, sdpa,
             dict(q=q, k=k, v=v), do, {"dq": dq_hint, "dk": dk_hint})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,T,D,causal", CASES)
def test_attention_matches_float64(impl, backend, device, B, H, T, D, causal, dtype):
    check_attention(impl, device, B, H, T, D, dtype, causal)


@pytest.mark.backends("triton", "ext")  # the torch reference is the budget's own baseline
@pytest.mark.compiled_only("six heads at T up to 257")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,H,T,D,causal", GRID)
def test_attention_grid_matches_float64(impl, backend, device, B, H, T, D, causal, dtype):
    skip_unsupported(backend, D, dtype)
    check_attention(impl, device, B, H, T, D, dtype, causal)


@pytest.mark.parametrize("H,D,dtype,causal,scale", [(2, 64, torch.float32, False, 0.3),
                                                     (1, 32, torch.float16, True, 0.05),
                                                     (1, 32, torch.bfloat16, True, 0.05)])
def test_attention_custom_scale(impl, device, H, D, dtype, causal, scale):
    check_attention(impl, device, 1, H, 40, D, dtype, causal, scale=scale)


def test_attention_contiguous_inputs_and_output_layout(impl, backend, device):
    q, k, v = (torch.randn(2, 2, 50, 64).to(device) for _ in range(3))
    o = impl(q, k, v)
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-6, rtol=1e-5)
    if backend != "torch":  # our kernels store (B, T, H, D): the model's transpose back is free
        assert o.transpose(1, 2).is_contiguous()


@pytest.mark.backends("triton", "ext")
def test_attention_torch_compile_fullgraph_matches_eager(impl, device):
    qkv = torch.randn(2, 17, 3, 2, 32).to(device)
    q, k, v = (qkv[:, :, i].transpose(1, 2).requires_grad_() for i in range(3))  # strided views, as in the model
    check_compiled(lambda q, k, v: impl(q, k, v, causal=True), q, k, v)


@pytest.mark.backends("triton", "ext")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,D,causal", DROPOUT_CASES)
def test_attention_dropout_matches_triton_mask_float64(impl, backend, device, T, D, causal, dtype):
    skip_unsupported(backend, D, dtype, dropout=True)
    check_attention(impl, device, 2, 2, T, D, dtype, causal, dropout_p=0.3)


@pytest.mark.backends("triton", "ext")
def test_attention_dropout_reproducible_and_rejects_bad_p(impl, device):
    q, k, v = (torch.randn(1, 2, 16, 32).to(device) for _ in range(3))
    torch.manual_seed(5)
    a = impl(q, k, v, dropout_p=0.5)
    torch.manual_seed(5)
    assert torch.equal(a, impl(q, k, v, dropout_p=0.5))
    assert not torch.equal(a, impl(q, k, v, dropout_p=0.5))
    for p in (1.0, -0.1):
        with pytest.raises(ValueError, match="dropout_p"):
            impl(q, k, v, dropout_p=p)


@pytest.mark.backends("triton")
def test_attention_dropout_mask_statistics(backend, device):
    dropout_mask = triton_attention().dropout_mask
    B, H, T, p = 2, 3, 129, 0.25
    seeds = [torch.randint(2**31 - 1, (), device=device) for _ in range(2)]
    m = dropout_mask(B, H, T, seeds[0], p)
    kept = m != 0
    assert torch.isfinite(m).all() and torch.all(m[kept] == 1 / (1 - p))
    assert abs(kept.float().mean().item() - (1 - p)) < 0.01
    for i in range(B * H):  # heads draw different masks
        for j in range(i):
            assert not torch.equal(kept.flatten(0, 1)[i], kept.flatten(0, 1)[j])
    assert torch.equal(m, dropout_mask(B, H, T, seeds[0], p))  # a seed gives one mask
    assert not torch.equal(m, dropout_mask(B, H, T, seeds[1], p))


@pytest.mark.backends("triton")
def test_attention_triton_rejects_head_dim(impl, device):
    q = torch.randn(1, 1, 8, 48).to(device)
    with pytest.raises(ValueError, match="head dim 48"):
        impl(q, q, q)


@pytest.mark.backends("ext")
@pytest.mark.cpu_only("CPU threading")
def test_attention_ext_does_not_depend_on_thread_count(impl, same_at_thread_counts):
    same_at_thread_counts(impl, *(torch.randn(3, 4, 70, 32) for _ in range(3)), grad_out=torch.randn(3, 4, 70, 32))


@pytest.mark.backends("ext")
def test_attention_ext_other_dtypes_fall_back_to_sdpa_with_one_warning(impl, device):
    contract._announced.clear()
    q, k, v = (torch.randn(1, 2, 16, 32, dtype=torch.float16) for _ in range(3))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        a = impl(q, k, v)
        impl(q, k, v)
    assert torch.equal(a, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert sum("float16" in str(w.message) for w in rec) == 1


@pytest.mark.backends("ext")
def test_attention_ext_bad_inputs_raise_clear_errors(backend, device):
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
    o, lse = E.attention_fwd(q, q, q, True, 0.25, 0.0, None)
    with pytest.raises(RuntimeError, match="lse must be"):
        E.attention_bwd(o, q, q, q, o, lse[0], True, 0.25, 0.0, None)


# ---------------------------------------------------------------- the extension's CPU kernel, every ISA clone

def _attention(q, k, v, causal, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.ops.nanogpt_ext.attention(q, k, v, causal, scale, 0.0, None)


@pytest.mark.cpu_only("the ISA clones are the CPU kernels'")
@pytest.mark.parametrize("dtype", ISA_DTYPES)
@pytest.mark.parametrize("B,H,T,D,causal", [(1, 2, 17, 20, True), (2, 1, 33, 48, False), (1, 1, 1, 32, True)])
def test_ext_attention_every_cpu_isa(isa, dtype, B, H, T, D, causal):
    check_attention(_attention, "cpu", B, H, T, D, dtype, causal)


# ---------------------------------------------------------------- attention over c_attn's packed output

@pytest.mark.cpu_only("the packed op is the extension's CPU kernel")
@pytest.mark.parametrize("dtype", ISA_DTYPES)
@pytest.mark.parametrize("B,T,H,D,dropout_p", [(2, 37, 3, 20, 0.0), (1, 64, 4, 32, 0.2), (2, 1, 2, 16, 0.0),
                                               (1, 70, 2, 48, 0.1)])
def test_ext_attention_packed_equals_the_split_heads_every_cpu_isa(isa, dtype, B, T, H, D, dropout_p):
    """ext's packed form (registry.attention_qkv): bit for bit the output and the qkv gradient of split -> attention
    -> merge on the same kernel (which test_ext_attention_every_cpu_isa checks against float64), dropout's mask
    included; with a strided qkv and gradient, and without a graph."""
    from nanogpt_kernels import ext, registry
    C = H * D
    x = torch.randn(T, B, 3 * C, dtype=dtype).transpose(0, 1)  # (B, T, 3C), not contiguous
    g = torch.randn(T, B, C, dtype=dtype).transpose(0, 1)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(3)
    y = registry.attention_qkv(ext.attention, a, H, dropout_p)
    torch.manual_seed(3)
    ref = registry.split_attention(ext.attention, b, H, dropout_p)
    y.backward(g)
    ref.backward(g)
    assert y.shape == (B, T, C) and y.is_contiguous()
    assert torch.equal(y, ref) and torch.equal(a.grad, b.grad)
    with torch.no_grad():
        torch.manual_seed(3)
        assert torch.equal(registry.attention_qkv(ext.attention, x, H, dropout_p), ref)


@pytest.mark.cpu_only("the packed op is the extension's CPU kernel")
def test_ext_attention_packed_compiles_and_rejects_bad_shapes():
    from nanogpt_kernels import ext
    qkv = torch.randn(2, 9, 3 * 24)
    f = torch.compile(lambda t: ext.attention_packed(t, 3).square().sum(), fullgraph=True)
    a, b = qkv.clone().requires_grad_(), qkv.clone().requires_grad_()
    f(a).backward()
    ext.attention_packed(b, 3).square().sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"qkv must be \(B, T, 3 \* C\) with C a multiple of n_head = 3"):
        torch.ops.nanogpt_ext.attention_qkv(torch.randn(2, 3, 10), 3, True, 1.0, 0.0, None)
    with pytest.raises(RuntimeError, match=r"the grad of out has shape \[2, 9, 23\], expected \(B, T, C\)"):
        torch.ops.nanogpt_ext.attention_qkv_bwd(torch.randn(2, 9, 23), qkv, torch.randn(2, 3, 9, 8),
                                                torch.randn(2, 3, 9), 3, True, 1.0, 0.0, None)


def test_attention_qkv_without_a_packed_form_splits():
    """A backend's attention without `packed` (here torch's) runs on the split heads."""
    from nanogpt_kernels import registry
    qkv = torch.randn(2, 11, 3 * 12, dtype=torch.float64)
    q, k, v = (t.view(2, 11, 2, 6).transpose(1, 2) for t in qkv.split(12, dim=2))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 11, 12)
    torch.testing.assert_close(registry.attention_qkv(registry.attention, qkv, 2), ref, rtol=0, atol=0)
