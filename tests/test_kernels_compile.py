"""Real GPU compilation (no GPU needed) and torch.compile(fullgraph=True) of the Triton backend.

The torch.compile tests run on the test device (NANOGPT_TEST_DEVICE): CPU through Triton's interpreter
(tests/conftest.py turns it on), or the compiled kernels on CUDA.
"""
import os
import subprocess
import sys

import pytest
import torch

import kernels


pytestmark = pytest.mark.usefixtures("triton_kernels")  # tests/conftest.py


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_FUNCTIONS = ["_ln_fwd_kernel", "_ln_bwd_kernel", "_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel",
                    "_attn_fwd_kernel", "_attn_bwd_pre_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
                    "_sqnorm_kernel", "_adamw_kernel"]


def test_compile_check_builds_every_kernel_for_sm80_and_sm90():
    """`python -m kernels.compile_check --sample 2`: first and last config of each kernel, sm_80 and sm_90.

    Compiles through ptxas and parses registers / shared memory / spills for explicit GPUTargets, with or
    without a GPU. The interpreter must be off for real compilation (on CPU the test session has it on), so
    it runs in a subprocess without TRITON_INTERPRET.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--sample", "2", "-j", "2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("ok", "WARN"))]
    for arch in ("sm_80", "sm_90"):
        assert any(f" {arch} " in ln for ln in lines), out[-3000:]
    for prefix in ("ln_fwd", "ln_bwd", "bias_gelu_fwd", "bias_gelu_bwd", "attn_fwd", "attn_bwd_pre",
                   "attn_bwd_dkdv", "attn_bwd_dq", "adamw[", "adamw_sqnorm"):
        assert any(f" {prefix}" in ln for ln in lines), f"{prefix} not compiled:\n{out[-3000:]}"
    assert all("regs=" in ln and "smem=" in ln and "spills=" in ln for ln in lines)


def test_compile_configs_cover_every_kernel():
    import importlib

    from kernels import compile_check

    names = {getattr(c["fn"], "__name__", None) or c["fn"].fn.__name__ for c in compile_check.all_configs()}
    assert set(KERNEL_FUNCTIONS) <= names
    # the launchers' attention configs for every head dim / dtype / arch are in the list
    att = importlib.import_module("kernels.attention")
    listed = {(c["name"].split("[")[0], c["constexprs"].get("HEAD_DIM"), c["constexprs"].get("BLOCK_M"),
               c["constexprs"].get("BLOCK_N"), c["num_warps"], c["num_stages"]) for c in att._compile_configs()}
    for D in att.HEAD_DIMS:
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            for hopper in (False, True):
                for dropout in (False, True):
                    cfg = att._configs(D, dt, hopper, dropout)
                    for k in ("fwd", "dkdv", "dq"):
                        assert (f"attn_{'bwd_' if k != 'fwd' else ''}{k}", D, *cfg[k]) in listed


def _grads(fn, *inputs):
    ins = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*ins)
    ramp = torch.arange(out.numel(), device=out.device).reshape(out.shape)
    out.backward(torch.ones_like(out) * 0.5 + ramp % 3 * 0.1)
    return [out] + [t.grad for t in ins if t.requires_grad]


@pytest.mark.parametrize("op", ["layer_norm", "layer_norm_nobias", "bias_gelu", "bias_gelu_nobias", "attention"])
def test_torch_compile_fullgraph_each_op_matches_eager(device, op):
    torch._dynamo.reset()
    if op.startswith("layer_norm"):
        args = [torch.randn(2, 9, 100).to(device), torch.randn(100).to(device), torch.randn(100).to(device)]
        fn = (lambda x, w, b: kernels.layer_norm(x, w, b)) if op == "layer_norm" else \
             (lambda x, w, b: kernels.layer_norm(x, w, None) * b)
    elif op.startswith("bias_gelu"):
        args = [torch.randn(2, 9, 100).to(device), torch.randn(100).to(device)]
        fn = (lambda x, b: kernels.bias_gelu(x, b, "tanh")) if op == "bias_gelu" else \
             (lambda x, b: kernels.bias_gelu(x, None) + b)
    else:
        qkv = torch.randn(2, 17, 3, 2, 32).to(device)
        args = [qkv[:, :, i].transpose(1, 2) for i in range(3)]  # strided views, as in the model
        fn = lambda q, k, v: kernels.attention(q, k, v, causal=True)  # noqa: E731
    for a in args:
        a.requires_grad_()
    eager = _grads(fn, *args)
    compiled = _grads(torch.compile(fn, fullgraph=True), *args)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5)


def test_torch_compile_fullgraph_gpt_with_triton_kernels(device):
    from nanogpt.model import GPT, GPTConfig

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=65, kernels="triton"),
                device_type=torch.device(device).type).to(device)
    assert set(model.backends.values()) == {"triton"}
    idx = torch.randint(0, 65, (2, 32)).to(device)
    tgt = torch.randint(0, 65, (2, 32)).to(device)
    _, loss = model(idx, tgt)
    loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True)
    _, closs = compiled(idx, tgt)
    closs.backward()
    torch.testing.assert_close(closs, loss, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_torch_compile_fullgraph_gpt_with_dropout(device):
    """dropout > 0 runs in the kernels; the seed draw must not break a torch.compile(fullgraph=True) graph."""
    from nanogpt.model import GPT, GPTConfig

    torch._dynamo.reset()
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, block_size=32, vocab_size=65, dropout=0.2,
                          kernels="triton"), device_type=torch.device(device).type).to(device).train()
    idx = torch.randint(0, 65, (2, 32)).to(device)
    torch.manual_seed(3)
    _, loss = torch.compile(model, fullgraph=True, backend="aot_eager")(idx, idx)
    loss.backward()
    assert torch.isfinite(loss)
    torch.manual_seed(3)
    torch.testing.assert_close(model(idx, idx)[1], loss, atol=1e-5, rtol=1e-5)  # same seed, same masks
    assert all(p.grad is not None for p in model.parameters())
