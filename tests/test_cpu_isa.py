"""The extension's CPU kernels on every ISA clone this CPU runs, and how a clone is chosen.

Each clone (csrc/cpu/isa_clones.h: x86-64-v4, x86-64-v3, the baseline) is its own compilation of the
kernels, so each is forced in turn (set_cpu_isa) and every kernel checked against float64 within the
contract's budget (2x PyTorch's own same-dtype error plus a unit roundoff), fp32 and bf16, fresh
random inputs, odd shapes, NaN-poisoned outputs (tests/conftest.py). NANOGPT_CPU_ISA is read at import,
so it is checked in a subprocess.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from budget import assert_within_budget, check_op
from test_attention import check_attention

from nanogpt_kernels import ext

C = ext._C  # None when the extension is not built: every test here then fails, saying why


@pytest.fixture(autouse=True)
def _built():
    if C is None:
        pytest.fail(f"the CPU kernels' tests need the extension: {ext.unavailable('cpu')}")
ISAS = C.cpu_isas() if C else []
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(params=ISAS)
def isa(request):
    before = C.cpu_isa()
    C.set_cpu_isa(request.param)
    assert C.cpu_isa() == request.param
    yield request.param
    C.set_cpu_isa(before)


def _randn(*shape, dtype, scale=1.0, grad=True):
    return (torch.randn(*shape) * scale).to(dtype).requires_grad_(grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm(isa, dtype):
    x, w, b = _randn(3, 37, 1023, dtype=dtype, scale=2.0), _randn(1023, dtype=dtype), _randn(1023, dtype=dtype)
    check_op(f"layer_norm {isa}", lambda x, w, b: torch.ops.nanogpt_ext.layer_norm(x, w, b, 1e-5),
             lambda x, w, b: F.layer_norm(x, (1023,), w, b, 1e-5), {"x": x, "weight": w, "bias": b},
             _randn(3, 37, 1023, dtype=dtype, grad=False))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tanh", [False, True])
def test_bias_gelu(isa, dtype, tanh):
    x, b = _randn(37, 1023, dtype=dtype, scale=3.0), _randn(1023, dtype=dtype)
    approx = "tanh" if tanh else "none"
    check_op(f"bias_gelu {approx} {isa}", lambda x, b: torch.ops.nanogpt_ext.bias_gelu(x, b, tanh),
             lambda x, b: F.gelu(x + b, approximate=approx), {"x": x, "bias": b},
             _randn(37, 1023, dtype=dtype, grad=False))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight", [True, False], ids=["weight", "noweight"])
def test_rms_norm(isa, dtype, weight):
    x, w = _randn(3, 37, 1023, dtype=dtype, scale=2.0), _randn(1023, dtype=dtype) if weight else None
    check_op(f"rms_norm {isa}", lambda x, w: torch.ops.nanogpt_ext.rms_norm(x, w, 1e-6),
             lambda x, w: F.rms_norm(x, (1023,), w, 1e-6), {"x": x, "weight": w},
             _randn(3, 37, 1023, dtype=dtype, grad=False))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_relu2(isa, dtype):
    x, b = _randn(37, 1023, dtype=dtype, scale=3.0), _randn(1023, dtype=dtype)
    check_op(f"bias_relu2 {isa}", torch.ops.nanogpt_ext.bias_relu2, lambda x, b: F.relu(x + b).square(),
             {"x": x, "bias": b}, _randn(37, 1023, dtype=dtype, grad=False))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope(isa, dtype):
    from test_rope import cos_sin, flat, qk

    from nanogpt_kernels.registry import rope
    q, k = qk(2, 3, 1, 17, 30, dtype, "cpu")  # (B, H, T, D) views of (B, T, H, D) buffers, odd T, D/2 = 15
    cos, sin = cos_sin(17, 30, dtype=torch.float32)
    check_op(f"rope {isa}", flat(torch.ops.nanogpt_ext.rope), flat(rope), {"q": q, "k": k, "cos": cos, "sin": sin},
             _randn(q.numel() + k.numel(), dtype=dtype, grad=False))


def _attention(q, k, v, causal, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.ops.nanogpt_ext.attention(q, k, v, causal, scale, 0.0, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,T,D,causal", [(1, 2, 17, 20, True), (2, 1, 33, 48, False), (1, 1, 1, 32, True)])
def test_attention(isa, dtype, B, H, T, D, causal):
    check_attention(_attention, "cpu", B, H, T, D, dtype, causal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_norm_and_adamw_step(isa, dtype):
    """One clipped step: grad_norm and the updated params against a float64 step of the same formula
    (csrc/adamw.cpp), within 2x the error of clip_grad_norm_ + torch.optim.AdamW in `dtype`."""
    lr, betas, eps, wd, max_norm = 1e-2, (0.9, 0.95), 1e-8, 0.1, 1.0
    params = [torch.randn(s).to(dtype) for s in ((7,), (33, 5), (1000,))]
    grads = [torch.randn(p.shape).to(dtype) for p in params]

    norm = torch.ops.nanogpt_ext.grad_norm(grads)
    ours = [p.clone() for p in params]
    state = [torch.zeros(p.shape) for p in params], [torch.zeros(p.shape) for p in params]
    torch.ops.nanogpt_ext.adamw_(ours, grads, *state, [torch.zeros(()) for _ in params], torch.tensor(lr),
                                 norm, *betas, eps, wd, max_norm)

    norm64 = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]))
    clip = min(1.0, max_norm / (norm64.item() + 1e-6))
    ref = []
    for p, g in zip(params, grads):  # step 1 from zero state: m = (1-b1) g, v = (1-b2) g^2
        g = g.double() * clip
        m, v = (1 - betas[0]) * g, (1 - betas[1]) * g * g
        denom = (v / (1 - betas[1])).sqrt() + eps
        ref.append(p.double() * (1 - lr * wd) - lr / (1 - betas[0]) * m / denom)

    theirs = [p.clone().requires_grad_() for p in params]
    for t, g in zip(theirs, grads):
        t.grad = g.clone()
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    torch.optim.AdamW(theirs, lr=lr, betas=betas, eps=eps, weight_decay=wd).step()

    assert_within_budget(f"grad_norm {isa}", norm, torch_norm.float(), norm64, torch.float32)
    for i, (o, t, r) in enumerate(zip(ours, theirs, ref)):
        assert_within_budget(f"adamw_ param {i} {isa}", o, t.detach(), r, dtype)


def test_set_cpu_isa_rejects_unknown_and_unrunnable_clones():
    before = C.cpu_isa()
    with pytest.raises(ValueError, match=r"set_cpu_isa\('avx9000'\): unknown CPU kernel clone") as e:
        C.set_cpu_isa("avx9000")
    assert "\n" not in str(e.value) and ", ".join(ISAS) in str(e.value)
    for name in {"x86-64-v4", "x86-64-v3"} - set(ISAS):  # a clone this CPU (or build) cannot run
        with pytest.raises(ValueError, match="cannot run the " + name):
            C.set_cpu_isa(name)
    assert C.cpu_isa() == before


def _import_with(env_value):
    code = "import torch, nanogpt_kernels._C as C; print(C.cpu_isa())"  # torch first: it loads libc10
    env = dict(os.environ, NANOGPT_CPU_ISA=env_value)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_env_var_forces_a_clone_and_a_bad_one_fails_the_import():
    r = _import_with(ISAS[-1])
    assert r.returncode == 0 and r.stdout.strip() == ISAS[-1], r.stderr[-2000:]
    r = _import_with("bogus")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: NANOGPT_CPU_ISA=bogus: unknown CPU kernel clone"), r.stderr[-2000:]
    assert ", ".join(ISAS) in last and "Unset NANOGPT_CPU_ISA" in last
