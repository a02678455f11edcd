"""The registry's contract: every backend's implementation of an op takes the arguments its torch reference
takes (names, order, defaults), so a selector can swap backends under the model without a change."""
import inspect

import pytest

from nanogpt_kernels import registry


def _signature(impl):
    return inspect.signature(impl.__init__ if inspect.isclass(impl) else impl)


@pytest.mark.parametrize("op", registry.OPS)
def test_every_backend_has_the_reference_signature(op):
    ref = _signature(registry.get(op, "torch"))
    checked = []
    for backend in registry.REGISTRY[op].impls:
        if backend == "torch" or registry.backend_unavailable(backend, "cpu"):
            continue  # e.g. the extension not built: nothing to compare (its own tests fail then)
        assert _signature(registry.get(op, backend)) == ref, f"{op}:{backend}"
        checked.append(backend)
    assert checked, f"{op}: no other backend importable here to compare with torch's reference"
