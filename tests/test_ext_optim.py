"""The ext backend's FusedAdamW (one fused grad-norm reduction + one multi-tensor AdamW call
per param group) against torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW."""
import copy
import math

import pytest
import torch

from nanogpt import ext


@pytest.fixture(autouse=True)
def _need_ext(device):
    reason = ext.unavailable(torch.device(device).type)
    if reason:
        pytest.skip(reason)


SHAPES = [(64, 33), (1000,), (7,), (3, 5, 17), (1,)]


def _params(device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device, dtype).requires_grad_() for s in SHAPES]


def _groups(params, wd=(0.1, 0.0)):
    return [{"params": params[:3], "weight_decay": wd[0]}, {"params": params[3:], "weight_decay": wd[1]}]


def _set_grads(params, step, scale):
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(p.device, p.dtype)


@pytest.mark.parametrize("max_norm", [0.0, 1.0])
def test_matches_torch_adamw_100_steps(device, max_norm):
    ours_p, ref_p = _params(device), _params(device)
    ours = ext.FusedAdamW(_groups(ours_p), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                          max_grad_norm=max_norm)
    ref = torch.optim.AdamW(_groups(ref_p), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for step in range(100):
        scale = 0.05 if step % 3 else 2.0  # some steps are clipped, some are not
        _set_grads(ours_p, step, scale)
        _set_grads(ref_p, step, scale)
        if step == 50:  # an LR change (schedulers write group["lr"])
            for gr in ours.param_groups + ref.param_groups:
                gr["lr"] = 1e-3
        norm = ours.step()
        ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref_p])
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(ref_p, max_norm)
        ref.step()
        assert norm.dim() == 0 and norm.dtype == torch.float32
        torch.testing.assert_close(norm.cpu(), ref_norm.cpu(), rtol=2e-6, atol=0)
    for a, b in zip(ours_p, ref_p):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        sa, sb = ours.state[a], ref.state[b]
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=0, atol=1e-6)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        assert float(sa["step"]) == float(sb["step"]) == 100


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_grad_skips_the_step(device, bad):
    params = _params(device)
    opt = ext.FusedAdamW(_groups(params), lr=1e-2, weight_decay=0.1, max_grad_norm=1.0)
    _set_grads(params, 0, 1.0)
    opt.step()
    before_p = [p.detach().clone() for p in params]
    before_s = copy.deepcopy(opt.state_dict()["state"])
    _set_grads(params, 1, 1.0)
    params[3].grad[0] = bad
    norm = opt.step()
    assert not math.isfinite(float(norm))
    for p, q in zip(params, before_p):
        assert torch.equal(p.detach(), q)
    after_s = opt.state_dict()["state"]
    for k in before_s:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(after_s[k][key], before_s[k][key]), key


def test_state_dict_round_trip(device):
    torch.manual_seed(0)
    a_p = _params(device)
    a = ext.FusedAdamW(_groups(a_p), lr=1e-2, betas=(0.8, 0.9), weight_decay=0.1, max_grad_norm=1.0)
    for step in range(5):
        _set_grads(a_p, step, 1.0)
        a.step()
    b_p = [p.detach().clone().requires_grad_() for p in a_p]
    b = ext.FusedAdamW(_groups(b_p), lr=1.0, weight_decay=0.0, max_grad_norm=1.0)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.param_groups[0]["lr"] == 1e-2 and b.param_groups[0]["betas"] == (0.8, 0.9)
    for step in range(5, 10):
        _set_grads(a_p, step, 1.0)
        _set_grads(b_p, step, 1.0)
        a.step()
        b.step()
    for p, q in zip(a_p, b_p):
        assert torch.equal(p.detach(), q.detach())


def test_bf16_params_keep_fp32_state(device):
    params = _params(device, torch.bfloat16)
    ref_p = [p.detach().float().requires_grad_() for p in params]
    opt = ext.FusedAdamW(_groups(params), lr=1e-2, weight_decay=0.1)
    ref = ext.FusedAdamW(_groups(ref_p), lr=1e-2, weight_decay=0.1)
    for step in range(3):
        _set_grads(params, step, 1.0)
        for p, r in zip(params, ref_p):
            r.grad = p.grad.float()
        opt.step()
        ref.step()
        # same fp32 math, the bf16 param rounded once per step: within a bf16 ulp or two
        for p, r in zip(params, ref_p):
            torch.testing.assert_close(p.float(), r.to(torch.bfloat16).float(), rtol=2e-2, atol=1e-2)
            r.data.copy_(p.float())
    for p in params:
        assert p.dtype == torch.bfloat16
        assert opt.state[p]["exp_avg"].dtype == torch.float32 and opt.state[p]["exp_avg_sq"].dtype == torch.float32
    sd = copy.deepcopy(opt.state_dict())
    opt2 = ext.FusedAdamW(_groups(params), lr=1e-2)
    opt2.load_state_dict(sd)
    for p in params:
        assert opt2.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(opt2.state[p]["exp_avg"], opt.state[p]["exp_avg"])


def test_grad_norm_matches_torch(device):
    params = _params(device)
    _set_grads(params, 0, 3.0)
    big = torch.randn(300_000, device=device)  # several reduction blocks
    grads = [p.grad for p in params] + [big]
    ref = torch.cat([g.detach().double().cpu().flatten() for g in grads]).norm().float()
    torch.testing.assert_close(torch.ops.nanogpt_ext.grad_norm(grads).cpu(), ref, rtol=1e-6, atol=0)


def test_params_without_grad_are_left_alone(device):
    params = _params(device)
    opt = ext.FusedAdamW(_groups(params), lr=1e-2)
    _set_grads(params, 0, 1.0)
    params[1].grad = None
    before = params[1].detach().clone()
    opt.step()
    assert torch.equal(params[1].detach(), before) and params[1] not in opt.state


def test_adamw_op_rejects_mismatched_arguments_with_clear_errors(device):
    """The argument checks the CPU and CUDA adamw_ share (csrc/cpu/adamw.cpp check_adamw_args)."""
    p = torch.randn(10, device=device)
    p0 = p.clone()
    g, m, v = torch.randn_like(p), torch.zeros_like(p), torch.zeros_like(p)
    s = torch.zeros((), device=device)
    lr, norm = torch.tensor(1e-3, dtype=torch.float64), torch.tensor(1.0)
    op = torch.ops.nanogpt_ext.adamw_

    def call(**kw):
        a = dict(params=[p], grads=[g], exp_avgs=[m], exp_avg_sqs=[v], steps=[s])
        a.update(kw)
        op(a["params"], a["grads"], a["exp_avgs"], a["exp_avg_sqs"], a["steps"], lr, norm, 0.9, 0.95, 1e-8, 0.1, 1.0)

    with pytest.raises(RuntimeError, match="same length"):
        call(grads=[])
    with pytest.raises(RuntimeError, match="does not match its param"):
        call(grads=[torch.randn(11, device=device)])
    with pytest.raises(RuntimeError, match="exp_avg/exp_avg_sq 0 must be contiguous float32"):
        call(exp_avgs=[m.double()])
    with pytest.raises(RuntimeError, match="step 0 must be a one-element float32"):
        call(steps=[s.double()])
    assert torch.equal(p, p0) and s.item() == 0  # nothing was touched by the failed calls
