"""The Triton backend inside the GPT: selection, and training that tracks the torch backend step by step."""
import os

_OLD_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels  # noqa: E402
from nanogpt import ops  # noqa: E402
from nanogpt.model import GPT, GPTConfig  # noqa: E402

assert kernels.unavailable("cpu") is None, kernels.unavailable("cpu")  # triton imported before TRITON_INTERPRET=1?
# the rest of the session (other tests, their subprocesses) must not see TRITON_INTERPRET=1
if _OLD_INTERPRET is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _OLD_INTERPRET


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    """kernels.unavailable("cpu") and the launchers see the interpreter during each kernel test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_backend_contract_exports():
    for name in ("layer_norm", "bias_gelu", "attention", "FusedAdamW", "unavailable"):
        assert callable(getattr(kernels, name))
        assert getattr(kernels, name).__doc__
    assert issubclass(kernels.FusedAdamW, torch.optim.Optimizer)


def test_unavailable_reports_reasons(monkeypatch):
    assert kernels.unavailable("cpu") is None  # TRITON_INTERPRET=1 here
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in kernels.unavailable("cpu")
    if not torch.cuda.is_available():
        assert kernels.unavailable("cuda")
    assert kernels.unavailable("mps")


def test_resolve_picks_triton_on_cpu_under_the_interpreter():
    assert ops.resolve("triton", "cpu") == dict.fromkeys(ops.OPS, "triton")


def _train(kernels_name, steps, seed=1337):
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=65, kernels=kernels_name)
    model = GPT(cfg, device_type="cpu")
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-3, betas=(0.9, 0.95),
                                     device_type="cpu", grad_clip=1.0)
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 65, (4, 33), generator=gen)  # a small fixed pool of random sequences to memorize
    losses, norms = [], []
    for step in range(steps):
        rows = data[(2 * step) % 4:(2 * step) % 4 + 2]
        x, y = rows[:, :-1], rows[:, 1:]
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norms.append(float(opt.step()))
        losses.append(loss.item())
    return losses, norms, opt


def test_training_50_steps_tracks_torch_backend():
    ref, ref_norms, _ = _train("torch", 50)
    ours, norms, opt = _train("triton", 50)
    assert isinstance(opt, kernels.FusedAdamW)
    for step, (a, b) in enumerate(zip(ours, ref)):
        assert abs(a - b) <= 1e-4, f"step {step}: triton loss {a} vs torch {b}"
    assert ours[-1] < ours[0] - 0.5  # it learns
    assert norms == pytest.approx(ref_norms, rel=1e-3)
