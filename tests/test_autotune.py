"""The measured `auto` (nanogpt_kernels.autotune, nanogpt.ops.select_kernels): a slow or wrong backend is not
chosen, verdicts are cached by what they depend on, and DDP ranks agree."""
import os
import subprocess
import sys
import textwrap
import time
from contextlib import nullcontext

import pytest
import torch

import nanogpt_kernels.autotune as at
from nanogpt import ops
from nanogpt.model import GPT, GPTConfig
from nanogpt_kernels import registry
from nanogpt_kernels.registry import Impl

OPTIM = dict(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.99), grad_clip=1.0)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(at, "TIME_BUDGET_S", 0.02)  # the decisions below do not hinge on timing noise
    monkeypatch.setattr(at, "NOISY", float("inf"))  # ... nor does caching (test_noisy_timings_are_not_cached)
    return tmp_path / "cache"


def tiny(kernels="auto", n_embd=32, T=16):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=T, vocab_size=50, n_layer=1, n_head=2, n_embd=n_embd, kernels=kernels), "cpu")
    X, Y = torch.randint(0, 50, (2, T)), torch.randint(0, 50, (2, T))
    return model, X, Y


def with_fake_ext(monkeypatch, op, fn_name):
    """Make `fn_name` of this module the ext backend's `op` (the extension must be built: CI builds it)."""
    assert registry.backend_unavailable("ext", "cpu") is None, "these tests need the C++ extension built"
    monkeypatch.setitem(registry.REGISTRY[op].impls, "ext", Impl(f"{__name__}:{fn_name}"))


def slow_layer_norm(x, weight, bias=None, eps=1e-5):
    time.sleep(0.005)
    return registry.layer_norm(x, weight, bias, eps)


def wrong_bias_gelu(x, bias=None, approximate="none"):
    return registry.bias_gelu(x, bias, approximate) * 1.01


def raising_attention(q, k, v, causal=True, scale=None, dropout_p=0.0):
    raise RuntimeError("no kernel for this shape")


# the ops a GPT-2-recipe model runs (the modern options' rms_norm, bias_relu2 and rope are not measured for it)
GPT2_OPS = ("attention", "layer_norm", "bias_gelu", "adamw", "linear_cross_entropy")


def test_slowed_backend_is_not_chosen(monkeypatch):
    with_fake_ext(monkeypatch, "layer_norm", "slow_layer_norm")
    model, X, Y = tiny()
    choice = ops.select_kernels(model, X, Y, nullcontext(), log=lambda s: None)
    assert choice["layer_norm"] == "torch"
    assert model.transformer.ln_f.fn is registry.layer_norm


def test_wrong_or_raising_backend_is_dropped_with_a_warning(monkeypatch):
    with_fake_ext(monkeypatch, "bias_gelu", "wrong_bias_gelu")
    with_fake_ext(monkeypatch, "attention", "raising_attention")
    model, X, Y = tiny()
    lines = []
    with pytest.warns(UserWarning) as w:
        choice = ops.select_kernels(model, X, Y, nullcontext(), log=lines.append)
    msgs = [str(x.message) for x in w]
    assert any("bias_gelu on ext dropped" in m and "off by" in m for m in msgs), msgs
    assert any("attention on ext dropped" in m and "no kernel for this shape" in m for m in msgs), msgs
    assert choice["bias_gelu"] == "torch" and choice["attention"] == "torch"
    assert "wrong" in lines[0]  # the table says why ext was passed over


def test_correct_kernels_pass_the_check():
    """Every real backend that runs here passes its own correctness check on a model's real calls."""
    model, X, Y = tiny(n_embd=48, T=24)
    for dtype in (torch.float32, torch.bfloat16):
        ctx = nullcontext() if dtype == torch.float32 else torch.autocast("cpu", dtype=dtype)
        calls = ops.capture_calls(model, X, Y, ctx)
        assert set(calls) == {op for op in model.ops() if registry.REGISTRY[op].kind == "layer"}
        for op, call in calls.items():
            for b in registry.candidates(op, "cpu"):
                assert at.check_layer(op, b, call) is None, (op, b, dtype)
    for b in registry.candidates("adamw", "cpu"):
        hyper = dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, max_grad_norm=1.0)
        assert at.check_optimizer(b, model.optimizer_groups(0.1), hyper) is None, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_modern_ops_are_checked_and_timed(dtype):
    """rms_norm (QK-norm shape), bias_relu2 and rope (two outputs) on calls as a modern GPT makes them: every
    backend that runs here passes the check and gets a time."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 2, 24, generator=g).to(dtype)  # (B, T, H, D): QK-norm over the head dim
    q, k = (torch.randn(2, 16, 2, 24, generator=g).to(dtype).transpose(1, 2) for _ in range(2))
    angles = torch.outer(torch.arange(16.0), torch.rand(12, generator=g))
    calls = {"rms_norm": at.Call((x, torch.randn(24, generator=g).to(dtype)), {}),
             "bias_relu2": at.Call((torch.randn(32, 96, generator=g).to(dtype), torch.randn(96).to(dtype)), {}),
             "rope": at.Call((q, k, angles.cos(), angles.sin()), {})}
    for op, call in calls.items():
        trials = at.measure_layer(op, registry.candidates(op, "cpu"), call, nullcontext(), 0.01)
        assert trials and all(t.error is None and t.ms > 0 for t in trials), (op, trials)


def test_cache_hit_and_miss(monkeypatch, cache_dir):
    measured = []
    real = at.measure_layer
    monkeypatch.setattr(at, "measure_layer", lambda op, *a, **k: measured.append(op) or real(op, *a, **k))
    model, X, Y = tiny()
    kw = dict(kernels="auto", optim=OPTIM, log=lambda s: None)
    ops.select_kernels(model, X, Y, nullcontext(), **kw)
    layer_ops = sorted(op for op in model.ops() if registry.REGISTRY[op].kind == "layer")
    assert sorted(measured) == layer_ops and (cache_dir / "autotune.json").exists()
    measured.clear()
    lines = []
    ops.select_kernels(model, X, Y, nullcontext(), kernels="auto", optim=OPTIM, log=lines.append)
    assert measured == [] and "read from the cache" in lines[0]
    ops.select_kernels(model, X[:, :8], Y[:, :8], nullcontext(), **kw)  # a changed shape
    assert sorted(measured) == layer_ops
    measured.clear()
    ops.select_kernels(model, X, Y, torch.autocast("cpu", dtype=torch.bfloat16), **kw)  # a changed dtype
    assert sorted(measured) == layer_ops
    measured.clear()
    monkeypatch.setattr(at, "_versions", lambda: {"torch": "9.9", "library": "other build"})  # a changed version
    ops.select_kernels(model, X, Y, nullcontext(), **kw)
    assert sorted(measured) == layer_ops


def test_named_ops_and_autotune_off_are_not_measured(monkeypatch):
    monkeypatch.setattr(at, "select", lambda *a, **k: pytest.fail("measured"))
    model, X, Y = tiny()
    assert ops.select_kernels(model, X, Y, nullcontext(), kernels="torch", optim=OPTIM) == dict.fromkeys(
        GPT2_OPS, "torch")  # the ops the model runs, and only they
    fixed = ops.select_kernels(model, X, Y, nullcontext(), kernels="auto", autotune=False, optim=OPTIM)
    assert fixed == {op: b for op, b in registry.resolve("auto", "cpu").items() if op in GPT2_OPS}


def test_checkpoint_record_is_reused_on_the_same_machine_only(monkeypatch):
    model, X, Y = tiny()
    record = {"device": at.device_key("cpu"), "backends": dict.fromkeys(GPT2_OPS, "torch")}
    monkeypatch.setattr(at, "select", lambda *a, **k: pytest.fail("measured"))
    assert ops.select_kernels(model, X, Y, nullcontext(), optim=OPTIM, recorded=record,
                              log=lambda s: None) == record["backends"]
    monkeypatch.undo()
    other = {"device": "another CPU", "backends": record["backends"]}
    monkeypatch.setattr(at, "select", lambda *a, **k: (_ for _ in ()).throw(AssertionError("measured")))
    with pytest.raises(AssertionError, match="measured"):
        ops.select_kernels(model, X, Y, nullcontext(), optim=OPTIM, recorded=other, log=lambda s: None)


def test_ddp_ranks_agree(tmp_path):
    """Two gloo ranks: rank 0 measures, rank 1 takes its choice without measuring (its measurement would differ)."""
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys
        from contextlib import nullcontext
        import torch, torch.distributed as dist
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import nanogpt_kernels.autotune as at
        from nanogpt import ops
        from test_autotune import tiny
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        if rank == 1:
            at.select = lambda *a, **k: sys.exit("rank 1 measured")
        model, X, Y = tiny()
        choice = ops.select_kernels(model, X, Y, nullcontext(), log=lambda s: None)
        out = [None, None]
        dist.all_gather_object(out, choice)
        if rank == 0:
            print(json.dumps(out))
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
        dist.destroy_process_group()
    """))
    env = dict(os.environ, NANOGPT_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got[0] == got[1] and set(got[0]) == set(GPT2_OPS)


def test_checkpoint_records_backends_and_resume_reuses_them(tmp_path):
    from test_train import TINY, run

    env = dict(os.environ, NANOGPT_CACHE_DIR=str(tmp_path / "cache"))
    run(["nanogpt.prepare", "shakespeare_char"], tmp_path)
    args = ["nanogpt.train", *[a for a in TINY if not a.startswith("--kernels")], "--kernels=auto",
            "--out_dir=out", "--batch_size=2", "--eval_interval=2"]
    first = run([*args, "--max_iters=2"], tmp_path, env=env).stdout
    assert "kernel autotune (measured in" in first
    from nanogpt import checkpoint
    state = checkpoint.load(str(tmp_path / "out"))[1]
    assert state["kernels"]["device"] == at.device_key("cpu") and set(state["kernels"]["backends"]) == set(GPT2_OPS)
    (tmp_path / "cache").rename(tmp_path / "cache-gone")  # the resume must not need the cache
    resumed = run([*args, "--max_iters=4", "--init_from=resume"], tmp_path, env=env).stdout
    assert "kernels from the checkpoint (trained on this machine" in resumed
    chosen = ", ".join(f"{op}={b}" for op, b in state["kernels"]["backends"].items())
    assert f"kernels (cpu, float32): {chosen}" in resumed


def test_decision_rule():
    """Plain PyTorch unless a correct backend is 3% faster; for an optional op plain PyTorch is the model without it."""
    T = at.Trial
    assert at.decide("layer_norm", [T("ext", 0.98), T("torch", 1.0)]).choice == "torch"  # 2% is a tie
    assert at.decide("layer_norm", [T("ext", 0.96), T("torch", 1.0)]).choice == "ext"
    assert at.decide("layer_norm", [T("ext", 0.5, "wrong"), T("torch", 1.0)]).choice == "torch"
    lce = [T("ext", 0.99), T("torch", 0.98), T("none", 1.0)]
    assert at.decide("linear_cross_entropy", lce).choice == "none"
    lce[0] = T("ext", 0.5)
    v = at.decide("linear_cross_entropy", lce)
    assert v.choice == "ext" and "none slower" in v.why


def test_noisy_timings_are_not_cached(monkeypatch, cache_dir):
    monkeypatch.setattr(at, "NOISY", 0.0)  # every median counts as far above its fastest run
    model, X, Y = tiny()
    lines = []
    ops.select_kernels(model, X, Y, nullcontext(), log=lines.append)
    assert "timings noisy" in lines[0] and not (cache_dir / "autotune.json").exists()
