"""kernels/triton/ns_gram.py (Muon's X·Xᵀ) against a float64 product, and how Muon picks it
(nanogpt.muon.measure_gram): a slower or wrong kernel is never kept."""
import pytest
import torch

from budget import assert_within_budget
from nanogpt import muon
from nanogpt_kernels import registry

pytestmark = pytest.mark.skipif(registry.backend_unavailable("triton", "cpu") is not None
                                and not torch.cuda.is_available(), reason="triton is not installed")

# (k, m, n): m and n not multiples of the tiles (32 x 16 interpreted, 128 x 64 compiled), one tile, several
SHAPES = [(3, 40, 72), (1, 7, 5), (2, 33, 129), (2, 130, 200)]


def _gram(x, out=None):
    from nanogpt_kernels.triton.ns_gram import ns_gram
    return ns_gram(x, out=out)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "transposed"])
def test_ns_gram_matches_float64(device, shape, dtype, strided):
    k, m, n = shape
    x = torch.randn(k, n, m).to(device, dtype).mT if strided else torch.randn(shape).to(device, dtype)
    ref = torch.bmm(x.double(), x.double().mT)
    g = _gram(x)
    assert_within_budget(f"ns_gram {shape} {dtype}", g, torch.bmm(x, x.mT), ref, dtype)
    assert torch.equal(g, g.mT)  # the mirrored tiles are the computed ones, transposed
    out = torch.full((k, m, m), float("nan"), dtype=dtype, device=device)
    assert _gram(x, out=out) is out and torch.equal(out, g)


def test_ns_gram_rejects_bad_input(device):
    x = torch.randn(2, 8, 16, device=device, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"expected a \(k, m, n\) stack"):
        _gram(x[0])
    with pytest.raises(ValueError, match="dtype torch.float32 is not supported"):
        _gram(x.float())
    with pytest.raises(ValueError, match="out must be"):
        _gram(x, out=torch.empty(2, 8, 9, device=device, dtype=torch.bfloat16))


def test_measure_gram_keeps_triton_only_when_faster_and_right(device, monkeypatch, recwarn):
    x = torch.randn(2, 33, 72).to(device, torch.bfloat16)
    timed = []

    def timer(torch_ms, triton_ms):
        return lambda runs: timed.append(runs) or {"torch": torch_ms, "triton": triton_ms}

    assert muon.measure_gram(x, timer(1.0, 0.5)) == "triton"
    assert muon.measure_gram(x, timer(1.0, 0.98)) == "torch"  # not 3% faster: ties go to PyTorch
    assert muon.measure_gram(x, timer(0.5, 1.0)) == "torch"
    timed.clear()
    monkeypatch.setitem(muon.GRAMS, "triton", lambda x, out: torch.bmm(x, x.mT, out=out) * 1.1)  # wrong: dropped
    assert muon.measure_gram(x, timer(1.0, 0.5)) == "torch"
    assert any("Triton X·Xᵀ kernel dropped" in str(w.message) and "off by" in str(w.message) for w in recwarn)
    assert not timed  # a wrong kernel is not timed


def test_gram_backend_is_torch_off_cuda_and_cached():
    x = torch.randn(2, 8, 16, dtype=torch.bfloat16)
    work = {}
    assert muon.gram_backend(x, work) == "torch" and muon.gram_backend(x) == "torch"
    work["gram_backend"] = "triton"  # a verdict kept from the first step is reused
    assert muon.gram_backend(x, work) == "triton"
