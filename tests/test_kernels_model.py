"""The Triton backend inside the GPT: selection, and training that tracks the torch backend step by step.

Runs on the test device (NANOGPT_TEST_DEVICE): CPU through Triton's interpreter (tests/conftest.py turns it
on), or the compiled kernels on CUDA.
"""
import pytest
import torch

import kernels
from nanogpt import ops
from nanogpt.model import GPT, GPTConfig


pytestmark = pytest.mark.usefixtures("triton_kernels")  # tests/conftest.py


def test_backend_contract_exports():
    for name in ("layer_norm", "bias_gelu", "attention", "FusedAdamW", "unavailable"):
        assert callable(getattr(kernels, name))
        assert getattr(kernels, name).__doc__
    assert issubclass(kernels.FusedAdamW, torch.optim.Optimizer)


def test_unavailable_reports_reasons(device, monkeypatch):
    if torch.device(device).type == "cpu":
        assert kernels.unavailable("cpu") is None  # TRITON_INTERPRET=1 here (tests/conftest.py)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "TRITON_INTERPRET=1" in kernels.unavailable("cpu")
    else:  # compiled kernels: CUDA yes, CPU only through the interpreter, which is off
        assert kernels.unavailable("cuda") is None
        assert "TRITON_INTERPRET=1" in kernels.unavailable("cpu")
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # too late: triton is already imported without it
        assert "TRITON_INTERPRET=1" in kernels.unavailable("cuda")
        assert "after triton was imported" in kernels.unavailable("cpu")
    if not torch.cuda.is_available():
        assert kernels.unavailable("cuda")
    assert kernels.unavailable("mps")


def test_resolve_picks_triton_on_the_test_device(device):
    dt = torch.device(device).type
    assert ops.resolve("triton", dt) == dict.fromkeys(ops.OPS, "triton")
    if dt == "cuda":  # `auto` prefers the Triton kernels on CUDA, never takes the interpreter on CPU
        assert ops.resolve("auto", dt) == dict.fromkeys(ops.OPS, "triton")
    else:
        assert "triton" not in ops.resolve("auto", dt).values()


def _train(kernels_name, steps, device, seed=1337):
    dt = torch.device(device).type
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=65, kernels=kernels_name)
    model = GPT(cfg, device_type=dt).to(device)  # initialised on CPU: the same weights on every device
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-3, betas=(0.9, 0.95),
                                     device_type=dt, grad_clip=1.0)
    gen = torch.Generator().manual_seed(seed)
    # a small fixed pool of random sequences to memorize
    data = torch.randint(0, 65, (4, 33), generator=gen).to(device)
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


def test_training_50_steps_tracks_torch_backend(device):
    ref, ref_norms, _ = _train("torch", 50, device)
    ours, norms, opt = _train("triton", 50, device)
    assert isinstance(opt, kernels.FusedAdamW)
    assert all(p.device.type == torch.device(device).type for g in opt.param_groups for p in g["params"])
    for step, (a, b) in enumerate(zip(ours, ref)):
        assert abs(a - b) <= 1e-4, f"step {step}: triton loss {a} vs torch {b}"
    assert ours[-1] < ours[0] - 0.5  # it learns
    assert norms == pytest.approx(ref_norms, rel=1e-3)
