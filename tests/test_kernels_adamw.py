"""Triton multi-tensor FusedAdamW vs torch clip_grad_norm_ + torch.optim.AdamW.

Runs on the test device (NANOGPT_TEST_DEVICE): CPU through Triton's interpreter (tests/conftest.py turns it
on), or the compiled kernels on CUDA (device pointer tables, pinned-memory table uploads).
"""
import copy

import pytest
import torch

import kernels
from kernels._testing import cpu_only


pytestmark = pytest.mark.usefixtures("triton_kernels")  # tests/conftest.py


SHAPES = [(64, 33), (70000,), (7,), (3, 5, 2), (1,)]  # (70000,) spans two chunks


def _params(device, dtype=torch.float32):
    return [torch.randn(s).to(device, dtype).requires_grad_() for s in SHAPES]


def _groups(ps):
    # like GPT.configure_optimizers: a decay group and a no-decay group
    return [{"params": [ps[0], ps[1]], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]


def _set_grads(ps, grads):
    for p, g in zip(ps, grads):  # grads made on CPU (same random numbers on every device)
        p.grad = g.to(p.device, p.dtype, copy=True)


@pytest.mark.parametrize("max_norm,steps", [(1.0, 100), (0.0, 30)])
def test_fused_adamw_matches_torch_for_100_steps(device, max_norm, steps):
    ours = _params(device)
    ref = [p.detach().clone().requires_grad_() for p in ours]
    kw = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = kernels.FusedAdamW(_groups(ours), max_grad_norm=max_norm, **kw)
    ropt = torch.optim.AdamW(_groups(ref), **kw)
    clipped = 0
    for step in range(steps):
        # norms around the clip threshold: some steps clip, some don't
        grads = [torch.randn(s) * (0.002 if step % 3 else 0.01) for s in SHAPES]
        _set_grads(ours, grads)
        _set_grads(ref, grads)
        if step == steps // 2:  # lr schedule: the per-tensor hyperparameter table must follow
            for g in opt.param_groups + ropt.param_groups:
                g["lr"] = 5e-4
        norm = opt.step()
        rnorm = torch.nn.utils.get_total_norm([p.grad for p in ref])
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(ref, max_norm)
            clipped += bool(rnorm > max_norm)
        ropt.step()
        assert norm.dim() == 0 and norm.dtype == torch.float32 and norm.device == rnorm.device
        torch.testing.assert_close(norm, rnorm, rtol=1e-5, atol=0)
    for p, r in zip(ours, ref):
        assert (p - r).abs().max().item() <= 1e-6
        st, rst = opt.state[p], ropt.state[r]
        assert st["exp_avg"].dtype == torch.float32
        assert (st["exp_avg"] - rst["exp_avg"]).abs().max().item() <= 1e-6
        assert (st["exp_avg_sq"] - rst["exp_avg_sq"]).abs().max().item() <= 1e-7
        assert float(st["step"]) == steps
    if max_norm > 0:
        assert 0 < clipped < steps


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_grad_skips_the_step(device, bad):
    ps = _params(device)
    opt = kernels.FusedAdamW(_groups(ps), lr=1e-2, max_grad_norm=1.0)
    _set_grads(ps, [torch.randn(s) for s in SHAPES])
    opt.step()
    before = [p.detach().clone() for p in ps]
    state = copy.deepcopy({i: opt.state[p] for i, p in enumerate(ps)})
    grads = [torch.randn(s) for s in SHAPES]
    grads[1][123] = bad
    _set_grads(ps, grads)
    norm = opt.step()
    assert not torch.isfinite(norm)
    for i, p in enumerate(ps):
        assert torch.equal(p, before[i])
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][k], state[i][k])
    _set_grads(ps, [torch.randn(s) for s in SHAPES])  # and it recovers
    assert torch.isfinite(opt.step())
    assert float(opt.state[ps[0]]["step"]) == 2


def test_state_dict_round_trip_resumes_exactly(device):
    torch.manual_seed(1)
    grads = [[torch.randn(s) * 0.1 for s in SHAPES] for _ in range(10)]
    a = _params(device)
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_a = kernels.FusedAdamW(_groups(a), lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    for g in grads:
        _set_grads(a, g)
        opt_a.step()
    opt_b = kernels.FusedAdamW(_groups(b), lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    for g in grads[:5]:
        _set_grads(b, g)
        opt_b.step()
    sd = copy.deepcopy(opt_b.state_dict())
    b2 = [p.detach().clone().requires_grad_() for p in b]
    opt_b2 = kernels.FusedAdamW(_groups(b2), lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    opt_b2.load_state_dict(sd)
    for g in grads[5:]:
        _set_grads(b2, g)
        opt_b2.step()
    for p, q in zip(a, b2):
        assert torch.equal(p, q)
    assert opt_b2.state_dict()["param_groups"] == opt_a.state_dict()["param_groups"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_params_keep_fp32_state(device, dtype):
    ps = _params(device, dtype)
    master = [p.detach().float().requires_grad_() for p in ps]
    opt = kernels.FusedAdamW(_groups(ps), lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    ropt = torch.optim.AdamW(_groups(master), lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        grads = [torch.randn(s).to(dtype) for s in SHAPES]
        _set_grads(ps, grads)
        _set_grads(master, [g.float() for g in grads])
        opt.step()
        torch.nn.utils.clip_grad_norm_(master, 1.0)
        ropt.step()
        # the fp32 reference rounded to the low-precision dtype: one rounding per step apart at most
        for p, m in zip(ps, master):
            m.data.copy_(m.data.to(dtype).float())
    for p, m in zip(ps, master):
        assert p.dtype == dtype
        assert opt.state[p]["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(p.float(), m.detach(), atol=2e-2, rtol=2e-2)
    sd = copy.deepcopy(opt.state_dict())
    opt2 = kernels.FusedAdamW(_groups([p.detach().clone().requires_grad_() for p in ps]), lr=1e-2)
    opt2.load_state_dict(sd)
    for st in opt2.state.values():
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32


def test_params_without_grad_are_left_alone_and_norm_of_nothing_is_zero(device):
    ps = _params(device)
    opt = kernels.FusedAdamW(_groups(ps), lr=1e-2)
    assert float(opt.step()) == 0.0
    before = ps[0].detach().clone()
    ps[1].grad = torch.randn(SHAPES[1]).to(device)
    opt.step()
    assert torch.equal(ps[0], before) and ps[0] not in opt.state


def test_gpu_block_size_matches_interpreter_block(device, monkeypatch):
    """The interpreter runs a whole chunk per block; the GPU BLOCK loops inside a chunk: same result."""
    import sys

    cpu_only(device, "compares the interpreter's whole-chunk block with the GPU BLOCK; a compiled kernel "
                     "with a whole-chunk block would only stress the GPU compiler")
    mod = sys.modules["kernels.adamw"]
    shapes = [(3000,), (17, 3)]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    results = []
    for interp in (True, False):
        monkeypatch.setattr(mod, "interpreting", lambda interp=interp: interp)
        torch.manual_seed(3)
        ps = [torch.randn(s).to(device).requires_grad_() for s in shapes]
        opt = kernels.FusedAdamW([{"params": ps, "weight_decay": 0.1}], lr=1e-2, max_grad_norm=1.0)
        for g in grads:
            _set_grads(ps, g)
            opt.step()
        results.append([p.detach().clone() for p in ps])
    for a, b in zip(*results):  # the grad norm's summation order differs: equal up to rounding
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
