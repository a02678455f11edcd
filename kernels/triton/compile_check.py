"""Compile every Triton kernel of the backend for real GPU targets, without a GPU.

    python -m nanogpt_kernels.triton.compile_check [--arch 80 90] [--sample N] [--filter SUBSTR] [-j JOBS]

The kernels are those of the registry's triton ops: each op's module lists its launch configurations in
`_compile_configs()`. For each launch configuration the launchers can produce (block sizes, num_warps, num_stages,
dtypes, constexpr flags), runs `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`
through ptxas, and prints registers, shared memory and spills per kernel. Fails (exit 1) on any
compile error or shared memory above the architecture's per-block limit; spills are flagged
WARN (failures with --fail-on-spills).
Registers / spills come from `ptxas -v` on the generated PTX (cuobjdump as a fallback); shared
memory is Triton's own allocation from the kernel metadata.
"""
import argparse
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

# max dynamic shared memory per block (bytes) per compute capability
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


# Triton kernels outside the registry's ops: Muon's X·Xᵀ (nanogpt.muon measures it against torch.bmm)
NON_OP_MODULES = ("nanogpt_kernels.triton.ns_gram",)


def triton_modules():
    """The modules of the registry's triton ops, each once, and NON_OP_MODULES."""
    from nanogpt_kernels import registry

    names = [spec.impls["triton"].target.partition(":")[0] for spec in registry.REGISTRY.values()
             if "triton" in spec.impls]
    return [importlib.import_module(name) for name in dict.fromkeys(names + list(NON_OP_MODULES))]


def all_configs():
    return [c for mod in triton_modules() for c in mod._compile_configs()]


def _evenly(items, n):
    """n items spread evenly over the list, first and last included."""
    n = min(n, len(items))
    if n <= 1:
        return items[-1:]
    return [items[i] for i in sorted({round(i * (len(items) - 1) / (n - 1)) for i in range(n)})]


def sample_tasks(tasks, per_kernel):
    """Up to `per_kernel` (config, cc) tasks per kernel function and architecture, evenly spread."""
    groups = {}
    for c, cc in tasks:
        groups.setdefault((getattr(c["fn"], "__name__", c["name"]), cc), []).append((c, cc))
    return [t for g in groups.values() for t in _evenly(g, per_kernel)]


def _ast_source(fn, signature, constexprs):
    """ASTSource across Triton versions: constexprs keyed by name (new) or by (index,) (3.x)."""
    from triton.compiler import ASTSource

    arg_names = list(getattr(fn, "arg_names", None) or signature.keys())
    by_index = {(arg_names.index(k),): v for k, v in constexprs.items()}
    try:
        return ASTSource(fn=fn, signature=signature, constexprs=by_index)
    except (AssertionError, TypeError, KeyError):
        return ASTSource(fn=fn, signature=signature, constexprs=dict(constexprs))


def _tool(name):
    try:
        import triton

        path = getattr(getattr(triton.knobs.nvidia, name), "path", None)
        if path and os.path.exists(path):
            return path
    except Exception:
        pass
    try:
        import triton.backends.nvidia as nv

        p = os.path.join(os.path.dirname(nv.__file__), "bin", name)
        if os.path.exists(p):
            return p
    except Exception:
        pass
    return shutil.which(name)


def _ptxas(cc):
    """The ptxas Triton itself uses for `cc` (Triton >= 3.9 picks a newer one for sm_90+)."""
    try:
        from triton.backends.nvidia import compiler as nvc

        try:
            tool = nvc.get_ptxas(cc)
        except TypeError:
            tool = nvc.get_ptxas()
        path = getattr(tool, "path", tool)
        if path and os.path.exists(path):
            return path
    except Exception:
        pass
    return _tool("ptxas")


def _resources(compiled, cc):
    """(regs, spill_bytes, local_bytes, tool) from ptxas -v, else cuobjdump, else metadata."""
    ptx = compiled.asm.get("ptx")
    ptxas = _ptxas(cc)
    if ptx and ptxas:
        m = re.search(r"^\s*\.target\s+(\S+)", ptx, re.M)
        arch = m.group(1).rstrip(",") if m else f"sm_{cc}"
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "k.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            r = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")],
                               capture_output=True, text=True)
        log = r.stdout + r.stderr
        regs = re.search(r"Used (\d+) registers", log)
        st = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        if regs:
            spill = int(st.group(1)) + int(st.group(2)) if st else 0
            return int(regs.group(1)), spill, "ptxas"
    cubin = compiled.asm.get("cubin")
    cuobjdump = _tool("cuobjdump")
    if cubin and cuobjdump:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "k.cubin")
            with open(path, "wb") as f:
                f.write(cubin)
            out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", out)
        if m:
            return int(m.group(1)), int(m.group(2)), "cuobjdump(local)"
    return getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None), "metadata"


def compile_one(cfg, cc):
    import triton
    from triton.backends.compiler import GPUTarget

    t0 = time.time()
    src = _ast_source(cfg["fn"], cfg["signature"], cfg["constexprs"])
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    regs, spills, how = _resources(compiled, cc)
    shared = compiled.metadata.shared
    return dict(name=cfg["name"], cc=cc, regs=regs, spills=spills, shared=shared, how=how,
                warps=cfg["num_warps"], stages=cfg["num_stages"], secs=time.time() - t0)


def run(archs=(80, 90), sample=None, name_filter=None, jobs=None, out=sys.stdout, fail_on_spills=False):
    """Compile the configs; return (results, errors). `sample`: configs per kernel function (None: all)."""
    from nanogpt_kernels.triton._utils import jit_interprets

    if os.environ.get("TRITON_INTERPRET", "0") == "1" or jit_interprets():
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (kernels must be compiled, not interpreted)")
    configs = all_configs()
    if name_filter:
        configs = [c for c in configs if name_filter in c["name"]]
    # a config marked with "archs" is only ever launched on those (the launcher picks by capability)
    tasks = [(c, cc) for cc in archs for c in configs if cc in c.get("archs", archs) or cc not in (80, 90)]
    if sample:
        tasks = sample_tasks(tasks, sample)
    results, errors = [], []
    jobs = jobs or max(1, min(8, os.cpu_count() or 1))

    def work(task):
        c, cc = task
        try:
            return compile_one(c, cc), None
        except Exception as e:  # noqa: BLE001 - report every failure
            return None, (c["name"], cc, f"{type(e).__name__}: {e}", traceback.format_exc())

    with ThreadPoolExecutor(jobs) as ex:
        for res, err in ex.map(work, tasks):
            if err:
                errors.append(err)
                print(f"FAIL sm_{err[1]} {err[0]}: {err[2][:2000]}", file=out)
                continue
            limit = SMEM_LIMIT.get(res["cc"])
            problems, warns = [], []
            if res["spills"]:
                (problems if fail_on_spills else warns).append(f"{res['spills']} bytes spilled")
            if limit and res["shared"] > limit:
                problems.append(f"shared memory {res['shared']} > {limit}")
            status = "FAIL" if problems else "WARN" if warns else "ok  "
            print(f"{status} sm_{res['cc']} {res['name']:<58} warps={res['warps']:<2} stages={res['stages']} "
                  f"regs={res['regs']} smem={res['shared']} spills={res['spills']} ({res['how']}, "
                  f"{res['secs']:.1f}s)" + (f"  <- {'; '.join(problems + warns)}" if problems or warns else ""),
                  file=out)
            if problems:
                errors.append((res["name"], res["cc"], "; ".join(problems), ""))
            results.append(res)
    spilled = sum(1 for r in results if r["spills"])
    print(f"compiled {len(results)} kernel configs for {', '.join(f'sm_{a}' for a in archs)}; "
          f"{len(errors)} failures; {spilled} configs spill registers", file=out)
    return results, errors


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    ap.add_argument("--sample", type=int, default=None, help="at most N configs per kernel (default: all)")
    ap.add_argument("--filter", default=None, help="only configs whose name contains this")
    ap.add_argument("-j", "--jobs", type=int, default=None)
    ap.add_argument("--fail-on-spills", action="store_true", help="treat register spills as failures")
    args = ap.parse_args(argv)
    _, errors = run(tuple(args.arch), args.sample, args.filter, args.jobs, fail_on_spills=args.fail_on_spills)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
