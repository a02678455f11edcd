"""rope (rotary embeddings on q and k, Hugging Face's rotate-half convention) on every backend
(tests/conftest.py's `backend`) against float64, forward and the gradients of q and k; the torch reference
against the rotation written from its formula (complex multiplication by e^{i t f}) and against transformers'
apply_rotary_pos_emb.

Runs on the test device (NANOGPT_TEST_DEVICE): Triton on CPU through its interpreter (tests/conftest.py turns it
on), or compiled on CUDA. Outputs are NaN-poisoned before the kernels write them (NANOGPT_POISON=1).
"""
import pytest
import torch

from budget import ISA_DTYPES, check_compiled, check_op, rand_input
from test_layer_norm import skip_unsupported

from nanogpt_kernels import registry

OP = "rope"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (B, H, Hk, T, D): k with q's heads or fewer (GQA), odd T, a D/2 that is no power of 2, T = 1, a wide head
SHAPES = [(2, 3, 3, 17, 64), (1, 4, 2, 9, 30), (2, 2, 1, 1, 128)]


def cos_sin(T, D, theta=10000.0, dtype=torch.float64):
    """(T, D/2) tables: position t, frequency theta^(-2i/D)."""
    freqs = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.outer(torch.arange(T, dtype=torch.float64), freqs)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def qk(B, H, Hk, T, D, dtype, device, transposed=True):
    """q, k as a model makes them: (B, H, T, D) views of (B, T, H, D) buffers (transposed), or contiguous."""
    def one(h):
        t = torch.randn(B, T, h, D) * 2
        t = t.transpose(1, 2) if transposed else t.transpose(1, 2).contiguous()
        return t.to(device, dtype).requires_grad_()
    return one(H), one(Hk)


def flat(fn):
    """rope as one output for check_op: q_rot and k_rot flattened end to end."""
    return lambda q, k, cos, sin: torch.cat([t.flatten() for t in fn(q, k, cos, sin)])


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rope_matches_float64(impl, backend, device, shape, dtype):
    skip_unsupported(backend, device, (dtype, dtype))
    B, H, Hk, T, D = shape
    q, k = qk(*shape, dtype, device, transposed=shape[0] == 2)
    cos, sin = (t.to(device) for t in cos_sin(T, D, dtype=F32))
    n = q.numel() + k.numel()
    check_op(f"rope[{backend}] {shape} {dtype}", flat(impl), flat(registry.rope), dict(q=q, k=k, cos=cos, sin=sin),
             torch.randn(n).to(device, dtype))


def qk_views(B, H, Hk, T, D, dtype, device, layout):
    """q, k as (B, H, T, D) views into larger buffers: "qkv", the model's split of c_attn's (B, T, 3C) output (k
    with q's heads); "offset", one element into a (B, T, H * D + 1) buffer each (no row is 16-byte aligned: the
    CUDA kernel's scalar path)."""
    def leaf(*shape):
        return (torch.randn(*shape) * 2).to(device, dtype).requires_grad_()
    if layout == "qkv":
        q, k, _ = leaf(B, T, 3 * H * D).split(H * D, dim=2)
        return (t.view(B, T, H, D).transpose(1, 2) for t in (q, k))
    return (leaf(B, T, h * D + 1)[..., 1:].view(B, T, h, D).transpose(1, 2) for h in (H, Hk))


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("layout", ["qkv", "offset"])
def test_rope_strided_views_match_float64(impl, backend, device, layout, dtype):
    """Inputs that are views at odd offsets and strides; T = 130 spans several of the CUDA kernel's row tiles."""
    skip_unsupported(backend, device, (dtype, dtype))
    B, H, Hk, T, D = 2, 4, 2, 130, 32
    q, k = qk_views(B, H, Hk, T, D, dtype, device, layout)
    cos, sin = (t.to(device) for t in cos_sin(T, D, dtype=F32))
    check_op(f"rope[{backend}] {layout} {dtype}", flat(impl), flat(registry.rope), dict(q=q, k=k, cos=cos, sin=sin),
             torch.randn(q.numel() + k.numel()).to(device, dtype))


def test_torch_reference_is_the_rotation_formula():
    """z = x1 + i x2 turned by e^{i t f}, in float64 from theta and the positions."""
    B, H, T, D = 2, 3, 11, 16
    x = torch.randn(B, H, T, D, dtype=torch.float64)
    cos, sin = cos_sin(T, D)
    freqs = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    turn = torch.polar(torch.ones(T, D // 2, dtype=torch.float64), torch.outer(torch.arange(T).double(), freqs))
    z = torch.complex(x[..., :D // 2], x[..., D // 2:]) * turn
    want = torch.cat([z.real, z.imag], dim=-1)
    q_rot, k_rot = registry.rope(x, x[:, :1], cos, sin)
    torch.testing.assert_close(q_rot, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k_rot, want[:, :1], rtol=1e-12, atol=1e-12)


def test_rope_matches_transformers_apply_rotary_pos_emb(impl, device):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    B, H, Hk, T, D = 2, 4, 2, 13, 32
    q, k = qk(B, H, Hk, T, D, F32, device)
    cos, sin = (t.to(device) for t in cos_sin(T, D, dtype=F32))
    # transformers takes (B, T, D) tables, the halves repeated
    want_q, want_k = apply_rotary_pos_emb(q, k, torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None])
    got_q, got_k = impl(q, k, cos, sin)
    torch.testing.assert_close(got_q, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_k, want_k, rtol=1e-6, atol=1e-6)


def test_rope_grad_of_one_output(impl, device):
    """Only q_rot used (k_rot's gradient never comes): dq is the inverse rotation of dq_rot, dk is 0."""
    q, k = qk(1, 2, 1, 5, 8, F32, device)
    cos, sin = (t.to(device) for t in cos_sin(5, 8, dtype=F32))
    dy = torch.randn(1, 2, 5, 8).to(device)
    impl(q, k, cos, sin)[0].backward(dy)
    q2 = q.detach().clone().requires_grad_()
    registry.rope(q2, k.detach(), cos, sin)[0].backward(dy)
    torch.testing.assert_close(q.grad, q2.grad, rtol=1e-6, atol=1e-6)
    assert k.grad is None or not k.grad.any()


@pytest.mark.backends("triton", "ext")
def test_rope_torch_compile_fullgraph_matches_eager(impl, device):
    q, k = qk(2, 2, 1, 7, 16, F32, device)
    cos, sin = (t.to(device) for t in cos_sin(7, 16, dtype=F32))
    check_compiled(lambda q, k: torch.cat([t.flatten() for t in impl(q, k, cos, sin)]) * 2, q, k)


@pytest.mark.backends("triton", "ext")
def test_rope_bad_inputs_raise_clear_errors(impl, device):
    q, k = qk(1, 2, 1, 5, 8, F32, device)
    cos, sin = (t.to(device) for t in cos_sin(5, 8, dtype=F32))
    with pytest.raises(ValueError, match=r"must be \(T, D/2\)"):
        impl(q, k, torch.cat([cos, cos], -1), sin)
    with pytest.raises(ValueError, match="even D"):
        impl(q[..., :7], k[..., :7], cos, sin)
    with pytest.raises(ValueError, match="one dtype"):
        impl(q, k.double(), cos, sin)


@pytest.mark.backends("ext")
def test_rope_ext_bad_inputs_raise_clear_errors(backend, device):
    """The C++ checks of nanogpt_ext::rope_fwd (on CPU, or the CUDA glue's on a GPU), past the Python wrapper's."""
    q, k = (t.detach() for t in qk(1, 2, 1, 5, 8, F32, device))
    cos, sin = (t.to(device) for t in cos_sin(5, 8, dtype=F32))
    with pytest.raises(RuntimeError, match=r"must be float32 \(T, D/2\)"):
        torch.ops.nanogpt_ext.rope_fwd(q, k, cos.double(), sin, False)
    with pytest.raises(RuntimeError, match="even D"):
        torch.ops.nanogpt_ext.rope_fwd(q[..., :7], k[..., :7], cos, sin, False)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.nanogpt_ext.rope_fwd(q.double(), k.double(), cos, sin, False)
    if torch.device(device).type == "cuda":
        with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
            torch.ops.nanogpt_ext.rope_fwd(q, k, cos.cpu(), sin, False)


# ---------------------------------------------------------------- the extension's CPU kernel, every ISA clone

@pytest.mark.cpu_only("the ISA clones are the CPU kernels'")
@pytest.mark.parametrize("dtype", ISA_DTYPES)
def test_ext_rope_every_cpu_isa(isa, dtype):
    q, k = qk(2, 3, 1, 17, 30, dtype, "cpu")  # (B, H, T, D) views of (B, T, H, D) buffers, odd T, D/2 = 15
    cos, sin = cos_sin(17, 30, dtype=torch.float32)
    check_op(f"rope {isa}", flat(torch.ops.nanogpt_ext.rope), flat(registry.rope), {"q": q, "k": k, "cos": cos, "sin": sin},
             rand_input(q.numel() + k.numel(), dtype=dtype, grad=False))
