"""Every CUDA source (csrc/cuda/*.cu) compiles with nvcc for sm_80 and sm_90a, without a
register spill. Needs nvcc only (no GPU); prints registers/smem per kernel (pytest -s)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_nvcc", ROOT / "csrc" / "check_nvcc.py")
check_nvcc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_nvcc)


@pytest.mark.skipif(check_nvcc.find_nvcc() is None, reason="nvcc is not on PATH (nor in CUDA_HOME)")
def test_cuda_sources_compile_without_spills():
    ok, problems, kernels = check_nvcc.check(verbose=True)
    assert ok, "\n".join(problems)
    files = {k["file"] for k in kernels}
    assert files == {p.name for p in check_nvcc.CUDA_DIR.glob("*.cu")}, files  # each .cu has kernels
    assert {k["arch"] for k in kernels} == {"sm_80", "sm_90a"}
    assert all(k["regs"] is not None and k["regs"] <= 255 for k in kernels)
