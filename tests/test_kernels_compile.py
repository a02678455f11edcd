"""The Triton kernels of every registry op compile for real GPUs (sm_80, sm_90), without a GPU.

torch.compile(fullgraph=True) of each op and of the GPT is in the op's module and in test_model_backends.py.
"""
import importlib
import os
import subprocess
import sys

import torch

from nanogpt_kernels.triton import compile_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Triton kernels no op launches (the tests' view of attention's dropout mask) need no compile configs
NOT_OP_KERNELS = {"_dropout_mask_kernel"}


def _kernel_name(cfg):
    return getattr(cfg["fn"], "__name__", None) or cfg["fn"].fn.__name__


def test_compile_check_builds_every_kernel_for_sm80_and_sm90():
    """`compile_check --sample 2`: first and last config of each kernel, sm_80 and sm_90.

    Compiles through ptxas and parses registers / shared memory / spills for explicit GPUTargets, with or
    without a GPU. The interpreter must be off for real compilation (on CPU the test session has it on), so
    it runs in a subprocess without TRITON_INTERPRET.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "nanogpt_kernels.triton.compile_check", "--sample", "2", "-j", "2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    lines = [ln.split() for ln in r.stdout.splitlines() if ln.startswith(("ok", "WARN"))]
    assert all(any(f.startswith(k) for f in ln) for ln in lines for k in ("regs=", "smem=", "spills="))
    kernel_of = {c["name"]: _kernel_name(c) for c in compile_check.all_configs()}
    compiled = {(kernel_of[ln[2]], ln[1]) for ln in lines}
    for cc in ("sm_80", "sm_90"):
        missing = set(kernel_of.values()) - {k for k, arch in compiled if arch == cc}
        assert not missing, f"not compiled for {cc}: {sorted(missing)}\n{out[-3000:]}"


def test_compile_configs_cover_every_kernel():
    """Every Triton kernel of the registry's ops has launch configs to compile, found from the registry: a new
    op's module is checked once the registry names it."""
    modules = compile_check.triton_modules()
    assert {m.__name__.rpartition(".")[2] for m in modules} >= {"layer_norm", "bias_gelu", "attention", "adamw"}
    for mod in modules:
        # its own @triton.jit kernels (interpreted or not, each keeps the Python function as .fn)
        kernels = {n for n, v in vars(mod).items()
                   if n.endswith("_kernel") and getattr(getattr(v, "fn", None), "__module__", None) == mod.__name__}
        assert kernels, mod.__name__
        assert kernels - NOT_OP_KERNELS <= {_kernel_name(c) for c in mod._compile_configs()}, mod.__name__
    # the launchers' attention configs for every head dim / dtype / arch are in the list
    att = importlib.import_module("nanogpt_kernels.triton.attention")
    listed = {(c["name"].split("[")[0], c["constexprs"].get("HEAD_DIM"), c["constexprs"].get("BLOCK_M"),
               c["constexprs"].get("BLOCK_N"), c["num_warps"], c["num_stages"]) for c in att._compile_configs()}
    for D in att.HEAD_DIMS:
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            for hopper in (False, True):
                for dropout in (False, True):
                    cfg = att._configs(D, dt, hopper, dropout)
                    for k in ("fwd", "dkdv", "dq"):
                        assert (f"attn_{'bwd_' if k != 'fwd' else ''}{k}", D, *cfg[k]) in listed
