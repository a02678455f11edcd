import importlib.util
import os
import subprocess
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

from nanogpt import ops  # noqa: E402
from nanogpt_kernels import registry  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _tiktoken_cache():
    """tiktoken's GPT-2 files, shipped beside the checkout (../shared) or, for a clone made elsewhere (git clone
    /work/main /tmp/x), beside the checkout it was cloned from: the tests then run offline."""
    tops = [ROOT.parent]
    try:
        origin = subprocess.run(["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"],
                                capture_output=True, text=True, timeout=30).stdout.strip()
        if origin and Path(origin).is_dir():
            tops.append(Path(origin).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        pass  # no git: only ../shared
    return next((str(c) for c in (t / "shared" / "data" / "tiktoken_cache" for t in tops) if c.is_dir()), None)


if "TIKTOKEN_CACHE_DIR" not in os.environ and (_cache := _tiktoken_cache()):
    os.environ["TIKTOKEN_CACHE_DIR"] = _cache
# a run under ATEN_CPU_CAPABILITY (an AVX2-only CPU, emulated) compiles into its own torch.compile cache
ops.separate_inductor_cache()


def pytest_report_header(config):
    return f"TIKTOKEN_CACHE_DIR={os.environ.get('TIKTOKEN_CACHE_DIR', 'unset (tiktoken downloads its files)')}"


def pytest_configure(config):
    config.addinivalue_line("markers", "backends(*names): run the test on these backends of its module's OP only")
    config.addinivalue_line("markers", "cpu_only(why): skip off CPU; `why` says what only the CPU run checks")
    config.addinivalue_line("markers", "compiled_only(why): skip the Triton backend under its CPU interpreter, which "
                                       "pays per program (Triton runs it on GPU)")


def pytest_runtest_setup(item):
    mark = item.get_closest_marker("cpu_only")
    if mark and torch.device(DEVICE).type != "cpu":
        pytest.skip(f"CPU only: {mark.args[0]}")


def pytest_generate_tests(metafunc):
    """A test using the `backend` fixture in a module with OP = "<op>" runs once per backend the registry has
    for that op (OP = None: per backend), or per backend its `backends` mark names."""
    if "backend" in metafunc.fixturenames:
        op, mark = metafunc.module.OP, metafunc.definition.get_closest_marker("backends")
        names = registry.REGISTRY[op].impls if op else registry.BACKENDS
        metafunc.parametrize("backend", [b for b in names if mark is None or b in mark.args], indirect=True)


def _must_run(backend):
    """Whether `backend` not running here is a bug rather than a fact of this machine: this file sets up Triton's
    interpreter on CPU and the GPU suite runs the compiled kernels, and the extension runs wherever it was built."""
    return backend == "triton" or (backend == "ext" and importlib.util.find_spec("nanogpt_kernels._C") is not None)


@pytest.fixture
def device():
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail("NANOGPT_TEST_DEVICE asks for CUDA but torch sees no GPU")
    return DEVICE


@pytest.fixture
def backend(request, device):
    """The backend name a test runs its module's OP on (parametrized above). One that has no kernel for the op
    on this device is skipped with the reason; one that should run but cannot fails. fp32 matmuls are pinned to
    full precision: an earlier test may have turned TF32 on process-wide (benchmarks/bench.py and nanogpt.train
    do), which would make the float32 references on CUDA noisier than the budgets assume."""
    name, op, device_type = request.param, request.module.OP, torch.device(device).type
    why = registry.unavailable(op, name, device_type) if op else registry.backend_unavailable(name, device_type)
    if why and _must_run(name) and registry.backend_unavailable(name, device_type):
        pytest.fail(f"the {name} backend cannot run on {device}: {why}")
    if why:
        pytest.skip(f"{name} cannot run {op or 'the model'} on {device_type}: {why}")
    mark = request.node.get_closest_marker("compiled_only")
    if mark and name == "triton" and device_type == "cpu":
        pytest.skip(f"too slow for the Triton interpreter ({mark.args[0]}); runs on GPU")
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield name
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def same_at_thread_counts():
    """check(fn, *inputs, grad_out=None): fn(*inputs), and with grad_out the inputs' gradients, are the same at 1
    thread and twice at n >= 2: a CPU kernel's results must not depend on how its work is split over threads,
    nor vary from run to run."""
    before = torch.get_num_threads()

    def run(fn, inputs, grad_out):
        ins = [t.detach().requires_grad_(grad_out is not None) for t in inputs]
        out = fn(*ins)
        if grad_out is None:
            return [out]
        out.backward(grad_out)
        return [out.detach()] + [t.grad for t in ins]

    def check(fn, *inputs, grad_out=None):
        runs = []
        for n in (1, max(2, before), max(2, before)):
            torch.set_num_threads(n)
            runs.append(run(fn, inputs, grad_out))
        for other in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(runs[0], other))

    yield check
    torch.set_num_threads(before)


@pytest.fixture
def impl(backend, request):
    """The function (for adamw, the optimizer class) implementing the module's OP on `backend`."""
    return registry.get(request.module.OP, backend)


@pytest.fixture
def one_thread():
    """For modules of tiny shapes (`pytestmark = pytest.mark.usefixtures("one_thread")`): a second torch thread
    only adds hand-offs, and on a busy machine waits for a core."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _cpu_isas():
    from nanogpt_kernels import ext
    return ext._C.cpu_isas() if ext._C is not None else ["(extension not built)"]


@pytest.fixture(params=_cpu_isas())
def isa(request):
    """Each ISA clone of the extension's CPU kernels this CPU runs, forced in turn (test_<op>.py's
    test_ext_<op>_every_cpu_isa); the extension not built fails the test, saying why."""
    from nanogpt_kernels import ext
    if ext._C is None:
        pytest.fail(f"the CPU kernels' tests need the extension: {ext.unavailable('cpu')}")
    before = ext._C.cpu_isa()
    ext._C.set_cpu_isa(request.param)
    assert ext._C.cpu_isa() == request.param
    yield request.param
    ext._C.set_cpu_isa(before)
