"""Measured `auto`: each op runs on the fastest backend that is correct here, never slower than PyTorch.

A layer op (attention, layer_norm, rms_norm, bias_gelu, ...) is measured on one real call of the model (an op
the model never calls keeps the fixed order): the tensors it
passed (cloned with their strides and values) go through every candidate backend, forward and backward
with a fixed random output gradient, round-robin over the backends so that drift hits all alike, under
the training's autocast context. The optimizer (adamw) is measured as one step over copies of the model's
parameter groups. Before its time counts, a backend's outputs and gradients (for adamw: the parameters
after one step, and the gradient norm) are checked against a float64 reference within the contract's
budget: at most 2x the error of PyTorch's own op in the same dtype. A backend that raises or disagrees is
dropped with a one-line warning naming the op, the backend and the error. The fastest correct backend
wins only when it is at least `MARGIN` faster than plain PyTorch; ties go to PyTorch. Plain PyTorch is
torch's op, or for an optional op (linear_cross_entropy) the model without it ("none": the logits, then
F.cross_entropy), which is then a candidate too.

Verdicts are cached in `autotune.json` under $NANOGPT_CACHE_DIR (default: $XDG_CACHE_HOME/nanogpt or
~/.cache/nanogpt), keyed by the device (CPU model, torch's CPU capability and the extension's ISA clone, or
the GPU's name and compute capability), the torch and triton versions, the kernel library's build, the op,
the call's signature and the autocast dtype. A second run with the same key measures nothing.
"""
import contextlib
import functools
import hashlib
import json
import os
import platform
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from nanogpt_kernels import registry
from nanogpt_kernels.contract import attention_grad_hints, within_budget

MARGIN = 0.03          # a backend must beat torch by 3% to be kept
TIME_BUDGET_S = 0.25   # per layer op on CPU (all backends together); the optimizer gets the same
MAX_REPS = 30
NOISY = 1.5            # a median this far above the fastest run: the machine was busy, the verdict is not cached
CHECK_ELEMS = 1 << 23  # the optimizer's correctness check and timing use at most this many parameters
TIME_ELEMS = 1 << 26


@dataclass
class Trial:
    backend: str
    ms: float = None     # fastest ms per forward+backward (per optimizer step), None when not timed
    error: str = None    # why it was dropped: it raised, or its result is outside the budget
    median_ms: float = None


@dataclass
class Verdict:
    op: str
    choice: str
    why: str                                  # why the others were passed over
    trials: list = field(default_factory=list)
    cached: bool = False


# ---------------------------------------------------------------- one real call

class Call:
    """A layer op's call as the model made it: tensors cloned (strides kept), other arguments as they were."""

    def __init__(self, args, kwargs):
        self.args = tuple(_keep(a) for a in args)
        self.kwargs = dict(kwargs)

    def signature(self):
        def sig(a):
            if isinstance(a, torch.Tensor):
                return [list(a.shape), list(a.stride()), str(a.dtype).replace("torch.", "")]
            return a if isinstance(a, (int, float, str, bool, type(None))) else repr(a)
        return [[sig(a) for a in self.args], {k: sig(v) for k, v in sorted(self.kwargs.items())}]

    def leaves(self, dtype=None, constants=()):
        """Fresh leaf copies of the tensors (floating ones require grad, but for the op's `constants` positions),
        optionally cast to `dtype`."""
        def leaf(i, a):
            if not isinstance(a, torch.Tensor):
                return a
            t = _keep(a) if dtype is None else a.detach().to(dtype)
            return t.requires_grad_(t.is_floating_point() and i not in constants)
        return [leaf(i, a) for i, a in enumerate(self.args)]


def _keep(t):
    if not isinstance(t, torch.Tensor):
        return t
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return out.copy_(t.detach())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(runs, device, budget_s):
    """{name: (fastest, median) ms} of each runner, taking turns until the time budget or MAX_REPS runs out.
    The fastest run is the estimate: on a shared machine noise only ever adds time."""
    times = {name: [] for name in runs}
    start = time.perf_counter()
    for _ in range(MAX_REPS):
        for name, run in runs.items():
            _sync(device)
            t0 = time.perf_counter()
            run()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > budget_s and len(next(iter(times.values()))) >= 3:
            break
    return {name: (min(t), sorted(t)[len(t) // 2]) for name, t in times.items()}


# ---------------------------------------------------------------- layer ops

def _outputs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]  # rope gives (q_rot, k_rot)


def _forward_backward(fn, leaves, kwargs, seed, dout_dtype):
    """(outputs, then the leaves' grads after backward(douts)), douts; each dout is drawn in float32 from `seed`
    and rounded to dout_dtype (the call's dtype), so the float64 reference and the low-precision runs see the same."""
    outs = _outputs(fn(*leaves, **kwargs))
    gen = torch.Generator(device=outs[0].device).manual_seed(seed)
    douts = [torch.randn(o.shape, generator=gen, device=o.device).to(dout_dtype).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, douts)
    return outs + [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad], douts


def check_layer(op, backend, call):
    """None when `backend` computes op's output and every gradient within budget on `call`, else why not."""
    kwargs = dict(call.kwargs)
    if "dropout_p" in kwargs:
        kwargs["dropout_p"] = 0.0  # a random mask cannot be compared; the kernels' masks are tested elsewhere
    ref, dtype, constants = registry.get(op, "torch"), call.args[0].dtype, registry.REGISTRY[op].constants
    # an output dtype asked for (layer_norm's out_dtype under autocast): float64 in the reference, and the
    # gradients coming back are drawn in it
    out_dtype = kwargs.get("out_dtype")
    ref_kwargs = kwargs if out_dtype is None else {**kwargs, "out_dtype": torch.float64}
    dtype = out_dtype or dtype
    ref64, douts = _forward_backward(ref, call.leaves(torch.float64, constants), ref_kwargs, 0, dtype)
    theirs, _ = _forward_backward(ref, call.leaves(constants=constants), kwargs, 0, dtype)
    ours, _ = _forward_backward(registry.get(op, backend), call.leaves(constants=constants), kwargs, 0, dtype)
    hints = {}
    if op == "attention":  # grads 0, 1 (dq, dk) cancel: see attention_grad_hints
        hints = dict(zip((1, 2), attention_grad_hints(*call.args[:3], douts[0], kwargs.get("scale"))))
    n_out = len(douts)
    names = [f"output {i}" if n_out > 1 else "output" for i in range(n_out)] + [
        f"grad {i}" for i in range(len(ours) - n_out)]
    for i, (name, a, t, r) in enumerate(zip(names, ours, theirs, ref64)):
        if a is None or a.shape != r.shape:
            return f"{name} has shape {None if a is None else tuple(a.shape)}, expected {tuple(r.shape)}"
        ok, err, tol = within_budget(a, t, r, a.dtype, hints.get(i, 0.0))
        if not ok:
            return f"{name} is off by {err:.3g} from float64 (budget {tol:.3g}, torch's own error x2 + roundoff)"
    return None


def measure_layer(op, backends, call, ctx, budget_s):
    """Trials of `backends` on `call`: each checked, then the correct ones timed together."""
    trials, runs = {}, {}
    for b in backends:
        trials[b] = Trial(b)
        try:
            why = None if b in ("torch", registry.NONE) else check_layer(op, b, call)
        except Exception as e:  # a kernel that cannot run this call must not stop the run
            why = f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if why:
            trials[b].error = why
            continue
        fn = registry.unfused(op) if b == registry.NONE else registry.get(op, b)
        leaves = call.leaves(constants=registry.REGISTRY[op].constants)

        def run(fn=fn, leaves=leaves, douts=None):  # the timed part: forward and backward, nothing else
            for t in leaves:
                if isinstance(t, torch.Tensor):
                    t.grad = None
            with ctx:
                outs = _outputs(fn(*leaves, **call.kwargs))
            torch.autograd.backward(outs, douts)
        try:
            with ctx:  # warm-up (Triton compiles here, the extension allocates its first buffers), and douts
                _, douts = _forward_backward(fn, leaves, call.kwargs, 1, call.args[0].dtype)
            runs[b] = functools.partial(run, douts=douts)
        except Exception as e:
            trials[b].error = f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    for b, (ms, med) in round_robin(runs, call.args[0].device, budget_s).items():
        trials[b].ms, trials[b].median_ms = ms, med
    return list(trials.values())


# ---------------------------------------------------------------- the optimizer

def _param_copies(groups, limit, dtype=None):
    """Copies of the groups' params (at most `limit` elements in all) with seeded random gradients."""
    out, n = [], 0
    gen = torch.Generator().manual_seed(0)
    for g in groups:
        ps = []
        for p in g["params"]:
            if n + p.numel() > limit and n > 0:
                break
            n += p.numel()
            c = p.detach().to(dtype or p.dtype).clone()
            c.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(c.device, c.dtype)
            ps.append(c)
        if ps:
            out.append({**{k: v for k, v in g.items() if k != "params"}, "params": ps})
    return out


def check_optimizer(backend, groups, hyper):
    """None when one step of `backend` moves the params (and reports the norm) within budget, else why not."""
    def step(cls, copies):
        norm = cls(copies, **hyper).step()
        return [norm.reshape(1)] + [p for g in copies for p in g["params"]]
    ref64 = step(registry.get("adamw", "torch"), _param_copies(groups, CHECK_ELEMS, torch.float64))
    theirs = step(registry.get("adamw", "torch"), _param_copies(groups, CHECK_ELEMS))
    ours = step(registry.get("adamw", backend), _param_copies(groups, CHECK_ELEMS))
    for i, (a, t, r) in enumerate(zip(ours, theirs, ref64)):
        ok, err, tol = within_budget(a, t, r, t.dtype)
        if not ok:
            what = "the gradient norm" if i == 0 else f"param {i - 1} after one step"
            return f"{what} is off by {err:.3g} from float64 (budget {tol:.3g})"
    return None


def measure_optimizer(backends, groups, hyper, budget_s):
    trials, runs = {}, {}
    device = groups[0]["params"][0].device
    for b in backends:
        trials[b] = Trial(b)
        try:
            why = None if b == "torch" else check_optimizer(b, groups, hyper)
            if why is None:
                opt = registry.get("adamw", b)(_param_copies(groups, TIME_ELEMS), **hyper)
                opt.step()  # warm-up, and the state is allocated
                runs[b] = opt.step
        except Exception as e:
            why = f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        trials[b].error = why
    for b, (ms, med) in round_robin(runs, device, budget_s).items():
        trials[b].ms, trials[b].median_ms = ms, med
    return list(trials.values())


# ---------------------------------------------------------------- the decision and its cache

def decide(op, trials):
    """The verdict: plain PyTorch (torch's op; for an optional op, the model without it) unless a correct
    backend is at least MARGIN faster; ties and near-ties go to PyTorch."""
    by = {t.backend: t for t in trials}
    baseline = registry.NONE if registry.NONE in by else "torch"
    base = by[baseline].ms
    fast = [t for t in trials if t.backend != baseline and t.error is None and t.ms is not None]
    best = min(fast, key=lambda t: t.ms, default=None)
    choice = best.backend if best is not None and best.ms <= (1.0 - MARGIN) * base else baseline
    notes = []
    for t in trials:
        if t.backend == choice:
            continue
        if t.error:
            notes.append(f"{t.backend} wrong or failing: {t.error}")
        elif t.backend == baseline:
            notes.append(f"{baseline} slower")
        else:
            notes.append(f"{t.backend} {t.ms:.3f} ms, not {MARGIN:.0%} faster than {baseline}'s {base:.3f} ms")
    return Verdict(op, choice, "; ".join(notes), trials)


def device_key(device):
    """What the speed of a kernel depends on, besides the call: the chip and the code path that runs on it."""
    device = torch.device(device)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} sm_{p.major}{p.minor}"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    isa = "no ext"
    if registry.backend_unavailable("ext", "cpu") is None:
        from nanogpt_kernels import ext
        isa = ext._C.cpu_isa()
    return f"{model} | torch {torch.backends.cpu.get_cpu_capability()} | ext {isa} | {torch.get_num_threads()} threads"


def _library_build():
    """A fingerprint of the kernel library as installed: any edit or rebuild re-measures."""
    root = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha1()
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if f.endswith((".py", ".so", ".pyd")):
                st = os.stat(os.path.join(dirpath, f))
                h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _versions():
    v = {"torch": torch.__version__, "library": _library_build()}
    with contextlib.suppress(ImportError):
        import triton
        v["triton"] = triton.__version__
    return v


def cache_file():
    root = os.environ.get("NANOGPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "nanogpt")
    return os.path.join(root, "autotune.json")


def _read_cache(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}


def _write_cache(path, entries):
    """Merge `entries` into the cache file atomically (a killed run leaves the old file whole)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = _read_cache(path) | entries
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".autotune.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


@dataclass
class Selection:
    choice: dict            # op -> backend
    verdicts: dict          # op -> Verdict (measured or cached ops only)
    seconds: float
    cache: str


def select(ops, device, calls, groups=None, hyper=None, ctx=None, autocast_dtype=None, cache=True):
    """Measure (or read from the cache) the ops in `ops` on `device`; `calls` has each layer op's Call,
    `groups`/`hyper` the optimizer's parameter groups and keyword arguments (needed when "adamw" is in ops)."""
    device = torch.device(device)
    ctx = ctx or contextlib.nullcontext()
    t0 = time.perf_counter()
    path = cache_file()
    stored = _read_cache(path) if cache else {}
    base = [device_key(device), _versions(), str(autocast_dtype)]
    budget = TIME_BUDGET_S * (4 if device.type == "cuda" else 1)
    verdicts, new = {}, {}
    for op in ops:
        if op != "adamw" and op not in calls:
            continue  # a layer op this model never calls (rope in a GPT-2 recipe): nothing to measure
        backends = registry.candidates(op, device.type) + ([registry.NONE] if registry.REGISTRY[op].optional else [])
        if op == "adamw":
            what = [[list(p.shape), str(p.dtype)] for g in groups for p in g["params"]] + [sorted(hyper.items())]
        else:
            what = calls[op].signature()
        key = hashlib.sha1(json.dumps(base + [op, backends, what], default=str).encode()).hexdigest()
        if key in stored:
            v = stored[key]
            verdicts[op] = Verdict(op, v["choice"], v["why"], [Trial(**t) for t in v["trials"]], cached=True)
            continue
        if len(backends) == 1:
            verdicts[op] = Verdict(op, backends[0], "the only backend that runs here", [Trial(backends[0])])
            continue
        if op == "adamw":
            trials = measure_optimizer(backends, groups, hyper, budget)
        else:
            trials = measure_layer(op, backends, calls[op], ctx, budget)
        for t in trials:
            if t.error and t.backend != "torch":
                warnings.warn(f"kernels: {op} on {t.backend} dropped: {t.error}", stacklevel=2)
        verdicts[op] = decide(op, trials)
        if any(t.ms and t.median_ms > NOISY * t.ms for t in trials):
            verdicts[op].why += "; timings noisy (a busy machine?): not cached, measured again next run"
            continue
        new[key] = {**asdict(verdicts[op]), "device": base[0], "op": op}
        new[key].pop("cached")
    if cache and new:
        with contextlib.suppress(OSError):  # a read-only home still trains; it only measures again next time
            _write_cache(path, new)
    return Selection({op: v.choice for op, v in verdicts.items()}, verdicts, time.perf_counter() - t0, path)


def format_table(selection):
    """The table printed at start: each backend's ms per op, the choice, and why the others were passed over."""
    names = [b for b in (*registry.BACKENDS, registry.NONE) if any(t.backend == b for v in selection.verdicts.values()
                                                  for t in v.trials)]
    cached = all(v.cached for v in selection.verdicts.values())
    w = max(len(op) for op in [*selection.verdicts, "op"])
    head = (f"  {'op':<{w}}" + "".join(f"{b + ' ms':>11}" for b in names) + "  choice")
    lines = [head]
    for op, v in selection.verdicts.items():
        by = {t.backend: t for t in v.trials}
        cells = []
        for b in names:
            t = by.get(b)
            cells.append("-" if t is None else ("wrong" if t.error else ("" if t.ms is None else f"{t.ms:.3f}")))
        lines.append(f"  {op:<{w}}" + "".join(f"{c:>11}" for c in cells) + f"  {v.choice}"
                     + (f"  ({v.why})" if v.why else ""))
    how = "read from the cache" if cached else f"measured in {selection.seconds:.1f} s"
    return f"kernel autotune ({how}; {selection.cache}):\n" + "\n".join(lines)
