"""The kernel tests' error budgets, all built on nanogpt_kernels.contract.budget.

One op call: `check_op` runs the op and its backward on the test inputs, PyTorch's op on the same inputs in float64
(the reference) and in the inputs' own dtypes, and requires every output and gradient of ours to be within
`budget`: 2x PyTorch's own error plus a unit roundoff at the output's scale.

Under torch.compile: `check_compiled` requires the compiled graph to give what eager gives.

A run of many steps (training, optimizer steps): `drift` bounds how far two float32 runs of the same recurrence,
rounded in different orders, may move apart; it grows with the number of steps, so it holds on any CPU or GPU.
"""
import torch

from nanogpt_kernels.contract import max_err, within_budget

ISA_DTYPES = [torch.float32, torch.bfloat16]  # what the extension's CPU kernels take, checked on every clone


def rand_input(*shape, dtype, scale=1.0, grad=True):
    """Fresh standard-normal values times `scale`, in `dtype`, a leaf that requires grad unless told not to."""
    return (torch.randn(*shape) * scale).to(dtype).requires_grad_(grad)


def assert_within_budget(name, out, torch_out, ref64, dtype, scale_hint=0.0):
    """`out` is within the contract's budget for `dtype` against `ref64`; `torch_out` is PyTorch's own result."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)}, want {tuple(ref64.shape)}"
    ok, err, tol = within_budget(out, torch_out, ref64, dtype, scale_hint)
    assert ok, (f"{name}: error {err:.3g} vs float64 exceeds budget {tol:.3g} "
                f"(torch {max_err(torch_out, ref64):.3g}, dtype {dtype})")


def check_op(name, fn, torch_fn, inputs, grad_out, scale_hints=None):
    """fn(*inputs.values()) and its gradients against torch_fn's in float64, within the budget of each one's dtype.

    inputs: {name: tensor or None}; gradients are checked for those that require grad, as "d<name>".
    torch_fn: PyTorch's op as it runs in the inputs' dtypes (e.g. fp32 math on an upcast bf16 input when the
    parameters are fp32, as under autocast); it must also run in float64, and gives the dtypes ours must have.
    scale_hints: {output name: scale_hint} for outputs that cancel to ~0 (see contract.budget).
    """
    def run(f, cast):
        args = [None if t is None else cast(t).detach().requires_grad_(t.requires_grad) for t in inputs.values()]
        out = f(*args)
        out.backward(cast(grad_out))
        return [out] + [a.grad for a in args if a is not None and a.requires_grad]

    ours = run(fn, lambda t: t)
    ref = run(torch_fn, torch.Tensor.double)
    theirs = run(torch_fn, torch.Tensor.clone)
    names = ["out"] + [f"d{k}" for k, t in inputs.items() if t is not None and t.requires_grad]
    for key, o, t, r in zip(names, ours, theirs, ref):
        assert o.dtype == t.dtype, f"{name} {key}: dtype {o.dtype}, want {t.dtype}"
        assert_within_budget(f"{name} {key}", o, t, r, t.dtype, (scale_hints or {}).get(key, 0.0))


def check_bf16_out_is_the_cast(norm, inputs, dy):
    """norm(*inputs, out_dtype) from fp32 inputs: out_dtype=bf16 gives exactly the bf16 cast of the fp32 output, and
    a bf16 dy exactly the gradients of that dy in fp32 (the kernels round as a cast would, and read dy as given)."""
    runs = []
    for out_dtype in (None, torch.bfloat16):
        ins = [t.detach().clone().requires_grad_() for t in inputs]
        y = norm(*ins, out_dtype)
        assert y.dtype == (out_dtype or torch.float32)
        y.backward(dy.to(y.dtype))
        runs.append([y.bfloat16()] + [t.grad for t in ins])
    for i, (a, c) in enumerate(zip(*runs)):
        assert torch.equal(a, c), "output" if i == 0 else f"grad of input {i - 1}"


def check_compiled(fn, *inputs):
    """torch.compile(fn, fullgraph=True) gives eager's output and input gradients: the ops' fake kernels and
    autograd registration trace without graph breaks, and the compiled code around them computes the same."""
    def run(f):
        ins = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        out = f(*ins)
        ramp = torch.arange(out.numel(), device=out.device).reshape(out.shape)
        out.backward(torch.ones_like(out) * 0.5 + ramp % 3 * 0.1)
        return [out] + [t.grad for t in ins if t.requires_grad]

    torch._dynamo.reset()
    for e, c in zip(run(fn), run(torch.compile(fn, fullgraph=True))):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-5)


def drift(steps, scale, dtype=torch.float32, ulps=2.0):
    """How far two `dtype` runs of `steps` steps of the same computation may drift apart at values of size `scale`.

    Each step rounds differently in the two runs (another summation order, FMA or not, another SIMD width), by a
    few units roundoff of the values it produces; a step carries the difference before it on, neither damped nor
    (for these well-conditioned steps) amplified. So the differences add up, at worst linearly in the steps:
    `ulps` units roundoff at `scale` per step. A fixed tolerance instead is one machine's observed drift.
    """
    return steps * ulps * torch.finfo(dtype).eps * scale


def assert_drift(name, ours, ref, steps, scale=None):
    """`ours` is within `drift` of `ref` after `steps` steps, at `scale`: the largest magnitude the values had on
    the way (default: `ref`'s largest value now, which can be far below it, e.g. a moment that has decayed)."""
    tol = drift(steps, ref.detach().abs().max().item() if scale is None else scale, ref.dtype)
    err = (ours.detach() - ref.detach()).abs().max().item()
    assert err <= tol, f"{name}: {err:.3g} from the reference after {steps} steps, more than {tol:.3g}"
