"""Peak dense FLOP/s per accelerator, for model FLOPs utilization (MFU).

Dense (no sparsity) tensor-core peaks from the vendors' datasheets; fp32 is the
TF32 tensor-core rate where TF32 is allowed, else the plain fp32 rate.
"""
import torch

# name fragment (matched against torch.cuda.get_device_name) -> {dtype: FLOP/s}
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "A10G": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "RTX 4090": {"bf16": 165e12, "fp16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12},
    "RTX 3090": {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12},
    "V100": {"bf16": 0.0, "fp16": 125e12, "tf32": 15.7e12, "fp32": 15.7e12},
}
A100_BF16 = 312e12  # nanoGPT's fixed reference, used when the device is unknown


def peak_flops(dtype="bfloat16", device=None):
    """Peak FLOP/s of `device` (a CUDA device; None = current) for `dtype`, else nanoGPT's A100 bf16 figure."""
    key = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(str(dtype).replace("torch.", ""), "bf16")
    if key == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        key = "tf32"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        for frag, table in PEAK_FLOPS.items():  # ordered: "H100 PCIe" before "H100"
            if frag in name:
                return table[key] or A100_BF16
    return A100_BF16
