"""How the trainer picks its kernels: the selector (nanogpt_kernels.registry) and the training precision.

The selector string (`GPTConfig.kernels`, `--kernels=...`) is one backend name for every op (`auto`,
`torch`, `triton`, `ext`) or a per-op list such as `attention:triton,layer_norm:torch`; ops not named take
`auto`. See nanogpt_kernels.registry for the ops and backends.
"""
import os
import tempfile

import torch

import nanogpt_kernels.autotune as kernel_autotune
from nanogpt_kernels.autotune import device_key
from nanogpt_kernels.registry import KernelError, describe, parse, resolve, unavailable  # noqa: F401


def cpu_native_bf16():
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX) and oneDNN, which runs torch's bf16
    matmuls, may use it; elsewhere bf16 is emulated (on an AMX CPU with ONEDNN_MAX_CPU_ISA=AVX2, as an AVX2-only
    machine is timed, a bf16 quick-start step took 895 ms against 58 ms in float32)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()
    if cap != "ALL" and not any(isa in cap for isa in ("BF16", "FP16", "AMX", "AVX10")):
        return False
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                     "_is_amx_tile_supported"))


def separate_inductor_cache():
    """Give a process under ATEN_CPU_CAPABILITY (PyTorch's kernels capped to an ISA, as on a CPU without AVX-512) its
    own torch.compile cache, unless TORCHINDUCTOR_CACHE_DIR says where: the cache does not key on the cap (torch
    2.13), and code compiled under another cap came back as wrong losses (NaN) or a malloc abort."""
    cap = os.environ.get("ATEN_CPU_CAPABILITY")
    if cap and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"torchinductor_{cap}")


def auto_dtype(device_type, kernels="auto"):
    """`dtype=auto`: the faster training precision here with these kernels. CUDA: bfloat16 where the GPU has
    it, else float16. CPU: bfloat16 (autocast) where the CPU multiplies bf16 in hardware and attention runs on
    the extension's CPU kernel (torch's own CPU attention backward is slow in bf16), else float32."""
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    fast = device_type == "cpu" and cpu_native_bf16() and resolve(kernels, "cpu")["attention"] == "ext"
    return "bfloat16" if fast else "float32"


def capture_calls(model, X, Y, ctx):
    """One forward of `model` on (X, Y) under ctx, recording each layer op's first call (every layer of a GPT
    calls an op with the same shapes). The torch MLP path is bypassed here so bias_gelu's call is seen too."""
    calls, backends = {}, dict(model.backends)
    model.set_backends(dict.fromkeys(backends, "torch"))  # the reference: a broken kernel cannot stop the capture

    def recorder(op, fn):
        def record(*args, **kwargs):
            if op not in calls:
                calls[op] = kernel_autotune.Call(args, kwargs)
            return fn(*args, **kwargs)
        return record

    for m in model.modules():
        if hasattr(m, "op"):
            m.fn = recorder(m.op, m.fn)
    try:
        with torch.no_grad(), ctx:
            model(X, Y)
    finally:
        model.set_backends(backends)
    return calls


def select_kernels(model, X, Y, ctx, kernels="auto", autotune=True, optim=None, log=print, recorded=None):
    """Choose each op's backend, set it on the model and return {op: backend}.

    Ops the selector names keep their backend. With autotune the `auto` ones are measured on this model's
    real calls (nanogpt_kernels.autotune: fastest correct backend, torch unless another is 3% faster),
    or read from its cache; without it they take the fixed order. `recorded` is what a checkpoint says
    it trained with ({"device": ..., "backends": ...}): on the same machine a resume reuses it. Under
    DDP rank 0 decides and broadcasts, so every rank runs the same backends. `optim`: the keyword
    arguments of model.configure_optimizers (weight_decay, learning_rate, betas, eps, grad_clip, optimizer:
    with muon, AdamW is measured on the parameters Muon leaves to it). Only the ops the model runs
    (model.ops()) are measured and returned."""
    device = X.device
    log = log or (lambda line: None)
    wanted, fixed = parse(kernels), resolve(kernels, device.type)
    auto = [op for op in model.ops() if wanted[op] == "auto" and (op != "adamw" or optim is not None)]
    dist = torch.distributed
    ddp = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    choice, report = {op: fixed[op] for op in model.ops()}, None
    if autotune and auto and (not ddp or dist.get_rank() == 0):
        key = device_key(device)
        if recorded and recorded.get("device") == key and all(
                unavailable(op, recorded["backends"].get(op, ""), device.type) is None for op in auto):
            choice.update({op: recorded["backends"][op] for op in auto})
            report = f"kernels from the checkpoint (trained on this machine: {key})"
        else:
            groups = hyper = None
            if "adamw" in auto:
                groups = model.optimizer_groups(optim["weight_decay"], optim.get("optimizer", "adamw"))
                hyper = dict(lr=optim["learning_rate"], betas=tuple(optim["betas"]), eps=optim.get("eps", 1e-8),
                             weight_decay=optim["weight_decay"], max_grad_norm=optim.get("grad_clip", 0.0))
            layer_ops = [op for op in auto if op != "adamw"]
            # the forward and the measurements draw dropout masks: keep the run's RNG streams as they were
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                calls = capture_calls(model, X, Y, ctx) if layer_ops else {}
                sel = kernel_autotune.select(auto, device, calls, groups, hyper, ctx, getattr(ctx, "fast_dtype", None))
            choice.update(sel.choice)
            report = kernel_autotune.format_table(sel)
    if ddp and autotune and auto:
        box = [choice, report]
        dist.broadcast_object_list(box, src=0)
        choice, report = box
    model.set_backends(choice)
    if report:
        log(report)
    return choice
