"""Muon step benchmark: our optimizer=muon step against torch.optim.Muon on the same parameters.

    python benchmarks/bench_muon.py                                    # the modern CPU quick start's shape
    python benchmarks/bench_muon.py --n_layer=12 --n_head=12 --n_embd=768 --vocab_size=50304 --iters=10

Both sides update the same model's hidden matrices (nanogpt.muon.split_params) from the same random gradients,
with the same AdamW (torch's, or --adamw=ext/triton for ours only) on the rest: `torch` is torch.optim.Muon +
torch.optim.AdamW (each hidden matrix orthogonalised in turn), `ours` is the trainer's optimizer (the
Newton-Schulz iteration batched over same-shaped matrices). The steps are interleaved; the table gives the
median ms per step and ours as a fraction of torch's. After the first step the hidden matrices must be equal
(ours runs torch.optim.Muon's arithmetic) up to how the BLAS blocks a batched product against one matrix's,
which depends on the machine and the thread count (1e-4 seen on a 16-core CPU): within two bf16 ulps of a
unit-size update (lr * 2**-6), else exit code 1.
"""
import datetime
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_cases import device_name, require_device  # noqa: E402
from nanogpt import muon  # noqa: E402
from nanogpt.configurator import Keys, configure  # noqa: E402
from nanogpt.errors import run_cli  # noqa: E402
from nanogpt.model import GPT, MODERN, GPTConfig  # noqa: E402

LR = 0.02  # Muon's lr, both sides
TOLERANCE = LR * 2**-6  # two bf16 ulps of a unit-size update (the docstring)

DEFAULTS = Keys("python benchmarks/bench_muon.py", __doc__, {
    "model": dict(
        n_layer=(4, "transformer blocks"),
        n_head=(4, "attention heads"),
        n_embd=(128, "embedding width"),
        block_size=(64, "context length"),
        vocab_size=(65, "vocabulary size"),
    ),
    "timing": dict(
        iters=(50, "timed steps per side"),
        warmup=(3, "untimed steps per side first"),
        adamw=("torch", "our side's AdamW backend for the non-hidden parameters: torch | ext | triton"),
    ),
    "system": dict(
        device=("cpu", "cpu | cuda | cuda:N"),
        threads=(0, "torch.set_num_threads when > 0; 0 keeps torch's default"),
        seed=(1337, "random seed"),
    ),
})


def build(c):
    torch.manual_seed(c["seed"])
    shape = {k: c[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")}
    device = torch.device(c["device"])
    return GPT(GPTConfig(**shape, **MODERN, kernels=f"adamw:{c['adamw']}"), device.type).to(device)


def run(c, argv=(), log=print):
    require_device(c["device"])
    if c["threads"] > 0:
        torch.set_num_threads(c["threads"])
    ours_model, ref_model = build(c), build(c)
    ours = ours_model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), optimizer="muon", muon_lr=LR, muon_momentum=0.95)
    hidden, _ = muon.split_params(ref_model)
    ref = [torch.optim.Muon(hidden, lr=LR, weight_decay=0.0, momentum=0.95, nesterov=True),
           torch.optim.AdamW(ref_model.optimizer_groups(0.1, "muon"), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)]
    gen = torch.Generator().manual_seed(c["seed"])
    grads = [(torch.randn(p.shape, generator=gen) * 1e-2).to(p.device) for p in ours_model.parameters()]
    sync = torch.cuda.synchronize if torch.device(c["device"]).type == "cuda" else (lambda: None)
    sides = {"torch": (ref_model, ref), "ours": (ours_model, [ours])}

    def step(name):
        model, opts = sides[name]
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        sync()
        t0 = time.perf_counter()
        for o in opts:
            o.step()
        sync()
        return time.perf_counter() - t0

    for name in sides:
        step(name)
    diff = max((a - b).abs().max().item() for a, b in zip(muon.split_params(ours_model)[0], hidden))
    same = diff <= TOLERANCE
    for _ in range(c["warmup"]):
        for name in sides:
            step(name)
    times = {name: [] for name in sides}
    for _ in range(c["iters"]):
        for name in sides:
            times[name].append(step(name))
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    n_hidden = len(hidden)
    log(f"{device_name(c['device'])}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, load average {os.getloadavg()[0]:.2f}; "
        f"{n_hidden} hidden matrices in {len({tuple(p.shape) for p in hidden})} shapes")
    log("| side | median ms/step | vs torch |")
    log("|---|---|---|")
    what = {"torch": "torch.optim.Muon + AdamW", "ours": f"optimizer=muon, adamw:{c['adamw']}"}
    for name in sides:
        log(f"| {name} ({what[name]}) | {ms[name]:.2f} | {ms[name] / ms['torch']:.2f}x |")
    log(f"first step's hidden matrices {'agree' if same else 'DIFFER'} (ours vs torch.optim.Muon, "
        f"max |diff| {diff:.2e}, tolerance {TOLERANCE:.2e})")
    if not same:
        sys.exit(1)
    return ms


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    run_cli(lambda a: run(configure(DEFAULTS, a), a), argv)


if __name__ == "__main__":
    main()
