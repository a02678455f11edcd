import pytest
import torch

from nanogpt.model import GPT, GPTConfig
from nanogpt_kernels import registry

# the torch reference for every op, and the unfused loss: forward(idx, targets) then returns every position's logits
TORCH_UNFUSED = "attention:torch,layer_norm:torch,bias_gelu:torch,adamw:torch,linear_cross_entropy:none"
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=71, dropout=0.0, kernels=TORCH_UNFUSED)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**(TINY | kw)), device_type="cpu")


@pytest.mark.parametrize("activation,gelu", [("gelu_new", "tanh"), ("gelu", "none")])
def test_from_pretrained_matches_hugging_face_logits(tmp_path, activation, gelu):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=48, vocab_size=97,
                                  activation_function=activation, bos_token_id=0, eos_token_id=0, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # the fresh model's biases are zero: randomize so a missed bias fails the test
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(str(tmp_path), dict(kernels=TORCH_UNFUSED)).eval()
    assert model.config.gelu == gelu
    idx = torch.randint(0, 97, (3, 48))
    with torch.no_grad():
        ours, _ = model(idx, idx)  # with targets: logits at every position
        ref = hf(idx).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # and cropped to a shorter context, as finetuning does
    short = GPT.from_pretrained(str(tmp_path), dict(kernels=TORCH_UNFUSED, block_size=16)).eval()
    with torch.no_grad():
        torch.testing.assert_close(short(idx[:, :16], idx[:, :16])[0], hf(idx[:, :16]).logits, atol=1e-5, rtol=0)


def test_gradient_accumulation_equals_one_big_batch():
    """k micro-steps on b rows (loss / k) give the gradients and update of one step on k*b rows."""
    k, b = 4, 3
    model_a = tiny_model(1).double()
    model_b = tiny_model(1).double()
    x = torch.randint(0, TINY["vocab_size"], (k * b, TINY["block_size"]))
    y = torch.randint(0, TINY["vocab_size"], (k * b, TINY["block_size"]))
    opt_a = model_a.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", grad_clip=1.0)
    opt_b = model_b.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", grad_clip=1.0)
    for i in range(k):
        (model_a(x[i * b:(i + 1) * b], y[i * b:(i + 1) * b])[1] / k).backward()
    model_b(x, y)[1].backward()
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-10, rtol=0, msg=name)
    norm_a, norm_b = opt_a.step(), opt_b.step()
    torch.testing.assert_close(norm_a, norm_b, atol=1e-10, rtol=0)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-10, rtol=0)


def test_optimizer_groups_and_clipping():
    model = tiny_model()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", grad_clip=0.5)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n_params = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_params == sum(p.numel() for p in model.parameters())
    x = torch.randint(0, TINY["vocab_size"], (2, 8))
    model(x, x)[1].backward()
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    norm = opt.step()
    assert torch.isclose(norm, torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # a non-finite gradient skips the whole update
    model.transformer.wte.weight.grad.fill_(float("nan"))
    before = [p.detach().clone() for p in model.parameters()]
    assert not torch.isfinite(opt.step())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_generate_crop_and_counts():
    model = tiny_model().eval()
    idx = torch.randint(0, TINY["vocab_size"], (2, 5))
    out = model.generate(idx, 30, temperature=0.9, top_k=5)  # runs past block_size: context is cropped
    assert out.shape == (2, 35) and torch.equal(out[:, :5], idx)
    assert int(out.max()) < TINY["vocab_size"]
    n = model.get_num_params()
    assert model.get_num_params(non_embedding=False) == n + TINY["block_size"] * TINY["n_embd"]
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape[0] == 8 and model.config.block_size == 8
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
    assert 0 < model.estimate_mfu(fwdbwd_per_iter=12, dt=0.5) < 1


def test_no_bias_and_dropout_variants_train():
    model = tiny_model(bias=False, dropout=0.1)
    assert all(not n.endswith(".bias") for n, _ in model.named_parameters())
    x = torch.randint(0, TINY["vocab_size"], (2, 8))
    loss = model(x, x)[1]
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_kernel_selector_errors():
    assert registry.resolve("torch", "cpu") == dict.fromkeys(registry.OPS, "torch")
    assert registry.resolve("attention:torch", "cpu")["attention"] == "torch"
    assert registry.parse("gelu:torch,optimizer:torch") == registry.parse("bias_gelu:torch,adamw:torch")  # old names
    with pytest.raises(registry.KernelError, match="unknown backend 'cutlass'"):
        registry.resolve("cutlass", "cpu")
    with pytest.raises(registry.KernelError, match="unknown op 'softmax'"):
        registry.resolve("softmax:torch", "cpu")
    with pytest.raises(ValueError, match="gelu must be"):
        tiny_model(gelu="fast")
    line = registry.describe(registry.resolve("torch", "cpu"), "cpu")
    assert line.startswith("attention=torch, layer_norm=torch, bias_gelu=torch, adamw=torch")
