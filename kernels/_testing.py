"""Helpers for the kernel tests: error budgets against a float64 reference (tensors on any device)."""
import contextlib
import math

import torch
import torch.nn.functional as F

# absolute floors per dtype, added to the "2x PyTorch's own error" budget
ABS_FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def max_err(out, ref64):
    """max |out - ref| in float64; NaN (e.g. an unwritten poisoned element) propagates."""
    d = (out.detach().double().cpu() - ref64.detach().double().cpu()).abs()  # either may be on the GPU
    if torch.isnan(d).any():
        return float("nan")
    return d.max().item() if d.numel() else 0.0


def budget(torch_out, ref64, dtype, scale_hint=0.0):
    """2x PyTorch's same-dtype error vs float64, plus a floor of one unit roundoff at the output's scale.

    scale_hint: magnitude of intermediate terms that cancel in the result (e.g. dp - delta in attention's
    backward), for outputs whose exact value can be ~0 while their rounding error cannot.
    """
    eps = torch.finfo(dtype).eps
    scale = max(ref64.detach().abs().max().item() if ref64.numel() else 0.0, scale_hint)
    return 2.0 * max_err(torch_out, ref64) + max(ABS_FLOOR[dtype], eps * scale)


def assert_close_to_ref(name, out, torch_out, ref64, dtype, scale_hint=0.0):
    err, tol = max_err(out, ref64), budget(torch_out, ref64, dtype, scale_hint)
    assert err == err and err <= tol, f"{name}: error {err:.3g} vs float64 exceeds budget {tol:.3g} " \
                                      f"(torch {max_err(torch_out, ref64):.3g}, dtype {dtype})"


@contextlib.contextmanager
def kernel_test_setup(device):
    """Around each Triton kernel test (tests/conftest.py's `triton_kernels` fixture).

    Fails the test when the Triton kernels cannot run on the test device (e.g. triton was imported before
    tests/conftest.py set TRITON_INTERPRET=1 on CPU, or TRITON_INTERPRET=1 leaked into a CUDA run), and pins
    fp32 matmuls to full precision for the test: an earlier test in the same session may have turned TF32 on
    process-wide (benchmarks/bench.py's run() and nanogpt.train do), which would make the fp32 matmuls of the
    references on CUDA noisier than the tolerances assume.
    """
    import pytest

    import kernels

    reason = kernels.unavailable(torch.device(device).type)
    if reason:
        pytest.fail(f"the Triton kernels cannot run on {device}: {reason}")
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def cpu_only(device, why):
    """Skip the calling test off CPU: `why` says what it checks that only the interpreter needs."""
    import pytest

    if torch.device(device).type != "cpu":
        pytest.skip(f"CPU (Triton interpreter) only: {why}")


def attention_qkv(device, B, H, T, D, dtype):
    """q, k, v as the model makes them: (B, H, T, D) transposed views of one (B, T, 3, H, D) buffer."""
    qkv = torch.randn(B, T, 3, H, D).to(device, dtype)
    return [qkv[:, :, i].transpose(1, 2).detach().requires_grad_() for i in range(3)]


def check_attention(attention, device, B, H, T, D, dtype, causal, scale=None, dropout=None):
    """attention(q, k, v, causal=, scale=): output, dq, dk, dv against float64 SDPA, within 2x the error of
    torch's own SDPA in `dtype`, on fresh random model-layout inputs.

    dropout=(p, mask_fn): attention is called with dropout_p=p after torch.manual_seed(SEED), and mask_fn(seed)
    must give the (B, H, T, T) scaled keep mask the kernels used, where seed is the draw
    torch.randint(2**31 - 1, (), device=device) after the same manual_seed; the references are then
    softmax(q k^T * scale [+ causal mask]) * mask @ v, in float64 and in `dtype`.
    """
    mask = None
    if dropout is not None:
        torch.manual_seed(1234)
        mask = dropout[1](torch.randint(2**31 - 1, (), device=device))

    def sdpa(q, k, v):
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
        if causal:
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        return (torch.softmax(s.float(), -1).to(q.dtype) * mask.to(q.device, q.dtype)) @ v

    q, k, v = attention_qkv(device, B, H, T, D, dtype)
    assert not q.is_contiguous() or T == 1
    do = torch.randn(B, H, T, D).to(device, dtype)
    if dropout is not None:
        torch.manual_seed(1234)
    o = attention(q, k, v, causal=causal, scale=scale, **({"dropout_p": dropout[0]} if dropout else {}))
    o.backward(do)
    ours = [o, q.grad, k.grad, v.grad]

    r64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o64 = sdpa(*r64)
    o64.backward(do.double())
    ref = [o64] + [t.grad for t in r64]

    rt = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ot = sdpa(*rt)
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
