"""nanogpt_kernels: the GPT's hot ops (attention, layer_norm, bias_gelu, adamw, linear_cross_entropy) in three
backends.

    torch   PyTorch's own ops, the reference (registry.py)
    triton  Triton kernels, one file per op (triton/)
    ext     the C++/CUDA extension nanogpt_kernels._C (csrc/ in the source tree; ext.py is its Python side)

The source folder is `kernels/`; it installs under the import name `nanogpt_kernels`, so it never shadows
Hugging Face's `kernels` package. It imports nothing from `nanogpt`. `python -m nanogpt_kernels` reports
what runs here.
"""
from nanogpt_kernels.registry import (BACKENDS, OPS, REGISTRY, KernelError, candidates, describe, get, parse,
                                      resolve, unavailable)

__all__ = ["BACKENDS", "OPS", "REGISTRY", "KernelError", "candidates", "describe", "get", "parse", "resolve",
           "unavailable"]
