"""The char model trained with kernels="ext" against kernels="torch", and under torch.compile."""
import pytest
import torch

from nanogpt import ext
from nanogpt.model import GPT, GPTConfig


@pytest.fixture(autouse=True)
def _need_ext():
    reason = ext.unavailable("cpu")
    if reason:
        pytest.skip(reason)


def _model(kernels, seed=0, gelu="none", dropout=0.0):
    torch.manual_seed(seed)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=65, dropout=dropout, gelu=gelu,
                    kernels=kernels)
    return GPT(cfg, device_type="cpu")


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, 65, (4, 32), generator=g)
        yield x, torch.roll(x, -1, dims=1)


@pytest.mark.parametrize("gelu", ["none", "tanh"])
def test_training_matches_torch_backend(gelu):
    runs = {}
    for kernels in ("torch", "ext"):
        model = _model(kernels, gelu=gelu)
        assert set(model.backends.values()) == {kernels}
        opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", grad_clip=1.0)
        losses = []
        for x, y in _batches(50):
            _, loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        runs[kernels] = losses
    diffs = [abs(a - b) for a, b in zip(runs["torch"], runs["ext"])]
    assert max(diffs) < 1e-4, f"per-step loss differences up to {max(diffs):.3g}"
    assert runs["ext"][-1] < runs["ext"][0]  # it learns (random tokens: slowly)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = _model("ext")
    compiled = torch.compile(model, fullgraph=True)
    x, y = next(_batches(1))
    _, loss_eager = model(x, y)
    loss_eager.backward()
    grads_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    _, loss_compiled = compiled(x, y)
    loss_compiled.backward()
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), grads_eager):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_attention_dropout_same_as_triton_backend(device):
    """With dropout > 0 the ext CPU attention and the Triton attention (interpreter) draw the same masks from the
    same seed, so a training step gives the same loss and gradients on either backend."""
    if device != "cpu":
        pytest.skip("the extension's attention kernel is CPU-only")
    grads = {}
    for kernels in ("ext", "attention:triton"):
        model = _model(kernels, dropout=0.2).train()
        x, y = next(_batches(1))
        torch.manual_seed(7)
        _, loss = model(x, y)
        loss.backward()
        grads[kernels] = [loss.detach()] + [p.grad for p in model.parameters()]
    no_drop = _model("ext", dropout=0.0)
    assert not torch.allclose(no_drop(x, y)[1], grads["ext"][0])  # dropout did something
    for a, b in zip(*grads.values()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
