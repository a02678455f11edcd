import os
from pathlib import Path

# NANOGPT_TEST_DEVICE=cuda runs the device-aware tests on a GPU (the GPU suite sets it)
DEVICE = os.environ.get("NANOGPT_TEST_DEVICE", "cpu")
# on CPU the Triton kernels run through Triton's interpreter, which must be on before triton is imported
if DEVICE.split(":")[0] == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
# every kernel (Triton and extension) fills its outputs with NaN first, so an unwritten element fails
os.environ["NANOGPT_POISON"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# tiktoken's GPT-2 files, shipped beside the checkout (../shared): tests run offline
_cache = ROOT.parent / "shared" / "data" / "tiktoken_cache"
if "TIKTOKEN_CACHE_DIR" not in os.environ and _cache.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_cache)


@pytest.fixture
def device():
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail("NANOGPT_TEST_DEVICE asks for CUDA but torch sees no GPU")
    return DEVICE


@pytest.fixture
def triton_kernels(device):
    """For the Triton backend's test modules (`pytestmark = pytest.mark.usefixtures("triton_kernels")`):
    fail when the kernels cannot run on the test device, and pin fp32 matmuls to full precision."""
    from kernels._testing import kernel_test_setup

    with kernel_test_setup(device):
        yield
