#!/usr/bin/env python
"""Compile every csrc/cuda/*.cu with nvcc for sm_80 and sm_90a (-Xptxas -v) and report
registers, shared memory and spills per kernel. Exits non-zero on a compile error or on any
register spill. Needs only nvcc (no GPU, no torch):

    python csrc/check_nvcc.py [--nvcc PATH] [--arch 80 --arch 90a] [--quiet]

tests/test_ext_nvcc.py runs the same check.
"""
import argparse
import concurrent.futures as cf
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CUDA_DIR = Path(__file__).resolve().parent / "cuda"
ARCHS = ("80", "90a")

_entry = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_props = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_used = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def find_nvcc(explicit=None):
    if explicit:
        return explicit
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _demangle(names):
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def compile_one(nvcc, src, archs=ARCHS, launcher=()):
    """-> (returncode, output text, [kernel dicts]); `launcher` prefixes the nvcc command (e.g. ccache)"""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [*launcher, nvcc, "-c", str(src), "-o", os.path.join(tmp, src.stem + ".o"), "-O3", "-std=c++17",
               *gencode, "-Xptxas", "-v"]
        p = subprocess.run(cmd, capture_output=True, text=True)
    text = p.stdout + p.stderr
    kernels, cur = [], None
    for line in text.splitlines():
        m = _entry.search(line)
        if m:
            cur = {"file": src.name, "kernel": m.group(1), "arch": m.group(2), "regs": None, "smem": 0,
                   "stack": 0, "spill_stores": 0, "spill_loads": 0}
            kernels.append(cur)
            continue
        if cur is None:
            continue
        m = _props.search(line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
            continue
        m = _used.search(line)
        if m and cur["regs"] is None:
            cur["regs"] = int(m.group(1))
            cur["smem"] = int(m.group(2) or 0)
    return p.returncode, text, kernels


def check(nvcc=None, archs=ARCHS, verbose=True, launcher=()):
    """Compile everything; returns (ok, problems, kernels). `launcher`: see compile_one."""
    nvcc = find_nvcc(nvcc)
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
    sources = sorted(CUDA_DIR.glob("*.cu"))
    problems, kernels = [], []
    with cf.ThreadPoolExecutor(max_workers=len(sources)) as ex:
        results = list(ex.map(lambda s: (s, compile_one(nvcc, s, archs, launcher)), sources))
    for src, (rc, text, ks) in results:
        if rc != 0 or re.search(r"\berror\b", text):
            problems.append(f"{src.name}: nvcc failed (exit {rc}):\n{text}")
        if not ks and rc == 0:
            problems.append(f"{src.name}: no kernels found in the ptxas output")
        for k in ks:
            if k["spill_stores"] or k["spill_loads"]:
                problems.append(f"{src.name}: {k['kernel']} ({k['arch']}) spills registers: "
                                f"{k['spill_stores']} bytes stores, {k['spill_loads']} bytes loads")
        kernels += ks
    if verbose:
        names = _demangle(sorted({k["kernel"] for k in kernels}))
        print(f"{'file':14s} {'arch':6s} {'regs':>4s} {'smem':>6s} {'stack':>5s} {'spill':>5s}  kernel")
        for k in kernels:
            short = re.sub(r"\(anonymous namespace\)::|ng::", "", names[k["kernel"]])
            short = short.replace("__nv_bfloat16", "bf16").replace("__half", "f16")
            short = re.sub(r"\(.*\)$", "", short)  # drop the parameter list
            print(f"{k['file']:14s} {k['arch']:6s} {k['regs']:4d} {k['smem']:6d} {k['stack']:5d} "
                  f"{k['spill_stores'] + k['spill_loads']:5d}  {short}")
        print(f"{len(kernels)} kernel builds, {len(sources)} files, archs {', '.join(archs)}: "
              + ("OK" if not problems else f"{len(problems)} problem(s)"))
        for p in problems:
            print("PROBLEM:", p)
    return not problems, problems, kernels


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nvcc")
    ap.add_argument("--arch", action="append", help="SASS arch, e.g. 80, 90a (default: 80 and 90a)")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()
    try:
        ok, _, _ = check(a.nvcc, tuple(a.arch or ARCHS), verbose=not a.quiet)
    except FileNotFoundError as e:
        print(e, file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
