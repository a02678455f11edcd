"""adamw (FusedAdamW: clip + AdamW step, returning the pre-clip grad norm) on every backend (tests/conftest.py's
`backend`) against torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW.

Runs on the test device (NANOGPT_TEST_DEVICE): Triton on CPU through its interpreter (tests/conftest.py turns it
on), or compiled on CUDA (device pointer tables, pinned-memory table uploads).
"""
import copy
import sys

import pytest
import torch

from budget import ISA_DTYPES, assert_drift, assert_within_budget, drift

OP = "adamw"
SHAPES = [(64, 33), (70000,), (7,), (3, 5, 17), (1,)]  # (70000,) spans two of the Triton kernels' chunks


def _params(device, dtype=torch.float32, shapes=SHAPES):
    return [torch.randn(s).to(device, dtype).requires_grad_() for s in shapes]


def _groups(ps, wd=0.1):
    # like GPT.configure_optimizers: a decay group and a no-decay group
    return [{"params": ps[:2], "weight_decay": wd}, {"params": ps[2:], "weight_decay": 0.0}]


def _set_grads(ps, grads):
    for p, g in zip(ps, grads):  # grads made on CPU (same random numbers on every device)
        p.grad = g.to(p.device, p.dtype, copy=True)


def _norm64(ps):
    return torch.linalg.vector_norm(torch.stack([p.grad.double().norm() for p in ps]))


@pytest.mark.parametrize("max_norm,steps", [(1.0, 100), (0.0, 30)])
def test_adamw_matches_torch_adamw(impl, backend, device, max_norm, steps):
    if backend == "triton" and torch.device(device).type == "cpu":
        steps = min(steps, 30)  # the interpreter pays per program: 100 steps take 14 s on a 2-core CPU
    ours = _params(device)
    ref = [p.detach().clone().requires_grad_() for p in ours]
    kw = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = impl(_groups(ours), max_grad_norm=max_norm, **kw)
    ropt = torch.optim.AdamW(_groups(ref), **kw)
    clipped = 0
    peak = {}  # (param index, state name) -> the largest magnitude the reference reached: the drift's scale
    for step in range(steps):
        # norms around the clip threshold: some steps clip, some don't
        grads = [torch.randn(s) * (0.002 if step % 3 else 0.01) for s in SHAPES]
        _set_grads(ours, grads)
        _set_grads(ref, grads)
        if step == steps // 2:  # lr schedule: the per-tensor hyperparameter table must follow
            for g in opt.param_groups + ropt.param_groups:
                g["lr"] = 1e-3
        norm = opt.step()
        rnorm = torch.nn.utils.get_total_norm([p.grad for p in ref])
        assert norm.dim() == 0 and norm.dtype == torch.float32 and norm.device == rnorm.device
        assert_within_budget(f"grad norm, step {step}", norm, rnorm, _norm64(ref), torch.float32)
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(ref, max_norm)
            clipped += bool(rnorm > max_norm)
        ropt.step()
        for i, r in enumerate(ref):
            for name, t in (("param", r), ("exp_avg", ropt.state[r]["exp_avg"]),
                            ("exp_avg_sq", ropt.state[r]["exp_avg_sq"])):
                peak[i, name] = max(peak.get((i, name), 0.0), t.detach().abs().max().item())
    # the same float32 recurrence rounded in another order: apart by at most `drift` after `steps` steps (at the
    # scale the values had on the way: a one-element exp_avg that decays towards 0 at the end carries the
    # differences of its larger past; at its final size alone the test failed on some random draws)
    for i, (p, r) in enumerate(zip(ours, ref)):
        st, rst = opt.state[p], ropt.state[r]
        assert st["exp_avg"].dtype == torch.float32
        for name, a, b in (("param", p, r), ("exp_avg", st["exp_avg"], rst["exp_avg"]),
                           ("exp_avg_sq", st["exp_avg_sq"], rst["exp_avg_sq"])):
            assert_drift(f"{name} {tuple(p.shape)}", a, b, steps, scale=peak[i, name])
        assert float(st["step"]) == steps
    if max_norm > 0:
        assert 0 < clipped < steps


def test_adamw_grad_norm_of_many_blocks_matches_float64(impl, device):
    ps = _params(device, shapes=SHAPES + [(300_000,)])  # several reduction blocks and chunks
    _set_grads(ps, [torch.randn(s) * 3 for s in SHAPES + [(300_000,)]])
    norm = impl(_groups(ps), lr=0.0).step()
    assert_within_budget("grad norm", norm, torch.nn.utils.get_total_norm([p.grad for p in ps]), _norm64(ps),
                         torch.float32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_adamw_non_finite_grad_skips_the_step(impl, device, bad):
    ps = _params(device)
    opt = impl(_groups(ps), lr=1e-2, max_grad_norm=1.0)
    _set_grads(ps, [torch.randn(s) for s in SHAPES])
    opt.step()
    before = [p.detach().clone() for p in ps]
    state = copy.deepcopy({i: opt.state[p] for i, p in enumerate(ps)})
    grads = [torch.randn(s) for s in SHAPES]
    grads[1][123] = bad
    _set_grads(ps, grads)
    assert not torch.isfinite(opt.step())
    for i, p in enumerate(ps):
        assert torch.equal(p, before[i])
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][k], state[i][k])
    _set_grads(ps, [torch.randn(s) for s in SHAPES])  # and it recovers
    assert torch.isfinite(opt.step())
    assert float(opt.state[ps[0]]["step"]) == 2


def test_adamw_state_dict_round_trip_resumes_exactly(impl, device):
    torch.manual_seed(1)
    grads = [[torch.randn(s) * 0.1 for s in SHAPES] for _ in range(10)]
    a = _params(device)
    b = [p.detach().clone().requires_grad_() for p in a]
    kw = dict(lr=1e-2, betas=(0.8, 0.9), max_grad_norm=1.0)
    opt_a = impl(_groups(a), **kw)
    for g in grads:
        _set_grads(a, g)
        opt_a.step()
    opt_b = impl(_groups(b), **kw)
    for g in grads[:5]:
        _set_grads(b, g)
        opt_b.step()
    sd = copy.deepcopy(opt_b.state_dict())
    b2 = [p.detach().clone().requires_grad_() for p in b]
    opt_b2 = impl(_groups(b2, wd=0.0), lr=1.0, max_grad_norm=1.0)  # other hyperparameters: the state dict's win
    opt_b2.load_state_dict(sd)
    assert opt_b2.state_dict()["param_groups"] == opt_b.state_dict()["param_groups"]
    for g in grads[5:]:
        _set_grads(b2, g)
        opt_b2.step()
    for p, q in zip(a, b2):
        assert torch.equal(p, q)


# torch's reference is torch.optim.AdamW, which keeps its state in the param dtype
@pytest.mark.backends("triton", "ext")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_adamw_low_precision_params_keep_fp32_state(impl, backend, device, dtype):
    if backend == "ext" and torch.device(device).type == "cpu" and dtype == torch.float16:
        pytest.skip("the extension's CPU kernels take float32 and bfloat16")
    ps = _params(device, dtype)
    master = [p.detach().float().requires_grad_() for p in ps]
    opt = impl(_groups(ps), lr=1e-2, max_grad_norm=1.0)
    ropt = torch.optim.AdamW(_groups(master), lr=1e-2)
    for _ in range(5):
        grads = [torch.randn(s).to(dtype) for s in SHAPES]
        _set_grads(ps, grads)
        _set_grads(master, grads)
        opt.step()
        torch.nn.utils.clip_grad_norm_(master, 1.0)
        ropt.step()
        # the same fp32 step from the same params, a few fp32 units roundoff apart at the params' scale
        # (`drift` of one step; it is all there is where the step cancels the param to ~0); rounded to `dtype`
        # that is the reference's rounding or the `dtype` value next to it: one ulp, at most eps * |value|
        for p, m in zip(ps, master):
            torch.testing.assert_close(p.float(), m.detach().to(dtype).float(), rtol=torch.finfo(dtype).eps,
                                       atol=drift(1, m.detach().abs().max().item()))
            m.data.copy_(p.float())
    for p in ps:
        assert p.dtype == dtype
        assert opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == torch.float32
    sd = copy.deepcopy(opt.state_dict())
    opt2 = impl(_groups([p.detach().clone().requires_grad_() for p in ps]), lr=1e-2)
    opt2.load_state_dict(sd)
    for st, st2 in zip(opt.state.values(), opt2.state.values()):
        assert st2["exp_avg"].dtype == st2["exp_avg_sq"].dtype == torch.float32
        assert torch.equal(st2["exp_avg"], st["exp_avg"])


def test_adamw_params_without_grad_are_left_alone_and_norm_of_nothing_is_zero(impl, device):
    ps = _params(device)
    opt = impl(_groups(ps), lr=1e-2)
    assert float(opt.step()) == 0.0
    before = ps[0].detach().clone()
    _set_grads(ps[1:], [torch.randn(s) for s in SHAPES[1:]])
    opt.step()
    assert torch.equal(ps[0], before) and ps[0] not in opt.state


@pytest.mark.backends("triton")
@pytest.mark.cpu_only("compares the interpreter's whole-chunk block with the GPU BLOCK; a compiled kernel with a "
                      "whole-chunk block would only stress the GPU compiler")
def test_adamw_gpu_block_size_matches_interpreter_block(impl, device, monkeypatch):
    """The interpreter runs a whole chunk per block; the GPU BLOCK loops inside a chunk: same result."""
    shapes = [(3000,), (17, 3)]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    results = []
    for interp in (True, False):
        monkeypatch.setattr(sys.modules["nanogpt_kernels.triton.adamw"], "interpreting", lambda interp=interp: interp)
        torch.manual_seed(3)
        ps = [torch.randn(s).to(device).requires_grad_() for s in shapes]
        opt = impl([{"params": ps, "weight_decay": 0.1}], lr=1e-2, max_grad_norm=1.0)
        for g in grads:
            _set_grads(ps, g)
            opt.step()
        results.append([p.detach().clone() for p in ps])
    for a, b in zip(*results):  # the grad norm's summation order differs: equal up to rounding
        assert_drift("param", a, b, len(grads))


@pytest.mark.backends("ext")
@pytest.mark.cpu_only("CPU threading")
def test_adamw_ext_grad_norm_does_not_depend_on_thread_count(backend, same_at_thread_counts):
    same_at_thread_counts(lambda *grads: torch.ops.nanogpt_ext.grad_norm(grads),
                          *(torch.randn(s) for s in SHAPES + [(300_000,)]))


@pytest.mark.backends("ext")
def test_adamw_ext_op_rejects_mismatched_arguments_with_clear_errors(backend, device):
    """The argument checks the CPU and CUDA adamw_ share (check_adamw_args)."""
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


# ---------------------------------------------------------------- the extension's CPU kernel, every ISA clone

@pytest.mark.cpu_only("the ISA clones are the CPU kernels'")
@pytest.mark.parametrize("dtype", ISA_DTYPES)
def test_ext_grad_norm_and_adamw_step_every_cpu_isa(isa, dtype):
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
