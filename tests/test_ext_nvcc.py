"""Every CUDA source (csrc/cuda/*.cu) compiles with nvcc for sm_80 and sm_90a, without a
register spill. Needs nvcc only (no GPU); prints registers/smem per kernel (pytest -s)."""
import importlib.util
import shutil
import subprocess
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


@pytest.mark.skipif(check_nvcc.find_nvcc() is None or shutil.which("c++") is None,
                    reason="needs nvcc's CUDA headers and a C++ compiler")
@pytest.mark.parametrize("src", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp")
                                        if "NANOGPT_WITH_CUDA" in p.read_text()))
def test_cuda_build_cpp_side_compiles_against_torch_headers(tmp_path, src):
    """Each C++ file with CUDA parts (NANOGPT_WITH_CUDA: the binding, the op files' CUDA registrations) type-checks
    against this torch's headers and the CUDA runtime headers (-fsyntax-only: a CPU torch has no CUDA libraries to link).
    A CPU wheel ships c10/cuda headers but not the generated c10/cuda/impl/cuda_cmake_macros.h: stub it."""
    import sysconfig

    from torch.utils import cpp_extension

    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    homes = [cpp_extension.CUDA_HOME, Path(check_nvcc.find_nvcc()).resolve().parents[1], "/usr/local/cuda"]
    cuda_include = next((Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime_api.h").exists()),
                        None)
    if cuda_include is None:
        pytest.skip(f"no CUDA toolkit include dir with cuda_runtime_api.h in {homes}")
    includes = [*cpp_extension.include_paths(), str(cuda_include), sysconfig.get_paths()["include"], str(tmp_path)]
    cmd = ["c++", "-std=c++20", "-fsyntax-only", "-DNANOGPT_WITH_CUDA", *(f"-I{d}" for d in includes),
           str(ROOT / src)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
