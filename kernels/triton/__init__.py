"""Triton kernels for the GPT's hot ops: the "triton" backend of the registry (nanogpt_kernels.registry).

One module per op (layer_norm.py, bias_gelu.py, attention.py, adamw.py, linear_cross_entropy.py) holds its
Triton kernels, the launcher and the autograd wrapper, meeting the contract (nanogpt_kernels.contract); the
registry names each op's function, so this package lists none. The differentiable ops are torch.library
custom ops, so torch.compile(fullgraph=True) traces through them. Importing this package never fails when
Triton is missing: `unavailable()` then says why.
"""
import os

try:
    import triton  # noqa: F401
    _IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the environment
    _IMPORT_ERROR = f"triton is not installed ({e})"


def unavailable(device_type):
    """None when the Triton kernels can run on `device_type` ("cuda" or "cpu"), else the reason."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    from nanogpt_kernels.triton._utils import jit_interprets

    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device_type == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "CUDA is not available"
        if interpret or jit_interprets():
            return "TRITON_INTERPRET=1 is set: the Triton interpreter runs on CPU tensors only"
        return None
    if device_type == "cpu":
        if not interpret:
            return "triton runs on CPU only with TRITON_INTERPRET=1"
        if not jit_interprets():
            return "TRITON_INTERPRET=1 was set after triton was imported; set it before importing triton"
        return None
    return f"Triton kernels do not run on device type {device_type!r}"
