"""Checks a CUDA build of nanogpt_kernels._C, on a machine without a GPU (.ci/cuda_build.sh runs it with the
CUDA venv's python, from outside the source tree): the module imports, says it has CUDA kernels, and every
nanogpt_ext op has a CUDA kernel exactly when the registry says the ext backend runs that op on CUDA."""
import sys

import torch

import nanogpt_kernels
from nanogpt_kernels import ext, registry


def expected_on_cuda(op_names):
    """The nanogpt_ext ops that need a CUDA kernel: all but those of registry ops whose ext implementation is
    limited to other devices (attention: attention, attention_fwd, attention_bwd) and ext.CPU_ONLY_OPS."""
    elsewhere = [op for op, spec in registry.REGISTRY.items()
                 if spec.impls["ext"].devices and "cuda" not in spec.impls["ext"].devices]
    return {n for n in op_names if not any(n == op or n.startswith(op + "_") for op in elsewhere)
            and n not in ext.CPU_ONLY_OPS}


def error_message_check():
    """A bad call's error message comes out whole (numbers included). A .so linked with its own static copy of
    libstdc++ truncates it after the first number, or crashes the process (seen on a GPU image; setup.py's
    _shared_libstdcxx). The CPU kernel shares the argument checks with the CUDA one."""
    p = torch.randn(10)
    try:
        torch.ops.nanogpt_ext.adamw_([p], [torch.randn(11)], [torch.zeros(10)], [torch.zeros(10)], [torch.zeros(())],
                                     torch.tensor(1e-3, dtype=torch.float64), torch.tensor(1.0),
                                     0.9, 0.95, 1e-8, 0.1, 1.0)
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        print(f"error message of a bad call: {msg}")
        if "grad 0 (Float, 11 elements) does not match its param (Float, 10)" not in msg:
            return f"a bad call's error message is cut short ({msg!r}): is libstdc++ linked statically?"
        return None
    return "adamw_ with a mismatched grad did not raise"


def main():
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPU present: {torch.cuda.is_available()}; "
          f"nanogpt_kernels from {nanogpt_kernels.__file__}")
    problems = []
    if torch.version.cuda is None:
        problems.append("this torch has no CUDA: the CUDA build was not checked")
    why = ext.unavailable("cuda")
    if why is not None:
        problems.append(f"ext backend on cuda: {why}")
    # ops defined by the extension: each has a CPU kernel (the reference every device has)
    ops = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("nanogpt_ext::")}
    on_cuda = {n for n in ops if torch._C._dispatch_has_kernel_for_dispatch_key(f"nanogpt_ext::{n}", "CUDA")}
    want = expected_on_cuda(ops)
    if not want:
        problems.append(f"no nanogpt_ext op is expected on CUDA (ops found: {sorted(ops)})")
    if want - on_cuda:
        problems.append(f"no CUDA kernel registered for {sorted(want - on_cuda)}")
    if on_cuda - want:
        problems.append(f"CUDA kernels registered for {sorted(on_cuda - want)}, which the registry says the ext "
                        "backend does not run on CUDA: update nanogpt_kernels.registry.REGISTRY")
    print(f"nanogpt_ext ops with a CUDA kernel: {', '.join(sorted(on_cuda)) or 'none'}")
    print(f"nanogpt_ext ops without (the ext backend runs them elsewhere only): {', '.join(sorted(ops - on_cuda)) or 'none'}")
    why = error_message_check()
    if why:
        problems.append(why)
    for p in problems:
        print("PROBLEM:", p, file=sys.stderr)
    print("CUDA build check:", "FAILED" if problems else "OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
