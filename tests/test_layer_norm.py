"""layer_norm on every backend (tests/conftest.py's `backend`) against float64, forward and every gradient.

Runs on the test device (NANOGPT_TEST_DEVICE): Triton on CPU through its interpreter (tests/conftest.py turns it
on), or compiled on CUDA. Outputs are NaN-poisoned before the kernels write them (NANOGPT_POISON=1), so an
element a kernel forgets to write fails the budget check.
"""
import sys

import pytest
import torch
import torch.nn.functional as F

from budget import ISA_DTYPES, check_bf16_out_is_the_cast, check_compiled, check_op, rand_input

OP = "layer_norm"

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (activation, parameter) dtypes: the same, or fp32 parameters with low-precision activations (autocast)
SAME = [(F32, F32), (F16, F16), (BF16, BF16)]
DTYPES = SAME + [(F16, F32), (BF16, F32)]
# (shape, bias, dtypes) for every backend: N a multiple of 16 and odd tails, one row, few and many, tiny and wide N
CASES = ([((2, 17, n), True, d) for n in (768, 1000, 1023) for d in SAME]
         + [(s, False, d) for s in ((1, 1, 1000), (3, 37, 100)) for d in SAME]
         + [((5, 7), True, SAME[0]), ((9, 4099), True, SAME[0])] + [((2, 17, 1000), True, d) for d in DTYPES[3:]])
# every row count x N x bias x dtypes: how the CPU kernels split rows over threads and vectorize tails
GRID = [((m, n), bias, d) for m in (1, 17, 100) for n in (768, 1000, 1023) for bias in (True, False) for d in DTYPES]


def case_id(case):
    shape, bias, dtypes = case
    return f"{shape}-{'bias' if bias else 'nobias'}-" + "/".join(str(t)[6:] for t in dtypes)


def torch_layer_norm(x, weight, bias, eps=1e-5):
    """PyTorch's op in these dtypes; fp32 parameters mean fp32 math on the upcast input (autocast)."""
    return F.layer_norm(x.to(weight.dtype), (x.shape[-1],), weight, bias, eps).to(x.dtype)


def skip_unsupported(backend, device, dtypes):
    """Skip, with the reason, dtype pairs a backend does not take (also used by test_bias_gelu.py)."""
    if backend == "ext" and torch.device(device).type == "cpu" and torch.float16 in dtypes:
        pytest.skip("the extension's CPU kernels take float32 and bfloat16")
    if backend == "torch" and dtypes[0] != dtypes[1]:
        pytest.skip("fp32 parameters with low-precision activations are our kernels' autocast path; the torch "
                    "reference leaves them to autocast (fp32 throughout)")


def check(impl, backend, device, shape, bias, dtypes):
    skip_unsupported(backend, device, dtypes)
    act, par = dtypes
    N = shape[-1]
    x = (torch.randn(shape) * 2 + 0.5).to(device, act).requires_grad_()
    w = (torch.randn(N) * 0.5 + 1).to(device, par).requires_grad_()
    b = (torch.randn(N) * 0.3).to(device, par).requires_grad_() if bias else None
    check_op(f"layer_norm[{backend}] {shape} {act}/{par}", lambda *a: impl(*a, 1e-5), torch_layer_norm,
             dict(x=x, weight=w, bias=b), torch.randn(shape).to(device, act))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_layer_norm_matches_float64(impl, backend, device, case):
    check(impl, backend, device, *case)


@pytest.mark.backends("triton", "ext")  # the torch reference is the budget's own baseline
@pytest.mark.compiled_only("a grid of 90 cases")
@pytest.mark.parametrize("case", GRID, ids=case_id)
def test_layer_norm_grid_matches_float64(impl, backend, device, case):
    check(impl, backend, device, *case)


@pytest.mark.parametrize("out_dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_layer_norm_out_dtype_matches_float64(impl, backend, device, out_dtype, bias):
    """The autocast path: fp32 x and parameters, the output (and its gradient) in the dtype the next matmul takes."""
    shape = (3, 37, 1000)
    x = (torch.randn(shape) * 2 + 0.5).to(device).requires_grad_()
    w = (torch.randn(1000) * 0.5 + 1).to(device).requires_grad_()
    b = (torch.randn(1000) * 0.3).to(device).requires_grad_() if bias else None

    def torch_fn(x, w, b):  # float64 inputs: the reference, float64 throughout
        y = F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)
        return y if x.dtype == torch.float64 else y.to(out_dtype)

    check_op(f"layer_norm[{backend}] out_dtype={out_dtype}", lambda x, w, b: impl(x, w, b, 1e-5, out_dtype=out_dtype),
             torch_fn, dict(x=x, weight=w, bias=b), torch.randn(shape).to(device, out_dtype))


# (x, add, out_dtype): the autocast block (fp32 stream, bf16 branch, bf16 output), and one dtype throughout
ADD_CASES = [(F32, BF16, BF16), (F32, F32, None), (BF16, BF16, None)]


def add_case_id(case):
    return "/".join(str(t)[6:] for t in case)


@pytest.mark.parametrize("case", ADD_CASES, ids=add_case_id)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("uses", ["both", "s", "y"])
def test_layer_norm_add_matches_float64(impl, backend, device, case, bias, uses):
    """layer_norm(x, ..., add=a) = (x + a, LayerNorm(x + a)): both outputs (or one of them, the other unused) and
    the gradients of x, a, weight and bias against float64, for odd rows and width."""
    xd, ad, out_dtype = case
    shape = (2, 17, 1023)
    x = (torch.randn(shape) * 2 + 0.5).to(device, xd).requires_grad_()
    a = torch.randn(shape).to(device, ad).requires_grad_()
    w = (torch.randn(1023) * 0.5 + 1).to(device, xd).requires_grad_(uses != "s")  # (y unused: no weight grads)
    b = (torch.randn(1023) * 0.3).to(device, xd).requires_grad_(uses != "s") if bias else None

    def outputs(s, y):  # one tensor for check_op: what the block goes on with
        if uses == "s":
            return s
        return y if uses == "y" else torch.cat([s.flatten(), y.flatten().to(s.dtype)])

    def torch_fn(x, a, w, b):  # PyTorch's x + a and F.layer_norm (float64 inputs: the reference)
        s = x + a
        y = F.layer_norm(s, (1023,), w, b, 1e-5)
        return outputs(s, y if x.dtype == torch.float64 or out_dtype is None else y.to(out_dtype))

    n = {"both": 2, "s": 1, "y": 1}[uses] * x.numel()
    grad_dtype = ad if uses == "y" and out_dtype else xd
    check_op(f"layer_norm[{backend}] add {add_case_id(case)} uses {uses}",
             lambda x, a, w, b: outputs(*impl(x, w, b, 1e-5, out_dtype=out_dtype, add=a)), torch_fn,
             dict(x=x, add=a, weight=w, bias=b), torch.randn(n).reshape(-1 if uses == "both" else shape)
             .to(device, grad_dtype))


def test_layer_norm_grads_are_deterministic(impl, device):
    x = torch.randn(64, 768).to(device).requires_grad_()
    w = torch.randn(768).to(device).requires_grad_()
    b = torch.randn(768).to(device).requires_grad_()
    dy = torch.randn(64, 768).to(device)
    grads = []
    for _ in range(2):
        x.grad = w.grad = b.grad = None
        impl(x, w, b).backward(dy)
        grads.append([x.grad.clone(), w.grad.clone(), b.grad.clone()])
    assert all(torch.equal(g0, g1) for g0, g1 in zip(*grads))


def test_layer_norm_non_contiguous_input(impl, device):
    x = torch.randn(8, 2, 64).to(device).transpose(0, 1)  # rows not contiguous across the reshape
    w, b = torch.randn(64).to(device), torch.randn(64).to(device)
    y = impl(x, w, b)
    assert y.shape == x.shape
    torch.testing.assert_close(y, F.layer_norm(x, (64,), w, b), atol=1e-5, rtol=1e-5)


@pytest.mark.backends("triton", "ext")
@pytest.mark.compiled_only("12288 rows")
def test_layer_norm_many_rows_matches_float64(impl, backend, device):
    """GPT-2's 12 x 1024 rows: the column sums (dweight, dbias) over hundreds of row chunks within budget (an fp32 running
    sum over the chunks was not: up to 4.6x PyTorch's error at 12288 x 3072 bf16, on CPU and on an H200)."""
    check(impl, backend, device, (12288, 768), True, DTYPES[-1])

@pytest.mark.backends("triton", "ext")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_layer_norm_torch_compile_fullgraph_matches_eager(impl, device, bias):
    x, w, b = (torch.randn(*s).to(device).requires_grad_() for s in ((2, 9, 100), (100,), (100,)))
    check_compiled((lambda x, w, b: impl(x, w, b)) if bias else (lambda x, w, b: impl(x, w, None) * b), x, w, b)


@pytest.mark.backends("triton")
@pytest.mark.cpu_only("on CUDA every test already runs the GPU block config")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_gpu_block_config(impl, backend, device, monkeypatch, dtype):
    """The interpreter normally gets tall blocks; run the exact GPU rows-per-program choice too."""
    monkeypatch.setattr(sys.modules["nanogpt_kernels.triton.layer_norm"], "interpreting", lambda: False)
    check(impl, backend, device, (2, 17, 768), True, (dtype, dtype))
    check(impl, backend, device, (3, 5, 100), False, (dtype, dtype))


@pytest.mark.backends("ext")
@pytest.mark.cpu_only("CPU threading")
def test_layer_norm_ext_does_not_depend_on_thread_count(impl, same_at_thread_counts):
    same_at_thread_counts(impl, torch.randn(1000, 768), torch.randn(768), torch.randn(768),
                          grad_out=torch.randn(1000, 768))


@pytest.mark.backends("ext")
def test_layer_norm_ext_bad_inputs_raise_clear_errors(backend, device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.nanogpt_ext.layer_norm_fwd(x, torch.ones(7, device=device), None, 1e-5)
    with pytest.raises(RuntimeError, match="unsupported dtypes|dtype"):
        torch.ops.nanogpt_ext.layer_norm_fwd(x.double(), torch.ones(8, device=device).double(), None, 1e-5)


# ---------------------------------------------------------------- the extension's CPU kernel, every ISA clone

@pytest.mark.cpu_only("the ISA clones are the CPU kernels'")
@pytest.mark.parametrize("dtype", ISA_DTYPES)
def test_ext_layer_norm_every_cpu_isa(isa, dtype):
    x, w, b = rand_input(3, 37, 1023, dtype=dtype, scale=2.0), rand_input(1023, dtype=dtype), rand_input(1023, dtype=dtype)
    check_op(f"layer_norm {isa}", lambda x, w, b: torch.ops.nanogpt_ext.layer_norm(x, w, b, 1e-5),
             lambda x, w, b: F.layer_norm(x, (1023,), w, b, 1e-5), {"x": x, "weight": w, "bias": b},
             rand_input(3, 37, 1023, dtype=dtype, grad=False))


@pytest.mark.cpu_only("the ISA clones are the CPU kernels'")
def test_ext_layer_norm_bf16_output_is_the_cast_fp32_output_every_cpu_isa(isa):
    """out_dtype=bf16 from fp32 x (autocast): the model's values are those without out_dtype."""
    check_bf16_out_is_the_cast(lambda x, w, b, out: torch.ops.nanogpt_ext.layer_norm(x, w, b, 1e-5, out),
                               [rand_input(3, 37, 1023, dtype=F32, scale=2.0), rand_input(1023, dtype=F32),
                                rand_input(1023, dtype=F32)], rand_input(3, 37, 1023, dtype=BF16, grad=False))


@pytest.mark.cpu_only("the ISA clones are the CPU kernels'")
@pytest.mark.parametrize("case", ADD_CASES, ids=add_case_id)
def test_ext_layer_norm_add_is_the_unfused_path_every_cpu_isa(isa, case):
    """The fused residual add gives bitwise what x + a and the kernel's LayerNorm give, outputs and gradients, with
    the gradient of s (x + a) from its other uses, and without one."""
    xd, ad, out_dtype = case
    for with_ds in (True, False):
        runs = []
        for fused in (True, False):
            torch.manual_seed(0)
            x, a = rand_input(3, 37, 1023, dtype=xd, scale=2.0), rand_input(3, 37, 1023, dtype=ad)
            w, b = rand_input(1023, dtype=F32), rand_input(1023, dtype=F32)
            if fused:
                s, y = torch.ops.nanogpt_ext.add_layer_norm(x, a, w, b, 1e-5, out_dtype)
            else:
                s = x + a
                y = torch.ops.nanogpt_ext.layer_norm(s, w, b, 1e-5, out_dtype)
            dy, ds = rand_input(*y.shape, dtype=y.dtype, grad=False), rand_input(*s.shape, dtype=s.dtype, grad=False)
            torch.autograd.backward([s, y] if with_ds else [y], [ds, dy] if with_ds else [dy])
            runs.append([s, y, x.grad, a.grad, w.grad, b.grad])
        for name, f, u in zip(["s", "y", "dx", "da", "dw", "db"], *runs):
            assert f.dtype == u.dtype and torch.equal(f, u), f"{name} (ds given: {with_ds})"


@pytest.mark.backends("ext")
def test_layer_norm_add_compiles_fullgraph(impl, device):
    x, a, w = (torch.randn(*s).to(device).requires_grad_() for s in ((2, 9, 100), (2, 9, 100), (100,)))
    check_compiled(lambda x, a, w: torch.cat([t.flatten() for t in impl(x, w, None, add=a)]), x, a, w)
