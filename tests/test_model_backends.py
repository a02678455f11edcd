"""The GPT on each backend (tests/conftest.py's `backend`, here a whole-model selector): the backends' exports
and selection, training that tracks the torch backend step by step, and torch.compile(fullgraph=True).

Runs on the test device (NANOGPT_TEST_DEVICE): Triton on CPU through its interpreter (tests/conftest.py turns it
on), or compiled on CUDA.
"""
import pytest
import torch

from budget import drift
from nanogpt.model import GPT, GPTConfig
from nanogpt_kernels import registry

OP = None  # tests/conftest.py: `backend` is a whole backend (the model falls back for the ops it lacks)
TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=65)


@pytest.mark.parametrize("name", ["triton", "ext"])  # the torch reference is the contract's own text
def test_backend_exports_the_contract(name):
    for op, spec in registry.REGISTRY.items():
        if name in spec.impls:
            fn = registry.get(op, name)
            assert callable(fn) and fn.__doc__, f"{name}'s {op}"
    assert issubclass(registry.get("adamw", name), torch.optim.Optimizer)


def test_triton_unavailable_reports_reasons(device, monkeypatch):
    triton_backend = pytest.importorskip("nanogpt_kernels.triton")
    unavailable = triton_backend.unavailable
    if torch.device(device).type == "cpu":
        assert unavailable("cpu") is None  # TRITON_INTERPRET=1 here (tests/conftest.py)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "TRITON_INTERPRET=1" in unavailable("cpu")
    else:  # compiled kernels: CUDA yes, CPU only through the interpreter, which is off
        assert unavailable("cuda") is None
        assert "TRITON_INTERPRET=1" in unavailable("cpu")
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # too late: triton is already imported without it
        assert "TRITON_INTERPRET=1" in unavailable("cuda")
        assert "after triton was imported" in unavailable("cpu")
    if not torch.cuda.is_available():
        assert unavailable("cuda")
    assert unavailable("mps")


def test_resolve_picks_triton_on_the_test_device(device):
    dt = torch.device(device).type
    assert registry.resolve("triton", dt) == dict.fromkeys(registry.OPS, "triton")
    if dt == "cuda":  # `auto` prefers the Triton kernels on CUDA, never takes the interpreter on CPU
        assert registry.resolve("auto", dt) == dict.fromkeys(registry.OPS, "triton")
    else:
        assert "triton" not in registry.resolve("auto", dt).values()


def _model(kernels, device, seed=1337, **kw):
    """The GPT on `kernels`, with the unfused loss: linear_cross_entropy is test_linear_cross_entropy.py's."""
    torch.manual_seed(seed)
    # initialised on CPU: the same weights on every device
    model = GPT(GPTConfig(**TINY | kw, kernels=kernels), device_type=torch.device(device).type).to(device)
    model.set_backends(model.backends | {"linear_cross_entropy": registry.NONE})
    return model


def _train(kernels, device, steps, gelu, seed=1337):
    model = _model(kernels, device, seed, gelu=gelu)
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-3, betas=(0.9, 0.95), grad_clip=1.0)
    # a small fixed pool of random sequences to memorize
    data = torch.randint(0, 65, (4, 33), generator=torch.Generator().manual_seed(seed)).to(device)
    losses, norms = [], []
    for step in range(steps):
        rows = data[(2 * step) % 4:(2 * step) % 4 + 2]
        _, loss = model(rows[:, :-1], rows[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norms.append(float(opt.step()))
        losses.append(loss.item())
    return model, opt, losses, norms


def assert_tracks(name, ours, ref):
    """Two float32 trainings that round differently stay within `drift` of each other at every step.

    One forward + backward differs between them by the rounding of its longest sums: a dot product of K terms is
    off by up to K units roundoff (K = 4 * n_embd, the MLP's down projection), and the steps carry what earlier
    ones left different, so the bound grows by that much per step. It is taken at the quantity's scale, the
    largest value so far: a grad norm that shrinks as the model memorizes keeps the rounding it has carried.
    (A fixed 1e-3 relative tolerance on the grad norms, fitted to one machine, failed on an AVX2 CPU.)
    """
    for step, (a, b) in enumerate(zip(ours, ref)):
        tol = drift(step + 1, max(ref[:step + 1]), ulps=4 * TINY["n_embd"])
        assert abs(a - b) <= tol, f"step {step}: {name} {a} vs torch's {b}, more than {tol:.3g} apart"


@pytest.mark.backends("triton", "ext")
@pytest.mark.parametrize("gelu", ["none", pytest.param("tanh", marks=pytest.mark.compiled_only("a second training"))])
def test_training_tracks_torch_backend(backend, device, gelu):
    # 50 steps; 12 under the Triton interpreter (85 s for 50 on a 2-core CPU), where the loss already falls by > 1
    steps = 12 if backend == "triton" and torch.device(device).type == "cpu" else 50
    _, _, ref, ref_norms = _train("torch", device, steps, gelu)
    model, opt, ours, norms = _train(backend, device, steps, gelu)
    assert model.backends["layer_norm"] == backend
    assert isinstance(opt, registry.get("adamw", backend))
    assert all(p.device.type == torch.device(device).type for g in opt.param_groups for p in g["params"])
    assert_tracks(f"{backend}'s loss", ours, ref)
    assert_tracks(f"{backend}'s grad norm", norms, ref_norms)
    assert ours[-1] < ours[0] - 0.5  # it learns


@pytest.mark.backends("triton", "ext")
def test_torch_compile_fullgraph_gpt_matches_eager(backend, device):
    torch._dynamo.reset()
    model = _model(backend, device, seed=0)
    idx, tgt = (torch.randint(0, 65, (2, 32)).to(device) for _ in range(2))
    _, loss = model(idx, tgt)
    loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    _, closs = torch.compile(model, fullgraph=True)(idx, tgt)
    closs.backward()
    torch.testing.assert_close(closs, loss, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.backends("triton", "ext")
def test_torch_compile_fullgraph_gpt_with_dropout(backend, device):
    """dropout > 0 runs in the kernels; the seed draw must not break a torch.compile(fullgraph=True) graph."""
    torch._dynamo.reset()
    model = _model(backend, device, seed=0, n_layer=1, dropout=0.2).train()
    idx = torch.randint(0, 65, (2, 32)).to(device)
    torch.manual_seed(3)
    _, loss = torch.compile(model, fullgraph=True, backend="aot_eager")(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)
    torch.manual_seed(3)
    torch.testing.assert_close(model(idx, idx)[1], loss, atol=1e-5, rtol=1e-5)  # same seed, same masks
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.backends("ext")
@pytest.mark.cpu_only("the extension's attention kernel is CPU-only")
def test_attention_dropout_same_on_ext_and_triton(backend, device):
    """With dropout > 0 the extension's CPU attention and the Triton attention (interpreter) draw the same masks
    from the same seed, so a training step gives the same loss and gradients on either backend."""
    if registry.backend_unavailable("triton", "cpu"):
        pytest.fail(f"the Triton backend cannot run: {registry.backend_unavailable('triton', 'cpu')}")
    grads = {}
    idx = torch.randint(0, 65, (4, 32))
    for kernels in ("ext", "attention:triton"):
        model = _model(kernels, device, seed=0, dropout=0.2).train()
        torch.manual_seed(7)
        _, loss = model(idx, idx.roll(-1, 1))
        loss.backward()
        grads[kernels] = [loss.detach()] + [p.grad for p in model.parameters()]
    assert not torch.allclose(_model("ext", device, seed=0)(idx, idx.roll(-1, 1))[1], grads["ext"][0])  # it dropped
    for a, b in zip(*grads.values()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
