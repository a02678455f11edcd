"""Triton kernels for the GPT's hot ops: the "triton" backend of the registry (nanogpt_kernels.registry).

Exports exactly the backend contract (nanogpt_kernels.contract):

    layer_norm(x, weight, bias=None, eps=1e-5)
    bias_gelu(x, bias=None, approximate="none")
    attention(q, k, v, causal=True, scale=None, dropout_p=0.0)
    FusedAdamW(params, lr, betas, eps, weight_decay, max_grad_norm=0.0)
    unavailable(device_type) -> str | None

One module per op (layer_norm, bias_gelu, attention, adamw) holds its Triton kernels, the
launcher and the autograd wrapper; the differentiable ops are torch.library custom ops in the
"nanogpt_triton" namespace, so torch.compile(fullgraph=True) traces through them. Importing
this package never fails when Triton is missing: `unavailable()` then says why.
"""
import os

__all__ = ["layer_norm", "bias_gelu", "attention", "FusedAdamW", "unavailable"]

try:
    import triton  # noqa: F401
    _IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the environment
    _IMPORT_ERROR = f"triton is not installed ({e})"

if _IMPORT_ERROR is None:
    from nanogpt_kernels.triton.adamw import FusedAdamW
    from nanogpt_kernels.triton.attention import attention
    from nanogpt_kernels.triton.bias_gelu import bias_gelu
    from nanogpt_kernels.triton.layer_norm import layer_norm
else:  # pragma: no cover
    def _missing(*args, **kwargs):
        raise RuntimeError(f"nanogpt_kernels.triton: {_IMPORT_ERROR}")

    layer_norm = bias_gelu = attention = _missing

    class FusedAdamW:  # noqa: D101
        def __init__(self, *args, **kwargs):
            _missing()


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
