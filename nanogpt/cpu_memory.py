"""CPU steps reuse their memory: glibc malloc keeps freed blocks instead of handing them back to the kernel.

A training step frees and allocates the same tensors every step. By default glibc serves big blocks with fresh
mmap()s and trims the top of its heap when they are freed (its thresholds adapt, but the step's sizes keep
crossing them), so the next step's tensors land on new pages: each first touch is a page fault and a 4 KiB
zeroing in the kernel. At the CPU quick start's shape that was 740-2,340 faults and 3.4-6.9 ms of system CPU
time per step (eager bf16 and compiled fp32; benchmarks/README.md, "Page faults"). With mmap and trim thresholds
far above any step's tensor the heap keeps its pages: RSS stays at the run's peak, as a CUDA caching allocator
keeps GPU memory, and a step faults ~0 times.

The CPU PyTorch wheels use glibc's malloc (no jemalloc/tcmalloc); under another allocator (LD_PRELOAD) or libc
this does nothing and says so.
"""
import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
KEEP_BYTES = 1 << 30  # blocks below 1 GiB come from the heap; the heap gives memory back above 1 GiB free at its top


def keep_freed_memory():
    """Set glibc's thresholds (process-wide; call once, before the model is built). Returns a one-line account
    of what was done, for the run's log."""
    preloaded = os.environ.get("LD_PRELOAD", "")
    if any(name in preloaded for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return f"CPU memory: left to the preloaded allocator ({preloaded})"
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own libc (find_library would run ldconfig)
    except (OSError, AttributeError):
        return "CPU memory: not glibc (no mallopt); freed memory goes back to the system as the allocator decides"
    if mallopt(M_MMAP_THRESHOLD, KEEP_BYTES) != 1 or mallopt(M_TRIM_THRESHOLD, KEEP_BYTES) != 1:
        return "CPU memory: glibc refused the thresholds; freed memory goes back to the system (page faults per step)"
    return (f"CPU memory: glibc keeps freed blocks below {KEEP_BYTES >> 30} GiB for reuse (no page faults per step; "
            "cpu_keep_memory=False: give them back)")
