"""Train a GPT: single process, or DDP under torchrun.

    nanogpt-train configs/train_shakespeare_char.py --batch_size=32
    torchrun --standalone --nproc_per_node=8 -m nanogpt.train configs/train_gpt2.py
    torchrun --nproc_per_node=8 --nnodes=2 --node_rank=0 --master_addr=IP --master_port=1234 \\
        -m nanogpt.train configs/train_gpt2.py

The defaults below train GPT-2 124M on OpenWebText; config files and
--key=value override them (nanogpt.configurator).

Nothing is lost on a crash, kill or preemption: checkpoints are atomic
(nanogpt.checkpoint); SIGTERM/SIGINT save at the next step boundary and exit 0;
--init_from=resume (or auto, e.g. under torchrun --max-restarts=N) continues
bitwise-exactly (with --deterministic=True), metrics.jsonl included. Bad input
is a one-line `error: ...` and exit 2 before anything is written.
"""
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanogpt import checkpoint, ops
from nanogpt.configurator import configure
from nanogpt.data import Batcher, check_data
from nanogpt.errors import UserError, run_cli
from nanogpt.model import GPT, GPTConfig

DEFAULTS = dict(
    # I/O
    out_dir="out",
    eval_interval=2000,
    log_interval=1,
    eval_iters=200,
    eval_only=False,  # evaluate once, then exit
    always_save_checkpoint=True,  # save at every eval, not only when val loss improves
    init_from="scratch",  # scratch | resume | auto (resume if out_dir has a checkpoint) | gpt2* | HF directory
    # wandb (imported only when enabled)
    wandb_log=False,
    wandb_project="owt",
    wandb_run_name="gpt2",
    # data
    dataset="openwebtext",
    data_dir="",  # default: data/<dataset>
    sampler="random",  # random (with replacement, nanoGPT) | epoch (without replacement, disjoint ranks)
    gradient_accumulation_steps=5 * 8,  # global micro-steps per update (divided among DDP ranks)
    batch_size=12,  # micro-batch size per rank
    block_size=1024,
    # model
    n_layer=12,
    n_head=12,
    n_embd=768,
    dropout=0.0,
    bias=False,
    gelu="none",
    kernels="auto",  # see nanogpt.ops: auto | torch | triton | ext | per-op "attention:triton,..."
    # AdamW
    learning_rate=6e-4,
    max_iters=600000,
    weight_decay=1e-1,
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,  # 0 disables clipping
    # learning rate: linear warmup, cosine decay to min_lr
    decay_lr=True,
    warmup_iters=2000,
    lr_decay_iters=600000,
    min_lr=6e-5,
    # system
    backend="nccl",  # DDP on CUDA; CPU always uses gloo
    device="cuda",  # cpu | cuda | cuda:N | mps
    # float32 | bfloat16 | float16 (float16 uses a GradScaler) | auto (nanogpt.ops.auto_dtype: the faster
    # precision for this device and these kernels)
    dtype="float32" if not torch.cuda.is_available() else "bfloat16" if torch.cuda.is_bf16_supported() else "float16",
    compile=True,
    seed=1337,
    deterministic=False,  # torch.use_deterministic_algorithms, for bitwise-reproducible runs
    max_skips=20,  # stop after this many consecutive non-finite steps
)
PRETRAINED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout", "gelu")


class TrainingError(UserError, RuntimeError):
    pass


def get_lr(it, c):
    """Linear warmup for warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < c["warmup_iters"]:
        return c["learning_rate"] * (it + 1) / (c["warmup_iters"] + 1)
    if it > c["lr_decay_iters"]:
        return c["min_lr"]
    ratio = (it - c["warmup_iters"]) / (c["lr_decay_iters"] - c["warmup_iters"])
    return c["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c["learning_rate"] - c["min_lr"])


def check_config(c, world):
    """Refuse bad settings before anything is loaded or written."""
    if c["init_from"] not in ("scratch", "resume", "auto", *PRETRAINED) and not os.path.isdir(c["init_from"]):
        raise UserError(f"unknown init_from {c['init_from']!r}; use scratch, resume, auto, "
                        f"{', '.join(PRETRAINED)} or a Hugging Face model directory")
    if c["dtype"] not in ("float32", "bfloat16", "float16", "auto"):
        raise UserError(f"unknown dtype {c['dtype']!r}; use float32, bfloat16, float16 or auto")
    if c["sampler"] not in ("random", "epoch"):
        raise UserError(f"unknown sampler {c['sampler']!r}; use random or epoch")
    for key in ("batch_size", "block_size", "gradient_accumulation_steps", "eval_iters", "eval_interval",
                "log_interval", "max_skips"):
        if c[key] < 1:
            raise UserError(f"{key} must be >= 1, got {c[key]}")
    if c["gradient_accumulation_steps"] % world:
        raise UserError(f"gradient_accumulation_steps={c['gradient_accumulation_steps']} is not divisible by "
                        f"the world size {world}; make it a multiple of {world}")
    if c["device"].startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={c['device']} but CUDA is not available; pass --device=cpu")
    device_type = "cuda" if "cuda" in c["device"] else c["device"]
    ops.resolve(c["kernels"], device_type)  # unknown or unusable kernels
    if c["dtype"] == "auto":  # resolved here, so the checkpoint's config holds the precision that ran
        c["dtype"] = ops.auto_dtype(device_type, c["kernels"])
    if c["init_from"] == "scratch" and not c["eval_only"] and checkpoint.exists(c["out_dir"]):
        raise UserError(f"{c['out_dir']} already holds a checkpoint; pass --init_from=resume (or auto) to continue "
                        "it, or a new --out_dir to start over")
    check_data(c["data_dir"] or os.path.join("data", c["dataset"]), c["dataset"], c["block_size"])


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def init_process_group(backend, rank, world):
    """dist.init_process_group, but with a fresh key space in the rendezvous store for every torchrun attempt.
    torchrun (2.4+) reuses its agent's TCPStore across --max-restarts restarts, so a restarted rank could read
    the dead attempt's addresses (gloo: "Connection refused"; NCCL: a stale unique id) and fail again."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return dist.init_process_group(backend=backend)
    from datetime import timedelta
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timedelta(minutes=30))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"nanogpt/attempt_{attempt}", store),
                            rank=rank, world_size=world)


def train(c):
    # ------------------------------------------------------------ distributed setup
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    check_config(c, world)
    device = c["device"]
    if ddp:
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        init_process_group(c["backend"] if device.startswith("cuda") else "gloo", rank, world)
    master = rank == 0
    device_type = "cuda" if "cuda" in device else device
    gas, B, T = c["gradient_accumulation_steps"] // world, c["batch_size"], c["block_size"]
    tokens_per_iter = gas * world * B * T
    if master:
        print(f"tokens per iteration: {tokens_per_iter:,} ({world} ranks x {gas} micro-steps x {B} x {T})")
    random.seed(c["seed"] + rank)
    np.random.seed(c["seed"] + rank)
    torch.manual_seed(c["seed"] + rank)
    if c["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    ptdtype = getattr(torch, c["dtype"])
    ctx = nullcontext() if c["dtype"] == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)

    # ------------------------------------------------------------ model
    data_dir = c["data_dir"] or os.path.join("data", c["dataset"])
    init_from = c["init_from"]
    if init_from == "auto":
        init_from = "resume" if checkpoint.exists(c["out_dir"]) else "scratch"
    state = None
    if init_from == "scratch":
        meta = os.path.join(data_dir, "meta.pkl")
        vocab_size = 50304
        if os.path.exists(meta):
            import pickle
            with open(meta, "rb") as f:
                vocab_size = pickle.load(f)["vocab_size"]
        margs = {k: c[k] for k in MODEL_KEYS if k != "vocab_size"} | {"vocab_size": vocab_size}
        model = GPT(GPTConfig(**margs, kernels=c["kernels"]), device_type)
    elif init_from == "resume":
        mp, state = checkpoint.load(c["out_dir"])
        margs = mp["model_args"]
        for k in MODEL_KEYS:
            if k not in ("vocab_size", "dropout") and k in margs and margs[k] != c[k]:
                raise UserError(f"the checkpoint in {c['out_dir']} has {k}={margs[k]!r} but the config says "
                                f"{c[k]!r}; pass --{k}={margs[k]!r} (the run's config) or use a new out_dir")
        model = GPT(GPTConfig(**margs, kernels=c["kernels"]), device_type)
        checkpoint.load_model_state(model, mp["model"], c["out_dir"])
    else:
        model = checkpoint.load_pretrained(init_from, T, dict(dropout=c["dropout"], kernels=c["kernels"]))
    margs = {k: getattr(model.config, k) for k in MODEL_KEYS}
    if master:
        print(f"model: {model.get_num_params() / 1e6:.2f}M parameters, {margs}")
        print(f"kernels ({device_type}, {c['dtype']}): {ops.describe(model.backends, device_type)}")
    model.to(device)
    batcher = Batcher(data_dir, c["dataset"], T, B, margs["vocab_size"], device, c["sampler"], c["seed"], rank, world)

    scaler = torch.amp.GradScaler(device_type, enabled=(c["dtype"] == "float16"))
    optimizer = model.configure_optimizers(c["weight_decay"], c["learning_rate"], (c["beta1"], c["beta2"]),
                                           device_type, grad_clip=c["grad_clip"])
    iter_num, best_val_loss, skipped = 0, 1e9, 0
    if state is not None:
        if len(state["ranks"]) != world:
            raise UserError(f"the checkpoint was written by {len(state['ranks'])} ranks, this run has {world}; "
                            "resume with the same number of ranks")
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        iter_num, best_val_loss, skipped = state["iter_num"], state["best_val_loss"], state.get("skipped", 0)
        set_rng_state(state["ranks"][rank]["rng"])
        batcher.load_state_dict(state["ranks"][rank]["batcher"])
        if master:
            print(f"resuming from iter {iter_num} (best val loss {best_val_loss:.4f})")
    raw_model = model
    if c["compile"]:
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

    @torch.no_grad()
    def estimate_loss():
        """Mean loss over eval_iters batches per split, the same batches at every eval, averaged over ranks."""
        out = {}
        model.eval()
        for split in ("train", "val"):
            gen = torch.Generator().manual_seed(c["seed"] + 1)
            losses = torch.zeros(c["eval_iters"], device=device)
            for k in range(c["eval_iters"]):
                X, Y = batcher.get_batch(split, gen)
                with ctx:
                    losses[k] = model(X, Y)[1]
            mean = losses.mean()
            if ddp:
                dist.all_reduce(mean, op=dist.ReduceOp.AVG)
            out[split] = mean.item()
        model.train()
        return out

    def save(best):
        ranks = [{"rng": rng_state(), "batcher": batch_state}]
        if ddp:
            gathered = [None] * world
            dist.all_gather_object(gathered, ranks[0])
            ranks = gathered
        if master:
            model_payload = {"model": raw_model.state_dict(), "model_args": margs, "iter_num": iter_num, "config": c}
            state_payload = {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "config": c,
                             "iter_num": iter_num, "best_val_loss": best_val_loss, "skipped": skipped, "ranks": ranks}
            checkpoint.save(c["out_dir"], iter_num, model_payload, state_payload, best=best)
            print(f"saved checkpoint at iter {iter_num} to {c['out_dir']}{' (best)' if best else ''}")
        if ddp:
            dist.barrier()

    if c["wandb_log"] and master:
        import wandb
        wandb.init(project=c["wandb_project"], name=c["wandb_run_name"], config=c)
    metrics = None
    if master:  # everything is checked: from here on the run writes to out_dir
        try:
            os.makedirs(c["out_dir"], exist_ok=True)
            if not c["eval_only"]:  # the log goes on from the checkpoint (a new run: from scratch)
                checkpoint.trim_log(os.path.join(c["out_dir"], "metrics.jsonl"), iter_num)
            metrics = open(os.path.join(c["out_dir"], "metrics.jsonl"), "a")
        except OSError as e:
            raise UserError(f"cannot write to out_dir {c['out_dir']} ({e.strerror}); pass a writable --out_dir") from None

    def log(record):
        if master:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            if c["wandb_log"]:
                wandb.log(record)

    # ------------------------------------------------------------ training loop
    batch_state = batcher.state_dict()  # the sampler as it was before fetching the batch in hand
    X, Y = batcher.get_batch("train")
    t0 = time.time()
    local_iter, running_mfu, consecutive = 0, -1.0, 0
    stop = checkpoint.StopOnSignal()  # SIGTERM/SIGINT (preemption, Ctrl-C): finish the step, save, exit 0
    while True:
        lr = get_lr(iter_num, c) if c["decay_lr"] else c["learning_rate"]
        for group in optimizer.param_groups:
            group["lr"] = lr

        if iter_num % c["eval_interval"] == 0:
            losses = estimate_loss()
            if master:
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            log({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"], "lr": lr})
            improved = losses["val"] < best_val_loss
            if improved:
                best_val_loss = losses["val"]
            if (improved or c["always_save_checkpoint"]) and iter_num > 0 and not c["eval_only"]:
                save(best=improved)
        if c["eval_only"]:
            break

        poison = checkpoint.inject_faults(iter_num, rank)  # test hooks, inert unless NANOGPT_TEST_* is set
        loss_sum = torch.zeros((), device=device)
        for micro_step in range(gas):
            if ddp:  # sync gradients on the last micro-step only
                model.require_backward_grad_sync = micro_step == gas - 1
            with ctx:
                _, loss = model(X, Y)
                loss = loss / gas
                if poison:
                    loss = loss * float("nan")
            loss_sum += loss.detach()
            batch_state = batcher.state_dict()
            X, Y = batcher.get_batch("train")  # prefetch while the GPU works
            scaler.scale(loss).backward()
        # a non-finite loss or gradient norm skips the update (the optimizer and GradScaler skip
        # non-finite gradients themselves); a signal stops the run after this step. Under DDP one
        # all_reduce carries both flags, so every rank skips and stops at the same step.
        stopping = stop.signal is not None
        if ddp:
            flags = torch.stack([(~torch.isfinite(loss_sum)).float(), torch.full((), float(stopping), device=device)])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            nonfinite, stopping = (bool(f) for f in flags.tolist())
        else:
            nonfinite = not torch.isfinite(loss_sum).item()
        grad_norm = None
        if not nonfinite:
            grad_norm = scaler.step(optimizer)  # unscales, clips inside; None or non-finite: skipped
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if grad_norm is None or not torch.isfinite(grad_norm):
            skipped += 1
            consecutive += 1
            if consecutive >= c["max_skips"]:
                kept = (f"the last good checkpoint (iter {checkpoint.latest_iter(c['out_dir'])}) in {c['out_dir']} is "
                        "intact" if checkpoint.exists(c["out_dir"]) else "no checkpoint was written")
                raise TrainingError(f"{consecutive} consecutive steps had a non-finite loss or gradient (iters "
                                    f"{iter_num - consecutive + 1}-{iter_num}): lower learning_rate or raise "
                                    f"warmup_iters{' (or use bfloat16)' if c['dtype'] == 'float16' else ''}; {kept}")
        else:
            consecutive = 0

        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if iter_num % c["log_interval"] == 0 and master:
            lossf = loss_sum.item()  # a sync point: the mean loss over the micro-steps
            record = {"iter": iter_num, "loss": lossf, "lr": lr, "ms": dt * 1000, "tokens_per_s": tokens_per_iter / dt,
                      "grad_norm": None if grad_norm is None else grad_norm.item(), "skipped": skipped, "mfu": None}
            line = f"iter {iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, {tokens_per_iter / dt:,.0f} tok/s"
            if device_type == "cuda" and local_iter >= 5:  # let the loop settle before measuring MFU
                mfu = raw_model.estimate_mfu(B * gas, dt, c["dtype"])  # per GPU
                running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
                record["mfu"] = running_mfu
                line += f", mfu {running_mfu * 100:.2f}%"
            if skipped:
                line += f", {skipped} skipped steps"
            print(line)
            log(record)
        iter_num += 1
        local_iter += 1
        if stopping:
            save(best=False)
            if master:
                print(f"stopped by signal at iter {iter_num}; rerun with --init_from=resume to continue")
            break
        if iter_num > c["max_iters"]:
            break

    stop.restore()
    if metrics:
        metrics.close()
    if ddp:
        dist.destroy_process_group()


def _main(argv):
    c = configure(DEFAULTS, sys.argv[1:] if argv is None else argv)
    try:
        train(c)
    except torch.OutOfMemoryError:
        raise UserError(f"out of memory with batch_size={c['batch_size']} x block_size={c['block_size']} per "
                        "micro-step: lower batch_size (and raise gradient_accumulation_steps to keep the tokens per "
                        "iteration) or block_size; nothing was saved after the last checkpoint") from None


def main(argv=None):
    run_cli(_main, argv)


if __name__ == "__main__":
    main()
