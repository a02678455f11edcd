"""How the trainer picks its kernels: the selector (nanogpt_kernels.registry) and the training precision.

The selector string (`GPTConfig.kernels`, `--kernels=...`) is one backend name for every op (`auto`,
`torch`, `triton`, `ext`) or a per-op list such as `attention:triton,layer_norm:torch`; ops not named take
`auto`. See nanogpt_kernels.registry for the ops and backends.
"""
import torch

from nanogpt_kernels.registry import KernelError, describe, resolve  # noqa: F401  (the trainer's entry points)


def cpu_native_bf16():
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                     "_is_amx_tile_supported"))


def auto_dtype(device_type, kernels="auto"):
    """`dtype=auto`: the faster training precision here with these kernels. CUDA: bfloat16 where the GPU has
    it, else float16. CPU: bfloat16 (autocast) where the CPU multiplies bf16 in hardware and attention runs on
    the extension's CPU kernel (torch's own CPU attention backward is slow in bf16), else float32."""
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    fast = device_type == "cpu" and cpu_native_bf16() and resolve(kernels, "cpu")["attention"] == "ext"
    return "bfloat16" if fast else "float32"
