"""Every CUDA source (csrc/cuda/*.cu) compiles with nvcc for sm_80 and sm_90a, without a
register spill. Needs nvcc only (no GPU); prints registers/smem per kernel (pytest -s).

nvcc runs under ccache where it is installed (CI's CUDA stage installs it): a source, flag and nvcc that
compiled before replay that compile's output, ptxas's registers and spills included, instead of ~30 s of nvcc.
"""
import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_nvcc", ROOT / "csrc" / "check_nvcc.py")
check_nvcc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_nvcc)


@pytest.mark.skipif(check_nvcc.find_nvcc() is None, reason="nvcc is not on PATH (nor in CUDA_HOME)")
def test_cuda_sources_compile_without_spills(monkeypatch):
    launcher = ()
    if shutil.which("ccache"):
        launcher = ("ccache",)
        # the key holds the sources' paths relative to the checkout (any clone hits) and nvcc's version, not only
        # the mtime of /usr/local/bin/nvcc, which may be a wrapper script
        monkeypatch.chdir(ROOT)
        monkeypatch.setenv("CCACHE_BASEDIR", str(ROOT))
        monkeypatch.setenv("CCACHE_COMPILERCHECK", "%compiler% --version")
    ok, problems, kernels = check_nvcc.check(verbose=True, launcher=launcher)
    assert ok, "\n".join(problems)
    files = {k["file"] for k in kernels}
    assert files == {p.name for p in check_nvcc.CUDA_DIR.glob("*.cu")}, files  # each .cu has kernels
    assert {k["arch"] for k in kernels} == {"sm_80", "sm_90a"}
    assert all(k["regs"] is not None and k["regs"] <= 255 for k in kernels)
