"""Training-step benchmark: PyTorch eager / torch.compile vs our kernels, interleaved.

    python benchmarks/bench.py [config.py] [--key=value ...]

Times one full training step (forward, backward, clip + AdamW step from
`configure_optimizers(..., grad_clip=1.0)`, under autocast for bf16/fp16) for
each mode in `--modes`, round-robin (`per_round` steps per mode per round, the
mode order rotated every round) so machine drift hits every mode alike.

A mode is `<kernels>[+compile][+block|+selective][@dtype]`:
  torch            every op on the PyTorch backend, eager
  torch+compile    the same under torch.compile: the baseline the ratios use
  auto / ours      `--kernels` (default "auto": each op's backend measured on this model, in the mode's
                   dtype, by nanogpt.ops.select_kernels; --autotune=False takes the fixed order)
  triton, ext      one backend for every op (skipped, with the reason, when it cannot run here)
A per-op mix goes through --kernels (e.g. --kernels=attention:triton,layer_norm:torch)
and is then run as the "auto"/"ours" mode. A mode may name its own precision,
`auto@bfloat16` (else --dtype's): on CPU the default modes add `auto@bfloat16` where the
CPU quick start trains in bf16 (dtype=auto, nanogpt.ops.auto_dtype: bf16 matmul units and
the extension's attention kernel). `+block` / `+selective` run the mode with that
activation checkpointing (nanogpt.parallel, as nanogpt-train --activation_checkpointing);
--activation_checkpointing=none,block,selective runs every mode of --modes in each, and
prints what each costs against the same mode without it (ms/step, peak memory).

Before timing, every mode takes its first step from the same weights (one
state_dict, loaded into all) on the same batch; their losses must agree within
the dtype's tolerance (fp32 1e-4 relative, bf16/fp16 2e-2) or the run fails
with exit code 1 (with modes in several dtypes, the loosest tolerance).
After timing, `auto` (eager, --kernels=auto) must not be more than
`max_auto_slowdown` (3%) slower than `torch` (eager) in the same dtype (median
ms/step), else exit code 1 as well.

Peak memory, per mode:
  cuda  (params + optimizer state) + (max_memory_allocated during one step -
        memory_allocated before it), so other modes' resident models don't count.
  cpu   each mode in a fresh subprocess: peak RSS (ru_maxrss) after
        `mem_steps` steps minus the RSS just before the model was built
        (weights, grads, optimizer state, activations, compiled code and
        allocator slack; includes compilation's own peak for +compile modes).
        --memory=False skips it.

--json=PATH writes everything printed; --profile=MODE[,MODE...] writes torch.profiler
traces (Chrome trace JSON + TensorBoard plugin files) to profile_dir and prints
the top ops by self time.
"""
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_cases import device_name, require_device  # noqa: E402
from nanogpt import cpu_memory, ops, parallel  # noqa: E402
from nanogpt_kernels import registry  # noqa: E402
from nanogpt.configurator import HELP, Keys, configure  # noqa: E402
from nanogpt.errors import UserError  # noqa: E402
from nanogpt.mfu import peak_flops  # noqa: E402
from nanogpt.model import GPT, GPTConfig  # noqa: E402

DEFAULT_MODES = "torch,torch+compile,auto,auto+compile"
BASELINE = "torch+compile"
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-2}
SHAPES = {  # per device type: the CPU quick start's model (nanoGPT's bias=False), GPT-2 124M on CUDA (with biases)
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, vocab_size=65, bias=False),
    "cuda": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=12, vocab_size=50304, bias=True),
}


class LossMismatch(RuntimeError):
    """Modes disagree on the first step's loss: some backend computes something else."""


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def defaults(device):
    """The keys, with the defaults for `device`."""
    dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_available() \
        and torch.cuda.is_bf16_supported() else "float32"
    shape = SHAPES["cuda" if device.startswith("cuda") else "cpu"]
    about = dict(n_layer="transformer blocks", n_head="attention heads", n_embd="embedding width",
                 block_size="context length", batch_size="batch size", vocab_size="vocabulary size",
                 bias="biases in the Linear layers and LayerNorms")
    return Keys("python benchmarks/bench.py", __doc__, {
        "model": {k: (v, about[k]) for k, v in shape.items()} | dict(
            dropout=(0.0, "dropout probability"),
            gelu=("none", "the GELU's tanh approximation: none | tanh"),
        ),
        "timing": dict(
            data=("synthetic", "synthetic, or a prepared dataset dir holding train.bin (uint16 token ids)"),
            warmup=(5 if device == "cpu" else 10, "untimed steps per mode after the first (compiling) one"),
            iters=(30, "timed steps per mode"),
            per_round=(1, "steps per mode per round"),
            # where the CPU quick start trains in bf16, also our kernels in bf16: its default path
            modes=(DEFAULT_MODES + (",auto@bfloat16" if device == "cpu" and ops.auto_dtype("cpu") == "bfloat16"
                                    else ""), "the modes to time: <kernels>[+compile][+block|+selective][@dtype], "
                  "comma-separated"),
            activation_checkpointing=("none", "run each mode with each of these, e.g. none,block,selective "
                                      "(a mode naming its own +block/+selective keeps it)"),
            kernels=("auto", "what the auto/ours modes run (per op as in nanogpt-train --kernels)"),
            autotune=(True, "measure auto's backends (nanogpt.ops.select_kernels); False: the fixed order"),
            max_auto_slowdown=(0.03, "gate: auto (eager) at most this much slower than torch (eager), same dtype"),
        ),
        "output": dict(
            json=("", "write the results here too"),
            profile=("", "mode(s) to profile after timing, e.g. auto or auto,torch+compile"),
            profile_dir=("benchmarks/profiles", "where the profiler traces go"),
            profile_steps=(5, "steps per profiled mode"),
            memory=(True, "measure peak memory per mode (cpu: one subprocess per mode)"),
            mem_steps=(3, "steps per memory measurement"),
        ),
        "optimizer": dict(
            learning_rate=(6e-4, "AdamW learning rate"),
            weight_decay=(0.1, "AdamW weight decay"),
            beta1=(0.9, "AdamW beta1"),
            beta2=(0.95, "AdamW beta2"),
        ),
        "system": dict(
            device=(device, "cpu | cuda | cuda:N (the defaults follow it)"),
            dtype=(dtype, "float32 | bfloat16 | float16: the modes' precision unless a mode names its own"),
            seed=(1337, "random seed"),
            threads=(0, "torch.set_num_threads when > 0 (CPU); 0 keeps torch's default"),
            cpu_keep_memory=(True, "CPU: glibc keeps freed memory for reuse, as nanogpt-train does (every mode: it is "
                             "process-wide); False: the system default, page faults every step"),
            probe=("", "internal: run only the CPU memory probe of this mode"),
        ),
    })


def load_config(argv):
    device = configure(defaults(default_device()), [a for a in argv if a not in HELP])["device"]
    cfg = configure(defaults(device), argv)  # the defaults for that device (--help shows them), the same overrides
    if cfg["dtype"] not in TOLERANCE:
        raise UserError(f"dtype must be one of {', '.join(TOLERANCE)}, got {cfg['dtype']!r}")
    if cfg["iters"] < 1 or cfg["warmup"] < 0 or cfg["per_round"] < 1:
        raise UserError("iters and per_round must be >= 1, warmup >= 0")
    return cfg


# ---------------------------------------------------------------- modes

def parse_modes(spec, kernels, dtype, checkpointing="none"):
    """[(name, kernel selector, compile?, dtype, activation checkpointing)] from 'torch,torch+compile,
    auto+block@bfloat16,...'; each mode that names no checkpointing is run with each of `checkpointing`
    (comma-separated; none keeps the mode's name)."""
    acs = [a.strip() for a in checkpointing.split(",") if a.strip()] or ["none"]
    for ac in acs:
        if ac not in parallel.ACTIVATION_CHECKPOINTING:
            raise UserError(f"unknown activation_checkpointing {ac!r}; use none, block or selective "
                            "(comma-separated)")
    out = []
    for name in (m.strip() for m in spec.split(",")):
        if not name:
            continue
        head, at, mode_dtype = name.partition("@")
        if at and mode_dtype not in TOLERANCE:
            raise UserError(f"mode {name!r}: dtype after @ must be one of {', '.join(TOLERANCE)}")
        base, *plus = head.split("+")
        compiled = plus[:1] == ["compile"]
        named_ac = plus[1:] if compiled else plus  # the mode's own activation checkpointing
        if len(named_ac) > 1 or (named_ac and named_ac[0] not in ("block", "selective")):
            raise UserError(f"mode {name!r}: expected <kernels>[+compile][+block|+selective][@dtype], e.g. "
                            "torch+compile or auto+block")
        if base in ("auto", "ours"):
            sel = kernels
        elif base in registry.BACKENDS:
            sel = base
        else:
            raise UserError(f"mode {name!r}: kernels part must be torch, auto, ours, "
                            f"{', '.join(b for b in registry.BACKENDS if b != 'torch')}; "
                            "per-op mixes go through --kernels=... and the auto mode")
        for ac in named_ac or acs:
            named = name if named_ac or ac == "none" else f"{head}+{ac}{at}{mode_dtype}"
            out.append((named, sel, compiled, mode_dtype or dtype, ac))
    if not out:
        raise UserError("--modes is empty")
    return out


def describe(choice):
    """`ext (every op)`, or each op's backend when they differ."""
    names = set(choice.values())
    return f"{names.pop()} (every op)" if len(names) == 1 else ", ".join(f"{op}={b}" for op, b in choice.items())


def optim_args(cfg):
    """model.configure_optimizers' keywords (less device_type): the step every mode times, and what the
    measured auto times AdamW with."""
    return dict(weight_decay=cfg["weight_decay"], learning_rate=cfg["learning_rate"],
                betas=(cfg["beta1"], cfg["beta2"]), eps=1e-8, grad_clip=1.0)


# ---------------------------------------------------------------- data

def make_batches(cfg, device, n=8):
    """n fixed (x, y) batches, the same for every mode: synthetic or sampled from data/train.bin."""
    g = torch.Generator().manual_seed(cfg["seed"])
    B, T, V = cfg["batch_size"], cfg["block_size"], cfg["vocab_size"]
    if cfg["data"] == "synthetic":
        xs = [torch.randint(V, (B, T + 1), generator=g) for _ in range(n)]
    else:
        path = os.path.join(cfg["data"], "train.bin")
        if not os.path.exists(path):
            raise UserError(f"data={cfg['data']!r}: no train.bin there; use --data=synthetic or prepare the dataset")
        data = np.memmap(path, dtype=np.uint16, mode="r")
        if len(data) < T + 2:
            raise UserError(f"{path} holds {len(data)} tokens, fewer than block_size+2")
        xs = []
        for _ in range(n):
            ix = torch.randint(len(data) - T - 1, (B,), generator=g).tolist()
            xs.append(torch.from_numpy(np.stack([data[i:i + T + 1] for i in ix]).astype(np.int64)))
        top = max(int(x.max()) for x in xs)
        if top >= V:
            raise UserError(f"{path} holds token id {top} >= vocab_size {V}; pass --vocab_size")
    return [(x[:, :-1].contiguous().to(device), x[:, 1:].contiguous().to(device)) for x in xs]


# ---------------------------------------------------------------- one mode

class Runner:
    """One mode: its model, optimizer and (maybe compiled) forward."""

    def __init__(self, name, kernels, compiled, dtype, cfg, state_dict, batches, init_seed=None, choose=None,
                 ac="none"):
        self.name, self.kernels, self.compiled, self.dtype = name, kernels, compiled, dtype
        self.device = torch.device(cfg["device"])
        mconf = GPTConfig(**{k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size",
                                                 "dropout", "bias", "gelu")}, kernels=kernels)
        torch.manual_seed(cfg["seed"] if init_seed is None else init_seed)
        self.model = GPT(mconf, device_type=self.device.type)
        if init_seed is None:
            self.model.load_state_dict(state_dict)
        self.model.to(self.device)
        dt = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
        self.ctx = (lambda: torch.autocast(self.device.type, dtype=dt)) if dt else contextlib.nullcontext
        self.batches, self.i = batches, 0
        if choose:  # the measured auto: on the device, and before configure_optimizers reads backends["adamw"]
            choose(self)
        self.backends = dict(self.model.backends)
        parallel.checkpoint_activations(self.model, ac)  # (after choose: the kernels are measured without it)
        self.opt = self.model.configure_optimizers(device_type=self.device.type, **optim_args(cfg))
        self.fwd = torch.compile(self.model) if compiled else self.model
        self.times = []

    def step(self):
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        with self.ctx():
            _, loss = self.fwd(x, y)
        loss.backward()
        norm = self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss, norm

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed_step(self):
        self.sync()
        t0 = time.perf_counter()
        self.step()
        self.sync()
        self.times.append((time.perf_counter() - t0) * 1e3)

    def persistent_bytes(self):
        n = sum(p.numel() * p.element_size() for p in self.model.parameters())
        for st in self.opt.state.values():
            n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
        return n

    def cuda_peak_mb(self):
        """(params + optimizer state) + the step's transient peak."""
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.step()
        self.sync()
        transient = torch.cuda.max_memory_allocated(self.device) - before
        return (self.persistent_bytes() + transient) / 2**20


def _proc_status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def reset_peak_rss():
    """Reset the peak-RSS mark (Linux: /proc/self/clear_refs 5); returns the RSS now (MiB) and the method."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_kb("VmRSS") / 2**10, "VmHWM"
    except OSError:
        return peak_rss_mb("ru_maxrss"), "ru_maxrss"


def peak_rss_mb(method):
    if method == "VmHWM":
        return _proc_status_kb("VmHWM") / 2**10
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return r / 2**20 if sys.platform == "darwin" else r / 2**10


def probe_memory_cpu(cfg, argv, name, backends):
    """Run this mode alone in a fresh process, on the backends it was timed with (an auto mode is not
    measured again there); its peak-RSS growth in MiB (None + reason on failure)."""
    args = [a for a in argv if not a.startswith(("--probe=", "--json=", "--profile=", "--kernels="))]
    kernels = ",".join(f"{op}:{b}" for op, b in backends.items())
    cmd = [sys.executable, os.path.abspath(__file__), *args, f"--probe={name}", "--json=", "--profile=",
           f"--kernels={kernels}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return None, "memory probe timed out"
    for line in out.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[6:])["peak_rss_delta_mb"], None
    return None, f"memory probe failed (rc {out.returncode}): {(out.stderr or out.stdout).strip()[-300:]}"


def cpu_setup(cfg):
    """CPU threads and memory as the trainer sets them; returns the memory line (None on other devices)."""
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    if cfg["device"] == "cpu" and cfg["cpu_keep_memory"]:
        return cpu_memory.keep_freed_memory()
    return None


def run_probe(cfg):
    cpu_setup(cfg)
    name, sel, comp, dtype, ac = parse_modes(cfg["probe"], cfg["kernels"], cfg["dtype"])[0]
    batches = make_batches(cfg, cfg["device"])
    torch.manual_seed(cfg["seed"])
    base, method = reset_peak_rss()
    r = Runner(name, sel, comp, dtype, cfg, None, batches, init_seed=cfg["seed"], ac=ac)
    for _ in range(max(1, cfg["mem_steps"])):
        r.step()
    peak = peak_rss_mb(method)
    print("PROBE " + json.dumps({"mode": name, "peak_rss_delta_mb": peak - base, "peak_rss_mb": peak,
                                 "baseline_rss_mb": base, "method": method}))


# ---------------------------------------------------------------- profiling

def profile_mode(runner, cfg):
    from torch.profiler import ProfilerActivity, profile, schedule
    os.makedirs(cfg["profile_dir"], exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    tag = runner.name.replace("+", "_")
    chrome = os.path.join(cfg["profile_dir"], f"{tag}.chrome_trace.json")
    tb_dir = os.path.join(cfg["profile_dir"], "tensorboard", tag)
    handlers = []
    try:
        from torch.profiler import tensorboard_trace_handler
        handlers.append(tensorboard_trace_handler(tb_dir, worker_name=tag))
    except Exception as e:  # noqa: BLE001 - optional output
        print(f"profile: no TensorBoard handler ({e})")
        tb_dir = None

    def on_ready(prof):
        # a trace can be saved once: the TensorBoard handler writes a Chrome-format .pt.trace.json; copy it
        if handlers:
            before = set(os.listdir(tb_dir)) if os.path.isdir(tb_dir) else set()
            handlers[0](prof)
            new = sorted(set(os.listdir(tb_dir)) - before)
            if new:
                src = os.path.join(tb_dir, new[-1])
                if src.endswith(".gz"):
                    import gzip
                    with gzip.open(src, "rb") as fi, open(chrome, "wb") as fo:
                        shutil.copyfileobj(fi, fo)
                else:
                    shutil.copyfile(src, chrome)
                return
        prof.export_chrome_trace(chrome)

    steps = max(1, cfg["profile_steps"])
    with profile(activities=acts, schedule=schedule(wait=0, warmup=1, active=steps, repeat=1),
                 on_trace_ready=on_ready, record_shapes=True, profile_memory=True) as prof:
        for _ in range(steps + 1):
            runner.step()
            runner.sync()
            prof.step()
    key = "self_cuda_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    avgs = prof.key_averages()
    print(f"\nprofile of {runner.name}: top ops by self time over {steps} steps "
          f"(chrome trace {chrome}" + (f", tensorboard {tb_dir}" if tb_dir else "") + ")")
    print(avgs.table(sort_by=key, row_limit=25))
    attr = "self_device_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    rows = sorted(avgs, key=lambda e: getattr(e, attr, getattr(e, key, 0)), reverse=True)[:25]
    total = sum(getattr(e, attr, 0) for e in avgs) or 1
    top = [{"op": e.key, "calls": e.count, "self_ms_per_step": getattr(e, attr, 0) / 1e3 / steps,
            "self_frac": getattr(e, attr, 0) / total} for e in rows]
    return {"mode": runner.name, "chrome_trace": chrome, "tensorboard_dir": tb_dir, "steps": steps,
            "sorted_by": attr, "top_ops": top}


# ---------------------------------------------------------------- main

def pct(xs, q):
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run(cfg, argv=(), perturb=None, log=print):
    """Benchmark; returns the result dict. `perturb` ({mode: seed}) is a test hook: that mode's
    model is initialised from its own seed instead of the shared state_dict."""
    perturb = perturb or {}
    require_device(cfg["device"])
    device = torch.device(cfg["device"])
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    memory_line = cpu_setup(cfg)
    if memory_line:
        log(memory_line)
    status = {b: registry.backend_unavailable(b, device.type) for b in registry.BACKENDS}
    modes = parse_modes(cfg["modes"], cfg["kernels"], cfg["dtype"], cfg["activation_checkpointing"])
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/bench.py", *argv]),
        "device": device.type, "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "loadavg_before": _loadavg(),
        "torch": torch.__version__, "triton": _triton_version(), "python": platform.python_version(),
        "config": {k: v for k, v in cfg.items() if k != "probe"},
        "backend_status": {k: (v or "available") for k, v in status.items()},
        "tokens_per_iter": cfg["batch_size"] * cfg["block_size"], "cpu_memory": memory_line,
        "baseline": None, "modes": [], "check": None,
        "memory_method": None, "profile": None,
        "complete": False,  # the JSON is rewritten as the run goes; true once everything is in
    }
    log(f"bench: {result['device_name']} ({device.type}), torch {torch.__version__}, triton {result['triton']}, "
        f"dtype {cfg['dtype']}, {torch.get_num_threads()} threads, load average {result['loadavg_before']}")
    log(f"model: n_layer={cfg['n_layer']} n_head={cfg['n_head']} n_embd={cfg['n_embd']} "
        f"block_size={cfg['block_size']} batch_size={cfg['batch_size']} vocab_size={cfg['vocab_size']}")
    for name, why in status.items():
        if why:
            log(f"backend {name}: unavailable on {device.type}: {why}")

    batches = make_batches(cfg, device)
    torch.manual_seed(cfg["seed"])
    ref = GPT(GPTConfig(**{k: cfg[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size",
                                               "dropout", "bias", "gelu")}, kernels="torch"), device_type="cpu")
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    n_params = ref.get_num_params()
    flops_per_iter = ref.flops_per_token() * cfg["block_size"] * cfg["batch_size"]
    del ref
    result["n_params"] = n_params

    measured = {}  # (selector, dtype) -> {op: backend}: auto and auto+compile share one measurement

    def choose(r):
        key = (r.kernels, r.dtype)
        if key in measured:
            r.model.set_backends(measured[key])
            return
        log(f"mode {r.name}: choosing {r.kernels!r} kernels in {r.dtype}" + (" (measured):" if cfg["autotune"] else ""))
        measured[key] = ops.select_kernels(r.model, *batches[0], r.ctx(), r.kernels, autotune=cfg["autotune"],
                                           optim=optim_args(cfg), log=log)

    runners, entries = [], {}
    for name, sel, comp, dtype, ac in modes:
        entry = {"mode": name, "kernels": sel, "compile": comp, "dtype": dtype, "activation_checkpointing": ac,
                 "status": "ok", "reason": None}
        entries[name] = entry
        result["modes"].append(entry)
        try:
            entry["backends"] = registry.resolve(sel, device.type)
        except registry.KernelError as e:
            entry.update(status="skipped", reason=str(e))
            log(f"mode {name}: skipped: {e}")
            continue
        auto = "auto" in registry.parse(sel).values()
        try:
            r = Runner(name, sel, comp, dtype, cfg, state, batches, init_seed=perturb.get(name),
                       choose=choose if auto else None, ac=ac)
        except Exception as e:  # noqa: BLE001 - a broken backend must not stop the others
            entry.update(status="skipped", reason=f"setup failed: {type(e).__name__}: {e}")
            log(f"mode {name}: skipped: setup failed: {type(e).__name__}: {e}")
            continue
        runners.append(r)
        entry.update(backends=r.backends, measured=auto and cfg["autotune"])
    if not runners:
        raise UserError("no mode can run here: " + "; ".join(f"{e['mode']}: {e['reason']}" for e in entries.values()))

    # ---- first step from identical weights: the losses must agree
    tol = max(TOLERANCE[r.dtype] for r in runners)  # modes may mix dtypes (mode@dtype): the loosest
    losses, norms = {}, {}
    for r in list(runners):
        t0 = time.perf_counter()
        try:
            if cfg["dropout"] > 0:  # dropout draws differ between backends: compare a dropout-free forward
                r.model.eval()
                with torch.no_grad(), r.ctx():
                    check_loss = r.fwd(*r.batches[0])[1]
                r.model.train()
            loss, norm = r.step()
            if cfg["dropout"] > 0:
                loss = check_loss
            r.sync()
        except Exception as e:  # noqa: BLE001
            entries[r.name].update(status="failed", reason=f"first step failed: {type(e).__name__}: {e}")
            log(f"mode {r.name}: FAILED on its first step: {type(e).__name__}: {e}")
            runners.remove(r)
            continue
        losses[r.name], norms[r.name] = loss.item(), norm.item()
        entries[r.name].update(first_loss=losses[r.name], first_grad_norm=norms[r.name],
                               first_step_s=time.perf_counter() - t0)
        log(f"mode {r.name}: backends {describe(r.backends)}; first step {time.perf_counter() - t0:.2f}s "
            f"(compilation included for +compile), loss {losses[r.name]:.6f}, grad norm {norms[r.name]:.6f}")
        _write_json(cfg, result, None)  # partial results survive a time-out
    ref_name = "torch" if "torch" in losses else next(iter(losses), None)
    bad = {m: l for m, l in losses.items()
           if not (math.isfinite(l) and abs(l - losses[ref_name]) <= tol * abs(losses[ref_name]))}
    bad_norm = {m: n for m, n in norms.items()
                if not (math.isfinite(n) and abs(n - norms[ref_name]) <= 10 * tol * abs(norms[ref_name]) + 1e-6)}
    result["check"] = {"ok": not bad and len(losses) == len(runners) and bool(losses), "reference": ref_name,
                       "rel_tolerance": tol, "losses": losses, "grad_norms": norms,
                       "mismatched": sorted(bad), "grad_norm_warnings": sorted(bad_norm),
                       "dropout_note": "dropout > 0: losses are from an eval-mode (dropout off) forward on the "
                       "first batch; grad norms differ by dropout draws" if cfg["dropout"] > 0 else None}
    if bad_norm and cfg["dropout"] == 0:
        log(f"warning: first-step grad norms differ by more than {10 * tol:g} relative: "
            + ", ".join(f"{m}={norms[m]:.6g}" for m in sorted(bad_norm)) + f" (reference {ref_name}={norms[ref_name]:.6g})")
    if bad:
        msg = (f"first-step losses disagree beyond {tol:g} relative from identical weights: "
               + ", ".join(f"{m}={l:.6g}" for m, l in losses.items()) + f"; mismatched vs {ref_name}: {sorted(bad)}")
        log("ERROR: " + msg)
        _write_json(cfg, result, log)
        raise LossMismatch(msg)
    log(f"check: first-step losses agree within {tol:g} relative ({len(losses)} modes)")

    # ---- warm-up then timing, interleaved: every round runs each mode per_round steps, order rotated
    k = cfg["per_round"]
    for phase, total in (("warmup", cfg["warmup"]), ("timed", cfg["iters"])):
        done = 0
        rnd = 0
        t_phase = time.perf_counter()
        while done < total:
            n = min(k, total - done)
            order = runners[rnd % len(runners):] + runners[:rnd % len(runners)]
            for r in order:
                for _ in range(n):
                    if phase == "timed":
                        r.timed_step()
                    else:
                        r.step()
            done += n
            rnd += 1
        for r in runners:
            r.sync()
        log(f"{phase}: {total} steps per mode in {time.perf_counter() - t_phase:.1f}s")

    # ---- memory
    if cfg["memory"]:
        if device.type == "cuda":
            result["memory_method"] = ("cuda: params + optimizer state + (max_memory_allocated during one step "
                                       "- memory_allocated before it), per mode")
            for r in runners:
                entries[r.name]["peak_mem_mb"] = r.cuda_peak_mb()
        else:
            result["memory_method"] = (f"cpu: fresh subprocess per mode, peak RSS (VmHWM, reset just before building "
                                       f"the model) after {cfg['mem_steps']} steps minus the RSS at that reset; "
                                       "includes compilation for +compile modes")
            for r in runners:
                mb, why = probe_memory_cpu(cfg, list(argv), r.name, r.backends)
                entries[r.name]["peak_mem_mb"] = mb
                if why:
                    entries[r.name]["peak_mem_note"] = why
                    log(f"mode {r.name}: {why}")

    # ---- stats
    peak = peak_flops(cfg["dtype"])
    result["peak_flops"] = peak
    result["peak_flops_note"] = ("peak of " + result["device_name"] if device.type == "cuda" else
                                 "no CPU entry in nanogpt.mfu: MFU is against nanoGPT's A100 bf16 reference (312 TFLOP/s)")
    for r in runners:
        e = entries[r.name]
        med = statistics.median(r.times)
        e.update(n=len(r.times), ms_median=med, ms_p10=pct(r.times, 0.1), ms_p90=pct(r.times, 0.9),
                 ms_mean=statistics.fmean(r.times), ms_min=min(r.times),
                 tokens_per_s=result["tokens_per_iter"] / (med / 1e3),
                 mfu=r.model.estimate_mfu(cfg["batch_size"], med / 1e3, r.dtype),
                 flops_per_iter=flops_per_iter)
        e.setdefault("peak_mem_mb", None)
    timed = [e for e in result["modes"] if "ms_median" in e]
    base = BASELINE if any(e["mode"] == BASELINE for e in timed) else (timed[0]["mode"] if timed else None)
    result["baseline"] = base
    for e in timed:
        e["ratio_to_baseline"] = e["ms_median"] / entries[base]["ms_median"]

    result["loadavg_after"] = _loadavg()
    result["auto_gate"] = gate = auto_gate(result["modes"], cfg["max_auto_slowdown"])
    costs = checkpointing_costs(result["modes"])
    _write_json(cfg, result, None)
    log("")
    log(format_table(result))
    for line in costs:
        log(line)
    for msg in gate["failed"]:
        log("ERROR: " + msg)

    # ---- profile
    if cfg["profile"]:
        result["profile"] = {}
        for want in (m.strip() for m in cfg["profile"].split(",") if m.strip()):
            target = next((r for r in runners if r.name == want), None)
            if target is None:
                log(f"profile: mode {want!r} is not among the modes that ran "
                    f"({', '.join(r.name for r in runners)}); add it to --modes")
            else:
                try:
                    result["profile"][want] = profile_mode(target, cfg)
                except Exception as e:  # noqa: BLE001 - keep the timings
                    log(f"profile of {want} failed: {type(e).__name__}: {e}")
                    result["profile"][want] = {"error": f"{type(e).__name__}: {e}"}
    result["failed_modes"] = [e["mode"] for e in result["modes"] if e["status"] == "failed"]
    result["complete"] = True
    _write_json(cfg, result, log)
    return result


def auto_gate(modes, max_slowdown):
    """Eager auto (--kernels=auto) against eager torch in each dtype (and activation checkpointing) both ran in:
    a failure message when auto's median ms/step is more than max_slowdown slower."""
    timed = [e for e in modes if "ms_median" in e and not e["compile"]]
    torch_ms = {(e["dtype"], e["activation_checkpointing"]): e["ms_median"] for e in timed if e["kernels"] == "torch"}
    checked, failed = [], []
    for e in timed:
        key = (e["dtype"], e["activation_checkpointing"])
        if e["kernels"] != "auto" or key not in torch_ms:
            continue
        ratio = e["ms_median"] / torch_ms[key]
        checked.append({"mode": e["mode"], "dtype": e["dtype"], "ratio_to_torch": ratio})
        if ratio > 1 + max_slowdown:
            ac = "" if key[1] == "none" else f" with activation_checkpointing={key[1]}"
            failed.append(f"{e['mode']} is {100 * (ratio - 1):.1f}% slower than torch (eager) in {e['dtype']}{ac}: "
                          f"{e['ms_median']:.2f} vs {torch_ms[key]:.2f} median ms/step "
                          f"(limit {100 * max_slowdown:g}%; backends {describe(e['backends'])})")
    return {"max_slowdown": max_slowdown, "checked": checked, "failed": failed}


def checkpointing_costs(modes):
    """What activation checkpointing costs: each +block/+selective mode's median ms/step and peak memory against
    the same mode without it (when that ran), recorded in its entry as `vs_no_checkpointing`; one line each."""
    timed = {(e["kernels"], e["compile"], e["dtype"], e["activation_checkpointing"]): e
             for e in modes if "ms_median" in e}
    lines = []
    for (sel, comp, dtype, ac), e in timed.items():
        plain = timed.get((sel, comp, dtype, "none"))
        if ac == "none" or plain is None:
            continue
        mem = None if None in (e["peak_mem_mb"], plain["peak_mem_mb"]) or plain["peak_mem_mb"] <= 0 \
            else e["peak_mem_mb"] / plain["peak_mem_mb"]
        e["vs_no_checkpointing"] = {"mode": plain["mode"], "ms_ratio": e["ms_median"] / plain["ms_median"],
                                    "peak_mem_ratio": mem}
        lines.append(f"activation checkpointing: {e['mode']} takes {e['ms_median']:.2f} ms/step, "
                     f"{e['ms_median'] / plain['ms_median']:.2f}x {plain['mode']}'s; peak memory "
                     + ("not measured" if mem is None else f"{e['peak_mem_mb']:.0f} MiB, {mem:.2f}x"))
    return lines


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _triton_version():
    try:
        import triton
        return triton.__version__
    except Exception:  # noqa: BLE001
        return None


def _write_json(cfg, result, log):
    if cfg["json"]:
        d = os.path.dirname(os.path.abspath(cfg["json"]))
        os.makedirs(d, exist_ok=True)
        tmp = cfg["json"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, cfg["json"])
        if log:
            log(f"wrote {cfg['json']}")


def format_table(result):
    head = ["mode", "backends", "median ms", "p10 ms", "p90 ms", "tokens/s", "MFU", "peak MiB",
            f"vs {result['baseline']}"]
    rows = []
    for e in result["modes"]:
        if "ms_median" not in e:
            rows.append([e["mode"], e["status"] + ": " + (e["reason"] or "")[:70], "", "", "", "", "", "", ""])
            continue
        be = describe(e["backends"])
        mem = "-" if e.get("peak_mem_mb") is None else f"{e['peak_mem_mb']:.0f}"
        rows.append([e["mode"], be, f"{e['ms_median']:.2f}", f"{e['ms_p10']:.2f}", f"{e['ms_p90']:.2f}",
                     f"{e['tokens_per_s']:,.0f}", f"{100 * e['mfu']:.3g}%", mem, f"{e['ratio_to_baseline']:.2f}x"])
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(n) for c, n in zip(cells, w)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * n for n in w])] + [line(r) for r in rows]
    if result.get("memory_method"):
        out.append(f"peak memory: {result['memory_method']}")
    out.append(f"MFU: {result.get('peak_flops_note')}")
    return "\n".join(out)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ops.separate_inductor_cache()
    cfg = load_config(argv)
    if cfg["probe"]:
        run_probe(cfg)
        return None
    return run(cfg, argv)


def cli(argv=None):
    """main() as a command: its exit code (0; 1 a failed gate or a crashed mode; 2 bad input), errors on stderr."""
    try:
        res = main(argv)
    except LossMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (UserError, registry.KernelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    errors = []
    if res:  # None after a memory probe
        if res["failed_modes"]:
            errors.append(f"mode(s) {', '.join(res['failed_modes'])} crashed (see above)")
        errors += res["auto_gate"]["failed"]
    for msg in errors:
        print(f"error: {msg}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(cli())
