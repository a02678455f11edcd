"""How a clone of the extension's CPU kernels is chosen (csrc/cpu/isa_clones.h: x86-64-v4, x86-64-v3, the
baseline): set_cpu_isa, and NANOGPT_CPU_ISA, read at import (so checked in a subprocess). Each op's kernels are
checked on every clone this CPU runs in the op's own test module (test_<op>.py, the `isa` fixture)."""
import os
import subprocess
import sys

import pytest

from nanogpt_kernels import ext

C = ext._C  # None when the extension is not built: every test here then fails, saying why


@pytest.fixture(autouse=True)
def _built():
    if C is None:
        pytest.fail(f"the CPU kernels' tests need the extension: {ext.unavailable('cpu')}")


ISAS = C.cpu_isas() if C else []


def test_set_cpu_isa_rejects_unknown_and_unrunnable_clones():
    before = C.cpu_isa()
    with pytest.raises(ValueError, match=r"set_cpu_isa\('avx9000'\): unknown CPU kernel clone") as e:
        C.set_cpu_isa("avx9000")
    assert "\n" not in str(e.value) and ", ".join(ISAS) in str(e.value)
    for name in {"x86-64-v4", "x86-64-v3"} - set(ISAS):  # a clone this CPU (or build) cannot run
        with pytest.raises(ValueError, match="cannot run the " + name):
            C.set_cpu_isa(name)
    assert C.cpu_isa() == before


def _import_with(env_value):
    code = "import torch, nanogpt_kernels._C as C; print(C.cpu_isa())"  # torch first: it loads libc10
    env = dict(os.environ, NANOGPT_CPU_ISA=env_value)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_env_var_forces_a_clone_and_a_bad_one_fails_the_import():
    r = _import_with(ISAS[-1])
    assert r.returncode == 0 and r.stdout.strip() == ISAS[-1], r.stderr[-2000:]
    r = _import_with("bogus")
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: NANOGPT_CPU_ISA=bogus: unknown CPU kernel clone"), r.stderr[-2000:]
    assert ", ".join(ISAS) in last and "Unset NANOGPT_CPU_ISA" in last
