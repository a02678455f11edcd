"""Shared helpers for the Triton backend: interpreter detection, re-jitting, launch heuristics."""
import functools
import os

import torch
import triton
import triton.language as tl


def interpreting():
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def jit_interprets():
    """Whether @triton.jit functions run in the interpreter: fixed when triton was first imported."""
    return type(tl.sum).__name__ == "InterpretedFunction"


def next_pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def num_sms(index=0):
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(index).multi_processor_count
    return 4


def sms_for(t):
    return num_sms(t.device.index or 0) if t.is_cuda else 4


TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
PTR_SIG = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def nan_like(shape, dtype, device):
    """Output buffers start as NaN under the interpreter (cheap there) or with NANOGPT_POISON=1 (the tests
    set it), so unwritten elements show up."""
    if interpreting() or os.environ.get("NANOGPT_POISON") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def rne_bf16(x, EMU: tl.constexpr):
    """Round fp32 to the nearest bf16 value (ties to even) when EMU; identity otherwise.

    Only the CPU interpreter needs it: its fp32 -> bf16 cast truncates, while GPUs round to nearest.
    """
    if EMU:
        b = x.to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        b = b & 0xFFFF0000
        x = b.to(tl.float32, bitcast=True)
    return x


def emu_bf16(dtype):
    """The EMU flag for rne_bf16: only under the interpreter and only for bf16 outputs."""
    return interpreting() and dtype == torch.bfloat16
