"""Builds the C++/CUDA extension `nanogpt_kernels._C`; the package metadata is in pyproject.toml.

The build imports torch, so install into an environment that already has torch, without build
isolation (otherwise pip would build in a fresh environment with a torch of its own):

    pip install --no-build-isolation -e .        # or: pip install --no-build-isolation .

Sources are found by glob, so a new op's file needs no edit here: csrc/*.cpp and csrc/cpu/*.cpp
always (with CUDA, compiled with NANOGPT_WITH_CUDA: each op file then registers its CUDA kernels too), and
with CUDA the torch-free csrc/cuda/*.cu (compiled by nvcc on their own and linked in).

Environment variables (1/0; unset = auto):
    NANOGPT_BUILD_EXT   build the C++ extension (auto: when torch and a C++ compiler are there;
                        a failed auto build prints a warning and installs the pure-Python package)
    NANOGPT_BUILD_CUDA  compile the CUDA kernels in (auto: when torch has CUDA and nvcc is found)
    NANOGPT_CUDA_ARCHS  nvcc SASS targets, default "80;90a" (plus PTX of the last, e.g. compute_90)
    MAX_JOBS            parallel compile jobs (torch's ninja builder and the nvcc step)
    PYTORCH_NVCC        the nvcc command, as for torch's own builds (e.g. "ccache /usr/local/cuda/bin/nvcc")
A build asked for by NANOGPT_BUILD_EXT=1 or NANOGPT_BUILD_CUDA=1 that cannot be made is an error.
"""
import concurrent.futures as cf
import glob
import os
import shlex
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    v = os.environ.get(name, "").strip().lower()
    if v in ("", "auto"):
        return None
    return v not in ("0", "false", "no", "off")


def _warn(msg):
    bar = "=" * 78
    print(f"\n{bar}\nWARNING (nanogpt): {msg}\n{bar}\n", file=sys.stderr, flush=True)


def _sources(*patterns):
    # relative to this file: setuptools wants relative source paths
    return [p for pat in patterns for p in sorted(glob.glob(pat, root_dir=HERE))]


def _shared_libstdcxx():
    """The shared C++ runtime (libstdc++.so.6, by the path the compiler finds), named on the link line ahead of
    the compiler's own -lstdc++. A toolchain that links libstdc++.a instead (LDFLAGS=-static-libstdc++, or no
    libstdc++.so development link) puts a second copy of the runtime in our .so whose locale ids differ from the
    copy torch loaded: formatting any error message (TORCH_CHECK) then crashed the process (seen on a GPU image).
    Named first, the shared library resolves every symbol and the archive adds nothing."""
    cxx = shlex.split(os.environ.get("CXX", "c++"))
    try:
        path = subprocess.run([*cxx, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return []
    return [path] if os.path.isabs(path) and os.path.exists(path) else []


def _extension():
    """(ext_modules, cmdclass) for nanogpt_kernels._C, or ([], {}) when it is skipped."""
    want = _env_flag("NANOGPT_BUILD_EXT")
    want_cuda = _env_flag("NANOGPT_BUILD_CUDA")
    required = bool(want or want_cuda)
    if want is False:
        if want_cuda:
            raise RuntimeError("NANOGPT_BUILD_CUDA=1 asks for the CUDA kernels but NANOGPT_BUILD_EXT=0 skips the extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension as ce
    except ImportError as e:
        msg = (f"torch is not importable at build time ({e}); the C++ extension nanogpt_kernels._C is not built. "
               "Install torch first, then `pip install --no-build-isolation -e .`")
        if required:
            raise RuntimeError("NANOGPT_BUILD_EXT=1 / NANOGPT_BUILD_CUDA=1: " + msg) from e
        _warn(msg)
        return [], {}

    nvcc = os.path.join(ce.CUDA_HOME, "bin", "nvcc") if ce.CUDA_HOME else None
    can_cuda = torch.version.cuda is not None and nvcc is not None and os.path.exists(nvcc)
    if want_cuda and not can_cuda:
        raise RuntimeError(f"NANOGPT_BUILD_CUDA=1 but torch has no CUDA (torch.version.cuda={torch.version.cuda}) "
                           f"or nvcc was not found (CUDA_HOME={ce.CUDA_HOME})")
    with_cuda = can_cuda if want_cuda is None else want_cuda

    msvc = sys.platform == "win32"
    # -fno-math-errno: sqrtf in a loop (AdamW's update) vectorizes only without its errno branch (nothing
    # reads errno; sqrt is correctly rounded either way, so no result changes)
    cxx = ["/O2", "/std:c++17"] if msvc else ["-O3", "-fopenmp-simd", "-fno-math-errno", "-Wno-unknown-pragmas"]
    # -g0: Python's build flags ask for debug info (-g), which took a third of the compile time (attention.cpp 76 s
    # -> 53 s on a 2-core Xeon) and made the .so 38 MB; symbols stay, so perf still names every kernel. A -g in the
    # user's own CFLAGS/CXXFLAGS keeps it.
    user_flags = shlex.split(os.environ.get("CFLAGS", "") + " " + os.environ.get("CXXFLAGS", ""))
    if not msvc and not any(f.startswith("-g") for f in user_flags):
        cxx.append("-g0")
    link = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        # at::parallel_for is inlined from ATen's headers as `#pragma omp parallel`: without
        # -fopenmp it silently runs on one thread. The .so then needs libgomp.so.1, which is the
        # runtime torch itself has loaded (same soname), so there is one OpenMP pool.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if sys.platform.startswith("linux"):
        link += _shared_libstdcxx()
    sources = _sources("csrc/*.cpp", "csrc/cpu/*.cpp")
    if with_cuda:
        ext = ce.CUDAExtension("nanogpt_kernels._C", sources,
                               extra_compile_args={"cxx": cxx + ["-DNANOGPT_WITH_CUDA"]}, extra_link_args=link)
        ext.nanogpt_cu = _sources("csrc/cuda/*.cu")  # compiled by nvcc directly (see BuildExt) and linked in
        ext.nanogpt_nvcc = shlex.split(os.environ.get("PYTORCH_NVCC", "")) or [nvcc]
    else:
        ext = ce.CppExtension("nanogpt_kernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
        ext.nanogpt_cu = []

    class BuildExt(ce.BuildExtension):
        def finalize_options(self):
            super().finalize_options()
            # objects kept in the checkout's build/ (pip's editable builds use a fresh temporary one): with ninja
            # (a dependency) a reinstall recompiles only what changed, so re-running the quick start is fast
            self.build_temp = os.path.join(HERE, "build", "temp")

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any build failure: install without the extension
                if required:
                    raise
                _warn(f"building the C++ extension nanogpt_kernels._C failed ({type(e).__name__}: {e}). nanogpt installs "
                      "without it and the 'ext' kernels backend reports itself unavailable. Set "
                      "NANOGPT_BUILD_EXT=1 to make this an error, NANOGPT_BUILD_EXT=0 to skip the build.")
                self.extensions = []  # nothing to copy or install

        def build_extension(self, ext):
            if ext.nanogpt_cu:
                ext.extra_objects = list(ext.extra_objects or []) + self._nvcc(ext)
            super().build_extension(ext)

        def _nvcc(self, ext):
            archs = [a.strip() for a in os.environ.get("NANOGPT_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
                     if a.strip()]
            flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
            ptx = archs[-1].rstrip("af")  # portable PTX (no arch-specific 'a'/'f' features) for newer GPUs
            flags.append(f"-gencode=arch=compute_{ptx},code=compute_{ptx}")
            out_dir = os.path.join(os.path.abspath(self.build_temp), "nvcc")
            os.makedirs(out_dir, exist_ok=True)

            def compile_one(src):
                obj = os.path.join(out_dir, os.path.basename(src) + (".obj" if msvc else ".o"))
                cmd = [*ext.nanogpt_nvcc, "-c", os.path.join(HERE, src), "-o", obj, "-O3", "-std=c++17",
                       "-lineinfo", *flags]
                if not msvc:
                    cmd += ["-Xcompiler", "-fPIC"]
                print(" ".join(cmd), flush=True)
                subprocess.check_call(cmd)
                return obj

            # one nvcc per file, in parallel like torch's ninja build of the .cpp files
            jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
            with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
                return list(pool.map(compile_one, ext.nanogpt_cu))

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
