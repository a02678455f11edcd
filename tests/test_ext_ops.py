"""The ext backend's layer_norm and bias_gelu kernels (nanogpt._C) against float64 references.

Forward and every gradient, odd sizes, every dtype the kernels take; our max error must be at
most 2x the error of PyTorch's own same-dtype op against the same float64 reference, plus one
ulp at the output's scale. Outputs are NaN-poisoned before the kernels write them
(NANOGPT_POISON=1), so an element a kernel forgets to write fails the test. Runs on the
device the suite targets (NANOGPT_TEST_DEVICE, CPU by default).
"""
import pytest
import torch
import torch.nn.functional as F

from nanogpt import ext

ROWS = (1, 17, 100)
COLS = (768, 1000, 1023)


@pytest.fixture(autouse=True)
def _poison(monkeypatch, device):
    reason = ext.unavailable(torch.device(device).type)
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("NANOGPT_POISON", "1")


def _dtype_combos(device):
    """(activation dtype, parameter dtype) pairs the kernels take on this device."""
    combos = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
    if device.startswith("cuda"):
        combos += [(torch.float16, torch.float16), (torch.float16, torch.float32)]
    return combos


def _check(name, ours, theirs, ref):
    """ours/theirs: same-dtype results; ref: float64. Our error <= 2x theirs + 1 ulp at ref's scale."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    ours64, theirs64, ref = ours.detach().double().cpu(), theirs.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(ours64).all(), f"{name}: non-finite values (unwritten output?)"
    e_ours = (ours64 - ref).abs().max().item()
    e_theirs = (theirs64 - ref).abs().max().item()
    floor = torch.finfo(ours.dtype).eps * max(1.0, ref.abs().max().item())
    assert e_ours <= 2 * e_theirs + floor, f"{name}: max error {e_ours:.3g} vs PyTorch's {e_theirs:.3g} (floor {floor:.2g})"


def _inputs(m, n, act, par, device, bias, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, n, generator=g, dtype=torch.float64) * 2 + 0.5)
    w = torch.randn(n, generator=g, dtype=torch.float64) * 0.5 + 1
    b = torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    dy = torch.randn(m, n, generator=g, dtype=torch.float64)
    # round to the test dtypes first, so the float64 reference sees exactly the same numbers
    x, dy = x.to(act).double(), dy.to(act).double()
    w = w.to(par).double()
    b = b.to(par).double() if bias else None
    return x, w, b, dy


def _run(fn, x, params, dy, device, dtypes):
    """fn(x, *params) on `device` in the given dtypes; returns output and grads."""
    xs = x.to(device, dtypes[0]).detach().clone().requires_grad_()
    ps = [None if p is None else p.to(device, dtypes[1]).detach().clone().requires_grad_() for p in params]
    y = fn(xs, *ps)
    y.backward(dy.to(device, y.dtype))
    return [y] + [xs.grad] + [None if p is None else p.grad for p in ps]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m,n", [(m, n) for m in ROWS for n in COLS])
def test_layer_norm(m, n, bias, device):
    for i, (act, par) in enumerate(_dtype_combos(device)):
        x, w, b, dy = _inputs(m, n, act, par, device, bias, seed=1000 * m + n + i)
        ref = _run(lambda x_, w_, b_: F.layer_norm(x_, (n,), w_, b_, 1e-5), x, [w, b], dy, "cpu",
                   (torch.float64, torch.float64))
        ours = _run(lambda x_, w_, b_: ext.layer_norm(x_, w_, b_, 1e-5), x, [w, b], dy, device, (act, par))
        theirs = _run(lambda x_, w_, b_: F.layer_norm(x_, (n,), w_, b_, 1e-5), x, [w, b], dy, device, (act, act))
        for name, o, t, r in zip(("y", "dx", "dweight", "dbias"), ours, theirs, ref):
            if r is not None:
                _check(f"layer_norm {name} {m}x{n} {act}/{par} bias={bias}", o, t, r)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("m,n", [(m, n) for m in ROWS for n in COLS])
def test_bias_gelu(m, n, bias, approximate, device):
    for i, (act, par) in enumerate(_dtype_combos(device)):
        x, _, b, dy = _inputs(m, n, act, par, device, bias, seed=7 + 1000 * m + n + i)

        def torch_fn(x_, b_):
            return F.gelu(x_ if b_ is None else x_ + b_, approximate=approximate)

        ref = _run(torch_fn, x, [b], dy, "cpu", (torch.float64, torch.float64))
        ours = _run(lambda x_, b_: ext.bias_gelu(x_, b_, approximate), x, [b], dy, device, (act, par))
        theirs = _run(torch_fn, x, [b], dy, device, (act, act))
        for name, o, t, r in zip(("y", "dx", "dbias"), ours, theirs, ref):
            if r is not None:
                _check(f"bias_gelu({approximate}) {name} {m}x{n} {act}/{par} bias={bias}", o, t, r)


def test_gelu_extreme_values(device):
    """Large |x| (exp clamping, saturation), zeros and tiny values stay accurate and finite."""
    x = torch.tensor([-100.0, -20.0, -9.0, -5.0, -1e-3, -1e-30, 0.0, 1e-30, 1e-3, 5.0, 9.0, 20.0, 100.0, 3e38],
                     dtype=torch.float64)
    for approximate in ("none", "tanh"):
        ref_x = x.clone().requires_grad_()
        ref = F.gelu(ref_x, approximate=approximate)
        ref.backward(torch.ones_like(ref))
        xs = x.float().to(device).requires_grad_()
        y = ext.bias_gelu(xs, None, approximate)
        y.backward(torch.ones_like(y))
        torch.testing.assert_close(y.double().cpu(), ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(xs.grad.double().cpu(), ref_x.grad, rtol=1e-5, atol=1e-6)


def test_layer_norm_batched_shapes_and_noncontiguous(device):
    x = torch.randn(3, 5, 64, device=device).transpose(0, 1)  # non-contiguous input
    w, b = torch.randn(64, device=device), torch.randn(64, device=device)
    torch.testing.assert_close(ext.layer_norm(x, w, b), F.layer_norm(x, (64,), w, b), rtol=1e-5, atol=1e-5)
    assert ext.layer_norm(x, w, b).shape == x.shape


def test_deterministic(device):
    torch.manual_seed(0)
    x = torch.randn(1000, 768, device=device, requires_grad=True)
    w = torch.randn(768, device=device, requires_grad=True)
    b = torch.randn(768, device=device, requires_grad=True)
    dy = torch.randn(1000, 768, device=device)
    grads = []
    for _ in range(2):
        for t in (x, w, b):
            t.grad = None
        ext.layer_norm(x, w, b).backward(dy)
        ext.bias_gelu(x, b).backward(dy)
        grads.append([t.grad.clone() for t in (x, w, b)])
    for g0, g1 in zip(*grads):
        assert torch.equal(g0, g1)


def test_bad_inputs_raise_clear_errors(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.nanogpt_ext.layer_norm_fwd(x, torch.ones(7, device=device), None, 1e-5)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        torch.ops.nanogpt_ext.bias_gelu_fwd(x, torch.ones(7, device=device), False)
    with pytest.raises(RuntimeError, match="unsupported dtypes|dtype"):
        torch.ops.nanogpt_ext.bias_gelu_fwd(x.double(), None, False)


def test_cpu_results_do_not_depend_on_thread_count(device):
    if not device.startswith("cpu"):
        pytest.skip("CPU threading")
    torch.manual_seed(0)
    x = torch.randn(1000, 768)
    w, b = torch.randn(768), torch.randn(768)
    dy = torch.randn(1000, 768)
    E = torch.ops.nanogpt_ext
    before = torch.get_num_threads()
    out = []
    try:
        for n in (1, max(2, before)):
            torch.set_num_threads(n)
            _, mean, rstd = E.layer_norm_fwd(x, w, b, 1e-5)
            out.append(list(E.layer_norm_bwd(dy, x, w, mean, rstd, True)) + list(E.bias_gelu_bwd(dy, x, b, False))
                       + [E.grad_norm([x, dy, w])])
    finally:
        torch.set_num_threads(before)
    for a, c in zip(*out):
        assert torch.equal(a, c)
