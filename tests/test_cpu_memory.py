"""nanogpt.cpu_memory: with glibc's thresholds set, a loop that frees and reallocates big tensors stops faulting."""
import subprocess
import sys
import textwrap

import pytest

from nanogpt import cpu_memory

LOOP = textwrap.dedent("""
    import resource, sys, torch
    from nanogpt import cpu_memory
    if sys.argv[1] == "keep":
        print(cpu_memory.keep_freed_memory())
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):  # warm: the heap grows to its working size (faults either way)
        torch.ones(10 << 20).sum()
    f0 = faults()
    for i in range(10):  # 40 MiB: above glibc's largest adaptive mmap threshold (32 MiB), so mmapped by default
        torch.ones(10 << 20).sum()
    print("FAULTS", (faults() - f0) // 10)
""")


def faults_per_iter(mode):
    out = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True, check=True).stdout
    return out, int(out.split("FAULTS")[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_kept_memory_stops_the_page_faults():
    _, default = faults_per_iter("default")
    out, kept = faults_per_iter("keep")
    assert "glibc keeps freed blocks" in out
    assert default > 5000, default  # 40 MiB is 10,240 pages: each iteration faults them in again
    assert kept < 100, kept


def test_a_preloaded_allocator_is_left_alone(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert cpu_memory.keep_freed_memory() == ("CPU memory: left to the preloaded allocator "
                                              "(/usr/lib/x86_64-linux-gnu/libjemalloc.so.2)")
