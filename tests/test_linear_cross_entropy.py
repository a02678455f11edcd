"""Fused linear + cross-entropy on every backend vs a float64 reference (the unfused F.cross_entropy of
F.linear), the selector's `linear_cross_entropy:none`, and the GPT trained with and without the fused loss.

The Triton backend runs through Triton's interpreter on CPU (tests/conftest.py turns it on).
"""
import pytest
import torch
import torch.nn.functional as F

from nanogpt.model import GPT, GPTConfig
from nanogpt_kernels import registry
from budget import assert_within_budget as assert_close_to_ref

OP = "linear_cross_entropy"
# odd sizes: 77 rows are chunks of 32, 32 and 13 (registry.lce_chunk_rows), V fits no power of 2
N, C, V = 77, 19, 101
# (softcap, reduction, bias): each feature on and off at least once
CASES = [(None, "mean", False), (30.0, "mean", True), (None, "sum", True), (5.0, "sum", False)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(device, ignore_every=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=gen, dtype=torch.float64)
    w = torch.randn(V, C, generator=gen, dtype=torch.float64) * 0.5
    b = torch.randn(V, generator=gen, dtype=torch.float64)
    t = torch.randint(V, (N,), generator=gen)
    if ignore_every:
        t[::ignore_every] = -1
    return x.to(device), w.to(device), b.to(device), t.to(device)


def unfused(x, w, t, b=None, ignore_index=-1, reduction="mean", softcap=None):
    logits = F.linear(x, w, b)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, t, ignore_index=ignore_index, reduction=reduction)


def _loss_and_grads(fn, tensors, dtype, t, **kw):
    leaves = [a.detach().to(dtype).requires_grad_() for a in tensors]
    loss = fn(*leaves[:2], t, *leaves[2:], **kw)
    loss.backward()
    return [loss] + [a.grad for a in leaves]


def _check(impl, device, dtype, softcap, reduction, bias):
    x, w, b, t = _inputs(device)
    tensors = (x, w, b) if bias else (x, w)
    kw = dict(reduction=reduction, softcap=softcap)
    ref64 = _loss_and_grads(unfused, tensors, torch.float64, t, **kw)
    theirs = _loss_and_grads(unfused, tensors, dtype, t, **kw)
    ours = _loss_and_grads(impl, tensors, dtype, t, **kw)
    assert ours[0].dtype == torch.float32 and ours[0].shape == ()
    for name, o, th, r in zip(("loss", "dx", "dweight", "dbias"), ours, theirs, ref64):
        assert o.dtype == (torch.float32 if name == "loss" else dtype)
        assert_close_to_ref(f"{name} softcap={softcap} {reduction}", o, th, r, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softcap,reduction,bias", CASES)
def test_matches_float64(impl, device, dtype, softcap, reduction, bias):
    _check(impl, device, dtype, softcap, reduction, bias)


@pytest.mark.backends("ext")
@pytest.mark.cpu_only("the ISA clones are the CPU kernels'")
def test_every_isa_clone(impl, device):
    from nanogpt_kernels.ext import _C
    saved = _C.cpu_isa()
    try:
        for isa in _C.cpu_isas():
            _C.set_cpu_isa(isa)
            for dtype in (torch.float32, torch.bfloat16):
                _check(impl, device, dtype, 30.0, "mean", True)
    finally:
        _C.set_cpu_isa(saved)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_rows_ignored(impl, device, reduction):
    x, w, b, t = _inputs(device)
    t[:] = -1
    ours = _loss_and_grads(impl, (x, w, b), torch.float32, t, reduction=reduction)
    theirs = _loss_and_grads(unfused, (x, w, b), torch.float32, t, reduction=reduction)
    torch.testing.assert_close(ours[0], theirs[0], equal_nan=True)  # mean: nan (0/0); sum: 0
    for g in ours[1:]:
        assert torch.equal(g, torch.zeros_like(g))


def test_no_grad_and_leading_dims(impl, device):
    x, w, b, t = _inputs(device)
    with torch.no_grad():
        loss = impl(x.float().view(7, 11, C), w.float(), t.view(7, 11), b.float(), reduction="sum")
    torch.testing.assert_close(loss, unfused(x, w, t, b, reduction="sum").float())


def test_second_backward_accumulates_or_raises(impl, device):
    """ext scales its saved gradient in place in the backward (no copy as large as the weight): a second backward
    through the graph must raise, never scale it twice; the other backends accumulate it twice."""
    x, w, b, t = (a.float() if a.is_floating_point() else a for a in _inputs(device))
    w.requires_grad_()
    loss = impl(x, w, t, b) * 0.5
    loss.backward(retain_graph=True)
    once = w.grad.clone()
    try:
        loss.backward()
    except RuntimeError as e:
        assert "modified by an inplace operation" in str(e)
        torch.testing.assert_close(w.grad, once, rtol=0, atol=0)
    else:
        torch.testing.assert_close(w.grad, 2 * once)
    torch.testing.assert_close(once, torch.func.grad(lambda w: unfused(x, w, t, b) * 0.5)(w.detach()))


def test_rejects_bad_arguments(impl, device):
    x, w, b, t = _inputs(device)
    with pytest.raises(ValueError, match="reduction"):
        impl(x, w, t, reduction="none")
    with pytest.raises(ValueError, match="do not fit"):
        impl(x, w[:, :-1], t)


def test_torch_compile_fullgraph(impl, device):
    x, w, b, t = (a.float() if a.is_floating_point() else a for a in _inputs(device))
    fn = torch.compile(lambda x, w, b: impl(x, w, t, b, softcap=30.0), fullgraph=True, backend="aot_eager")
    ours = _loss_and_grads(lambda x, w, t, b, **_: fn(x, w, b), (x, w, b), torch.float32, t)
    eager = _loss_and_grads(impl, (x, w, b), torch.float32, t, softcap=30.0)
    for o, e in zip(ours, eager):
        torch.testing.assert_close(o, e)


def test_opcheck(backend, device):
    x, w, b, t = _inputs(device)
    x, w, b, t = x[:40].float(), w.float(), b.float(), t[:40]  # two chunks: opcheck runs the op many times
    if backend == "ext":  # the public op (C++ autograd) and the forward under it, which has none
        ops = torch.ops.nanogpt_ext
        torch.library.opcheck(ops.linear_cross_entropy_fwd, (x, w, t, b, -1, "mean", 30.0, 32, True))
        op, args = ops.linear_cross_entropy, (x.requires_grad_(), w.requires_grad_(), t, b, -1, "mean", 30.0, 32)
    else:
        x, w, b = (a.requires_grad_() for a in (x, w, b))
        op = registry.get(OP, backend).op
        args = registry.lce_args(x, w, t, b, -1, "mean", 30.0)
    torch.library.opcheck(op, args)


def test_selector_none():
    assert registry.resolve("linear_cross_entropy:none", "cpu")[OP] == "none"
    assert registry.get(OP, "none") is None
    with pytest.raises(registry.KernelError, match="unknown backend 'none' for attention"):
        registry.parse("none")
    with pytest.raises(registry.KernelError):
        registry.parse("layer_norm:none")


TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65, dropout=0.0, bias=True)


def _char_batches(steps, batch=8, block=32):
    from importlib.resources import files
    text = files("nanogpt").joinpath("assets/tinyshakespeare.txt").read_text()[:50000]
    stoi = {ch: i for i, ch in enumerate(sorted(set(text)))}
    data = torch.tensor([stoi[c] for c in text])
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ix = torch.randint(len(data) - block - 1, (batch,), generator=gen)
        yield torch.stack([data[i:i + block] for i in ix]), torch.stack([data[i + 1:i + block + 1] for i in ix])


def _train(kernels, steps=50):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, kernels=kernels), device_type="cpu")
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), grad_clip=1.0)
    losses = []
    for X, Y in _char_batches(steps):
        logits, loss = model(X, Y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return logits, losses, model


@pytest.mark.backends("torch", "ext")
def test_char_model_trains_the_same_with_the_fused_loss(backend):
    others = "attention:torch,layer_norm:torch,bias_gelu:torch,adamw:torch"
    fused_logits, fused, model = _train(f"{others},{OP}:{backend}")
    logits, unfused_losses, _ = _train(f"{others},{OP}:none")
    assert fused_logits is None and logits is not None
    assert max(abs(a - b) for a, b in zip(fused, unfused_losses)) < 1e-4
    assert fused[-1] < fused[0] - 0.5
    idx = torch.zeros((1, 1), dtype=torch.long)  # inference is unchanged: the last position's logits
    assert model(idx)[0].shape == (1, 1, TINY["vocab_size"])
