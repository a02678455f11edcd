"""The modern GPT options (GPTConfig: rope, rmsnorm, qk_norm, relu2, untied head, logit softcap, zero-initialised
projections) and optimizer=muon (nanogpt.muon). The options' 2-rank DDP run is tests/test_train.py's DDP test."""
import math

import pytest
import torch

from nanogpt import checkpoint, muon
from nanogpt.model import GPT, MODERN, GPTConfig
from nanogpt_kernels import registry

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=65, dropout=0.0, bias=True)
OPTIONS = [{k: v} for k, v in MODERN.items()] + [MODERN]
IDS = [f"{k}={v}" for k, v in MODERN.items()] + ["all"]


def tiny(seed=0, **options):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**TINY, **options, kernels="torch"), "cpu")


def batch(seed=0, b=2, t=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 65, (b, t), generator=g), torch.randint(0, 65, (b, t), generator=g)


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_each_option_alone_and_all_together(options):
    """Shapes; the fused loss equals the unfused one (softcap on both paths); the ops the model runs, and only
    they, have backends; the checkpoint's model args of the options pass the weights-only schema check."""
    model = tiny(**options)
    idx, tgt = batch()
    _, loss = model(idx, tgt)
    logits, none = model(idx)
    assert loss.shape == () and math.isfinite(loss.item()) and none is None and logits.shape == (2, 1, 65)
    assert model(idx, all_logits=True)[0].shape == (2, 16, 65)
    model.set_backends(model.backends | {"linear_cross_entropy": "none"})
    full, unfused = model(idx, tgt)
    torch.testing.assert_close(unfused, loss, atol=1e-5, rtol=1e-5)
    if options.get("logit_softcap"):
        assert full.abs().max() < options["logit_softcap"]
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    used = {"attention", "adamw", "linear_cross_entropy", "layer_norm", "bias_gelu"}
    if MODERN["norm"] in options.values() or options.get("qk_norm"):
        used.add("rms_norm")
    if options.get("norm") == "rmsnorm":
        used.discard("layer_norm")
    if options.get("mlp") == "relu2":
        used = used - {"bias_gelu"} | {"bias_relu2"}
    if options.get("pos_emb") == "rope":
        used.add("rope")
    assert set(model.backends) == used
    margs = {k: getattr(model.config, k) for k in (*TINY, *MODERN, "rope_theta")}
    checkpoint._check("x", {"model": model.state_dict(), "model_args": margs}, checkpoint.MODEL_SCHEMA)


def test_gpt2_recipe_is_unchanged():
    """The defaults are GPT-2: the same parameters, in the same order, as before the options existed."""
    model = tiny()
    names = [n for n, _ in model.named_parameters()]
    assert names[:2] == ["transformer.wte.weight", "transformer.wpe.weight"] and names[-2:] == [
        "transformer.ln_f.weight", "transformer.ln_f.bias"]
    assert model.transformer.wte.weight is model.lm_head.weight
    assert list(model.backends) == ["attention", "layer_norm", "bias_gelu", "adamw", "linear_cross_entropy"]


def test_compile_fullgraph_with_every_option():
    torch._dynamo.reset()
    model = tiny(**MODERN)
    idx, tgt = batch()
    _, loss = model(idx, tgt)
    loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    _, closs = torch.compile(model, fullgraph=True, backend="aot_eager")(idx, tgt)
    closs.backward()
    torch.testing.assert_close(closs, loss, atol=1e-6, rtol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[n], atol=1e-6, rtol=1e-5, msg=n)


# ---------------------------------------------------------------- RoPE

def rope_float64(x, theta=10000.0):
    """The formula: the pair (x_i, x_{i + D/2}) at position m rotated by the angle m * theta^(-2i / D)."""
    B, H, T, D = x.shape
    x = x.double()
    i = torch.arange(D // 2, dtype=torch.float64)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-2 * i / D)
    a, b = x[..., :D // 2], x[..., D // 2:]
    return torch.cat((a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()), -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_the_formula_and_transformers(dtype):
    model = tiny(pos_emb="rope")
    q, k = (torch.randn(2, 3, 16, 16).to(dtype) for _ in range(2))
    cos, sin = model.rotary(0, 16)
    q_rot, k_rot = registry.get("rope", "torch")(q, k, cos, sin)
    assert q_rot.dtype == k_rot.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    for ours, x in ((q_rot, q), (k_rot, k)):
        torch.testing.assert_close(ours.double(), rope_float64(x), **tol)
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    hf_cos, hf_sin = (torch.cat((c, c), -1)[None] for c in (cos, sin))  # (1, T, D): its layout
    hf_q, hf_k = llama.apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    torch.testing.assert_close(q_rot, hf_q.to(dtype), **tol)
    torch.testing.assert_close(k_rot, hf_k.to(dtype), **tol)


# ---------------------------------------------------------------- Muon

def test_param_split_puts_every_hidden_matrix_under_muon_and_nothing_else():
    for options in ({}, MODERN):
        model = GPT(GPTConfig(**(TINY | dict(n_layer=2)), **options, kernels="torch"), "cpu")
        opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), optimizer="muon")
        names = {p: n for n, p in model.named_parameters()}
        under_muon = {names[p] for g in opt.param_groups if g.get("muon") for p in g["params"]}
        hidden = {f"transformer.h.{i}.{m}.weight" for i in range(2)
                  for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
        assert under_muon == hidden
        under_adamw = [names[p] for g in opt.param_groups if not g.get("muon") for p in g["params"]]
        assert sorted(under_adamw) == sorted(set(names.values()) - hidden)  # the rest, each once


def test_muon_matches_torch_optim_muon_over_50_steps():
    """The optimizer the trainer builds (optimizer=muon, no clipping) against torch.optim.Muon on the hidden
    matrices plus torch.optim.AdamW on the rest, 50 steps on the same batches. Ours runs the reference's own
    momentum, bf16 Newton-Schulz function and update in the same order, so the tolerance is none: bitwise."""
    ours, ref = tiny(**MODERN), tiny(**MODERN)
    opt = ours.configure_optimizers(0.1, 3e-3, (0.9, 0.95), optimizer="muon", muon_lr=0.02, muon_momentum=0.95)
    hidden, rest = muon.split_params(ref)
    ref_opts = [torch.optim.Muon(hidden, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True),
                torch.optim.AdamW(ref.optimizer_groups(0.1, "muon"), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)]
    for step in range(50):
        idx, tgt = batch(step)
        for model, opts in ((ours, [opt]), (ref, ref_opts)):
            model(idx, tgt)[1].backward()
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
    for (n, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), n


def test_bench_muon_runs_and_checks_agreement(monkeypatch):
    """benchmarks/bench_muon.py: both sides step, the table is printed, and a wrong update is exit code 1."""
    import importlib.util
    from pathlib import Path
    from nanogpt.configurator import configure
    path = Path(__file__).parent.parent / "benchmarks" / "bench_muon.py"
    spec = importlib.util.spec_from_file_location("bench_muon", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = ["--n_layer=2", "--n_embd=32", "--n_head=2", "--block_size=16", "--iters=2", "--warmup=0"]
    lines = []
    ms = bench.run(configure(bench.DEFAULTS, args), args, log=lines.append)
    assert set(ms) == {"torch", "ours"} and all(v > 0 for v in ms.values())
    assert "hidden matrices agree" in lines[-1]
    monkeypatch.setattr(muon, "newton_schulz", lambda stack, *_: stack * 2)
    with pytest.raises(SystemExit) as e:
        bench.run(configure(bench.DEFAULTS, args), args, log=lines.append)
    assert e.value.code == 1 and "DIFFER" in lines[-1]
    if not torch.cuda.is_available():
        from nanogpt.errors import UserError
        with pytest.raises(UserError, match="CUDA is not available; use --device=cpu"):
            bench.run(configure(bench.DEFAULTS, args + ["--device=cuda"]), args, log=lines.append)


def test_muon_clips_skips_and_returns_the_norm():
    model = tiny(**MODERN)
    opt = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), optimizer="muon", grad_clip=0.5)
    idx, tgt = batch()
    model(idx, tgt)[1].backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = opt.step()
    torch.testing.assert_close(norm, torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    assert not torch.isfinite(opt.step())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# hidden matrices of 99, 33 and 132 rows: uneven 2-rank shards (every option but rope, which needs an even head)
UNEVEN = dict(TINY, n_layer=2, n_embd=33, n_head=3) | MODERN | dict(pos_emb="learned")


def _uneven():
    torch.manual_seed(0)
    return GPT(GPTConfig(**UNEVEN, kernels="torch"), "cpu")


def _sharded_muon_on_rank(rank, store, updates, grads, out):
    """DDP's orthogonalize of `updates`, then 3 FSDP Muon steps of _uneven() on the given whole gradients (each
    rank given its shard), saved: the updates by each rank, the whole weights and momentum by rank 0."""
    from torch.distributed.tensor import distribute_tensor

    from nanogpt import parallel
    from nanogpt.train import Process
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.save(muon.orthogonalize(updates, 5), f"{out}.{rank}")
        model = parallel.shard(_uneven(), Process(True, rank, rank, 2, "cpu"), "float32", False)
        opt = parallel.fsdp_optimizer(model, lambda: model.configure_optimizers(
            0.1, 3e-3, (0.9, 0.95), optimizer="muon", muon_lr=0.02), print)
        for step in grads:
            for n, p in model.named_parameters():
                p.grad = distribute_tensor(step[n], p.device_mesh, p.placements, src_data_rank=None)
            opt.step()
        names = {p: n for n, p in model.named_parameters()}
        weights = {n: p.full_tensor() for n, p in model.named_parameters()}
        momentum = {names[p]: st["momentum_buffer"].full_tensor() for p, st in opt.state.items()
                    if "momentum_buffer" in st}
        if rank == 0:
            torch.save((weights, momentum), f"{out}.fsdp")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_and_fsdp_sharded_muon_equal_single_process(tmp_path):
    """2 gloo ranks (one spawn for both checks: a start costs seconds).
    DDP: each rank orthogonalises its share (shape buckets of 3, 1 and 2 matrices: one rank idles in some) and
    all-gathers: every rank ends with the single process's updates, bitwise.
    FSDP (sharded DTensor parameters, uneven shards), given the one process's gradients: 3 steps end with the one
    process's weights and momentum, bitwise. Newton-Schulz runs on the whole fp32 matrix as in one process, the
    momentum and AdamW are elementwise on the shards, each rank applies its rows."""
    g = torch.Generator().manual_seed(0)
    updates = [torch.randn(shape, generator=g) for shape in ((32, 96), (128, 32), (32, 96), (32, 32), (32, 96),
                                                              (128, 32))]
    single = muon.orthogonalize(updates, 5)
    model = _uneven()
    opt = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), optimizer="muon", muon_lr=0.02)
    grads = []
    for step in range(3):
        idx, tgt = batch(step)
        model(idx, tgt)[1].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.multiprocessing.spawn(_sharded_muon_on_rank, (tmp_path / "store", updates, grads, tmp_path / "out"),
                                nprocs=2)
    for rank in range(2):
        sharded = torch.load(tmp_path / f"out.{rank}", weights_only=True)
        assert len(sharded) == len(single) and all(torch.equal(a, b) for a, b in zip(sharded, single)), rank
    weights, momentum = torch.load(tmp_path / "out.fsdp", weights_only=True)
    names = {p: n for n, p in model.named_parameters()}
    assert len(momentum) == 8 and all(torch.equal(momentum[names[p]], st["momentum_buffer"])
                                      for p, st in opt.state.items() if "momentum_buffer" in st)
    for n, p in model.named_parameters():
        assert torch.equal(weights[n], p), n


def test_trainer_with_every_option_and_muon_resumes_bitwise(tmp_path, monkeypatch, capsys):
    """The trainer in this process: 6 iters straight, and 3 then a resume to 6, end with the same weights and
    optimizer state (Muon's momentum included), through our checkpoint files (weights-only loads)."""
    from nanogpt.prepare import main as prepare
    from nanogpt.train import main as train
    monkeypatch.chdir(tmp_path)
    prepare(["shakespeare_char"])
    modern = [f"--{k}={v}" for k, v in MODERN.items()]
    args = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=2", "--device=cpu",
            "--dtype=float32", "--compile=False", "--gradient_accumulation_steps=1", "--eval_iters=1", "--eval_interval=3", "--dataset=shakespeare_char",
            "--warmup_iters=2", "--lr_decay_iters=6", "--kernels=torch", "--optimizer=muon", "--muon_momentum_warmup=4",
            *modern]
    train([*args, "--max_iters=6", "--out_dir=straight"])
    train([*args, "--max_iters=3", "--out_dir=resumed"])
    train([*args, "--max_iters=6", "--out_dir=resumed", "--init_from=resume"])
    assert "resuming from iter 3" in capsys.readouterr().out
    (a_model, a_state), (b_model, b_state) = (checkpoint.load(d) for d in ("straight", "resumed"))
    assert a_model["model_args"]["pos_emb"] == "rope" and a_model["model"].keys() == b_model["model"].keys()
    for k in a_model["model"]:
        assert torch.equal(a_model["model"][k], b_model["model"][k]), k
    a_opt, b_opt = a_state["optimizer"], b_state["optimizer"]
    assert a_opt["param_groups"][0]["muon"] and a_opt["param_groups"] == b_opt["param_groups"]
    for i, st in a_opt["state"].items():
        assert all(torch.equal(v, b_opt["state"][i][key]) for key, v in st.items()), i


def test_export_refuses_a_modern_model(tmp_path):
    from nanogpt.export import DEFAULTS, ExportError, export
    model = tiny(pos_emb="rope", mlp="relu2")
    margs = {k: getattr(model.config, k) for k in (*TINY, *MODERN, "rope_theta")}
    checkpoint.save(str(tmp_path / "out"), 1, {"model": model.state_dict(), "model_args": margs},
                    {"optimizer": {"state": {}, "param_groups": []}, "iter_num": 1, "best_val_loss": 9.0, "ranks": []})
    for fmt in ("hf", "nanogpt"):
        with pytest.raises(ExportError, match="uses pos_emb='rope', mlp='relu2', which GPT-2's architecture"):
            export(DEFAULTS | {"out_dir": str(tmp_path / "out"), "format": fmt, "to": str(tmp_path / fmt)})
        assert not (tmp_path / fmt).exists()
