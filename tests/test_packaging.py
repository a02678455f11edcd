"""Packaging: the installed distribution (pyproject.toml + setup.py) as a process outside the source tree sees it,
and coexistence with Hugging Face's `kernels` (import name `kernels`, which transformers uses for hub kernels):
our kernel library installs as `nanogpt_kernels`, so outside the repository `import kernels` is HF's package.
(In the repository root the source folder kernels/ is on sys.path first: run from there, it shadows HF's.)
Each check runs in a subprocess whose working directory is a temporary one."""
import importlib.metadata as md
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_outside(tmp_path, code, timeout=300):
    """Runs code in a fresh interpreter in tmp_path, without the repository on sys.path; returns its last line as JSON."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=timeout, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_installed_package_from_outside_the_tree(tmp_path):
    from nanogpt_kernels import ext
    out = run_outside(tmp_path, """
        import importlib.metadata as md, importlib.resources as res, json
        import nanogpt, nanogpt_kernels, nanogpt_kernels.triton
        from nanogpt_kernels import ext
        print(json.dumps({
            "scripts": sorted(e.name for e in md.distribution("nanogpt").entry_points if e.group == "console_scripts"),
            "asset": res.files("nanogpt").joinpath("assets", "tinyshakespeare.txt").is_file(),
            "ext": ext.unavailable("cpu")}))
    """)
    assert out["scripts"] == ["nanogpt-eval", "nanogpt-export", "nanogpt-prepare", "nanogpt-sample", "nanogpt-train"]
    assert out["asset"]
    # the extension, when this install has it, imports the same from anywhere
    assert out["ext"] == ext.unavailable("cpu"), out


@pytest.fixture
def hf_kernels():
    try:
        return md.distribution("kernels")
    except md.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed (pip install -e '.[dev]' installs it)")


def test_hugging_face_kernels_and_transformers_beside_ours(tmp_path, hf_kernels):
    """HF's `kernels` imports as itself; a transformers GPT-2 (tiny config, no downloads) and ours loaded from its
    weights (kernels=auto: our kernel library) run side by side and agree; the environment's requirements hold."""
    pytest.importorskip("transformers")
    out = run_outside(tmp_path, """
        import json, torch, kernels, transformers
        from nanogpt.model import GPT
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=61,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
        hf = transformers.GPT2LMHeadModel(cfg).eval()
        hf.save_pretrained("gpt2-tiny")
        ours = GPT.from_pretrained("gpt2-tiny").eval()
        ours.set_backends({**ours.backends, "linear_cross_entropy": "none"})  # logits at every position
        idx = torch.randint(0, 61, (2, 16))
        with torch.no_grad():
            err = (ours(idx, idx)[0] - hf(idx).logits).abs().max().item()
        print(json.dumps({"kernels_file": kernels.__file__, "hub_api": callable(getattr(kernels, "get_kernel", None)),
                          "err": err}))
    """)
    assert Path(out["kernels_file"]).resolve() == Path(hf_kernels.locate_file("kernels/__init__.py")).resolve(), out
    assert ROOT / "kernels" not in Path(out["kernels_file"]).resolve().parents, out  # not our source folder
    assert out["hub_api"], out
    assert out["err"] < 1e-4, out
    r = subprocess.run([sys.executable, "-m", "pip", "check"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
