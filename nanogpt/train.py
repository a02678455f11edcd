"""Train a GPT: single process, or DDP or FSDP under torchrun.

    nanogpt-train configs/train_shakespeare_char.py --batch_size=32
    torchrun --standalone --nproc_per_node=8 -m nanogpt.train configs/train_gpt2.py
    torchrun --standalone --nproc_per_node=8 -m nanogpt.train configs/train_gpt2.py --parallelism=fsdp
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
import importlib.util
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nanogpt import checkpoint, cpu_memory, harness, health, ops, parallel
from nanogpt.codec import read_meta
from nanogpt.configurator import Keys, configure
from nanogpt.data import Batcher, check_data
from nanogpt.errors import UserError, run_cli
from nanogpt.metrics import MetricsLog, trim_log
from nanogpt.model import CHOICES, GPT, MODERN, GPTConfig
from nanogpt.signals import StopOnSignal

DEFAULTS = Keys("nanogpt-train", __doc__, {
    "I/O": dict(
        out_dir=("out", "where checkpoints, metrics.jsonl and loss.png go"),
        plot=(True, "draw out_dir/loss.png at the end of training (when matplotlib is installed)"),
        eval_interval=(2000, "evaluate both splits (and save a checkpoint) every this many iters, and at max_iters"),
        log_interval=(1, "print and log the training loss every this many iters"),
        eval_iters=(200, "batches per split in an evaluation"),
        eval_only=(False, "evaluate once, then exit"),
        always_save_checkpoint=(True, "save at every eval; False: only when val loss improves (and at max_iters)"),
        async_checkpoint=(False, "write checkpoints in the background (parallelism=fsdp); the step loop waits only "
                          "for the copy to memory, before the next optimizer step (checkpoint_staging_ms)"),
        init_from=("scratch", "scratch | resume (from out_dir) | auto (resume if out_dir has a checkpoint, done if "
                   "it reached max_iters) | gpt2* | a Hugging Face directory"),
    ),
    "evaluation": dict(
        eval_tasks=("", "lm-evaluation-harness tasks to score during training, e.g. hellaswag (\"\": none; GPT-2 "
                    "BPE models; pip install lm_eval)"),
        eval_tasks_interval=(0, "score eval_tasks every this many iters, at an eval (a multiple of eval_interval)"),
        eval_tasks_limit=(0, "documents per task (0: all)"),
        eval_include_path=("", "a directory of extra task YAMLs (as nanogpt-eval's --include_path)"),
    ),
    "logging": dict(
        wandb_log=(False, "also log to Weights & Biases (wandb is imported only when enabled)"),
        wandb_project=("owt", "wandb project"),
        wandb_run_name=("gpt2", "wandb run name"),
        tensorboard=(False, "also log to TensorBoard, in out_dir/tensorboard (needs: pip install tensorboard)"),
        spike_k=(6.0, "log a spike event when a loss is this many standard deviations above the window's mean"),
        spike_window=(100, "logged losses the spike detector's mean and deviation are taken over"),
    ),
    "data": dict(
        dataset=("openwebtext", "the prepared dataset's name (nanogpt-prepare NAME)"),
        data_dir=("", "where its train.bin/val.bin are (\"\": data/<dataset>)"),
        sampler=("random", "random (with replacement, nanoGPT) | epoch (without replacement, disjoint ranks)"),
        gradient_accumulation_steps=(5 * 8, "global micro-steps per update (divided among DDP ranks)"),
        batch_size=(12, "micro-batch size per rank"),
        block_size=(1024, "context length in tokens"),
    ),
    "model": dict(
        n_layer=(12, "transformer blocks"),
        n_head=(12, "attention heads"),
        n_embd=(768, "embedding width"),
        dropout=(0.0, "dropout probability"),
        bias=(False, "biases in the Linear layers and LayerNorms"),
        gelu=("none", "the GELU's tanh approximation: none | tanh"),
        kernels=("auto", "auto | torch | triton | ext | per op, e.g. attention:triton,layer_norm:torch "
                 "(nanogpt.ops)"),
        autotune=(True, "auto measures each op's backends here (cached); False: the fixed order"),
        pos_emb=("learned", "position embeddings: learned (GPT-2) | rope (rotary)"),
        rope_theta=(10000.0, "RoPE's base (pos_emb=rope)"),
        norm=("layernorm", "layernorm (GPT-2) | rmsnorm"),
        qk_norm=(False, "RMSNorm on each head's queries and keys"),
        mlp=("gelu", "the MLP's activation: gelu (GPT-2) | relu2 (ReLU squared)"),
        tie_embeddings=(True, "the token embedding is lm_head's weight (GPT-2); False: untied"),
        logit_softcap=(0.0, "logits become softcap * tanh(logits / softcap) when > 0; 0: off"),
        zero_init_proj=(False, "the residual projections (attn and MLP c_proj) start at zero"),
    ),
    "optimizer": dict(
        learning_rate=(6e-4, "peak learning rate (AdamW)"),
        max_iters=(600000, "the last iteration to train"),
        weight_decay=(1e-1, "AdamW weight decay (2-D weights only)"),
        beta1=(0.9, "AdamW beta1"),
        beta2=(0.95, "AdamW beta2"),
        grad_clip=(1.0, "clip the gradient norm to this (0 disables clipping)"),
        optimizer=("adamw", "adamw | muon (Muon on the hidden matrices, AdamW on the rest; nanogpt.muon)"),
        muon_lr=(0.02, "Muon's peak learning rate (optimizer=muon; the schedule scales it as learning_rate)"),
        muon_momentum=(0.95, "Muon's Nesterov momentum"),
        muon_momentum_warmup=(300, "iters over which Muon's momentum ramps from 0.85 up to muon_momentum"),
    ),
    "schedule": dict(
        decay_lr=(True, "linear warmup, then cosine decay to min_lr; False: constant learning_rate"),
        warmup_iters=(2000, "iters of linear warmup"),
        lr_decay_iters=(600000, "iter where the cosine decay reaches min_lr"),
        min_lr=(6e-5, "learning rate after lr_decay_iters"),
    ),
    "system": dict(
        backend=("nccl", "DDP backend on CUDA (CPU always uses gloo)"),
        device=("cuda", "cpu | cuda | cuda:N | mps"),
        dtype=("float32" if not torch.cuda.is_available() else "bfloat16" if torch.cuda.is_bf16_supported()
               else "float16", "float32 | bfloat16 | float16 (with a GradScaler) | auto (the faster precision for "
               "this device and these kernels)"),
        compile=(True, "torch.compile the model"),
        cpu_keep_memory=(True, "device=cpu: glibc malloc keeps freed memory for the next step instead of page "
                         "faulting it back every step (nanogpt.cpu_memory); False: the system's default"),
        seed=(1337, "random seed (rank r uses seed + r)"),
        deterministic=(False, "torch.use_deterministic_algorithms, for bitwise-reproducible runs"),
        max_skips=(20, "stop after this many consecutive non-finite steps"),
        parallelism=("ddp", "ddp (every rank holds the whole model) | fsdp (FSDP2: parameters, gradients and "
                     "optimizer state sharded over the ranks; sharded checkpoints, nanogpt.dcp)"),
        activation_checkpointing=("none", "none | block (recompute each block in backward) | selective (keep "
                                  "matmul and attention outputs, recompute the rest)"),
    ),
})
PRETRAINED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout", "gelu", *MODERN,
              "rope_theta")


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


def get_muon_momentum(it, c):
    """Muon's momentum: from 0.85 up to muon_momentum over muon_momentum_warmup iters (nanochat's ramp)."""
    frac = min(1.0, it / c["muon_momentum_warmup"]) if c["muon_momentum_warmup"] > 0 else 1.0
    return (1 - frac) * 0.85 + frac * c["muon_momentum"]


def check_config(c, world):
    """Refuse bad settings before anything is loaded or written."""
    if c["init_from"] not in ("scratch", "resume", "auto", *PRETRAINED) and not os.path.isdir(c["init_from"]):
        raise UserError(f"unknown init_from {c['init_from']!r}; use scratch, resume, auto, "
                        f"{', '.join(PRETRAINED)} or a Hugging Face model directory")
    if c["dtype"] not in ("float32", "bfloat16", "float16", "auto"):
        raise UserError(f"unknown dtype {c['dtype']!r}; use float32, bfloat16, float16 or auto")
    if c["sampler"] not in ("random", "epoch"):
        raise UserError(f"unknown sampler {c['sampler']!r}; use random or epoch")
    for key, allowed in [*CHOICES.items(), ("optimizer", ("adamw", "muon"))]:
        if c[key] not in allowed:
            raise UserError(f"unknown {key} {c[key]!r}; use {' or '.join(allowed)}")
    if c["pos_emb"] == "rope" and (c["n_embd"] // c["n_head"]) % 2:
        raise UserError(f"pos_emb=rope needs an even head size, n_embd/n_head = {c['n_embd'] // c['n_head']}; "
                        "change n_embd or n_head")
    if c["logit_softcap"] < 0:
        raise UserError(f"logit_softcap must be > 0 (or 0: off), got {c['logit_softcap']}")
    parallel.check(c)
    health.check(c)
    for key in ("batch_size", "block_size", "gradient_accumulation_steps", "eval_iters", "eval_interval",
                "log_interval", "max_skips"):
        if c[key] < 1:
            raise UserError(f"{key} must be >= 1, got {c[key]}")
    if c["gradient_accumulation_steps"] % world:
        raise UserError(f"gradient_accumulation_steps={c['gradient_accumulation_steps']} is not divisible by "
                        f"the world size {world}; make it a multiple of {world}")
    if c["device"].startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={c['device']} but CUDA is not available; pass --device=cpu")
    if bool(c["eval_tasks"]) != (c["eval_tasks_interval"] > 0) or c["eval_tasks_interval"] % c["eval_interval"]:
        raise UserError(f"eval_tasks={c['eval_tasks']!r} with eval_tasks_interval={c['eval_tasks_interval']}: give "
                        f"both, the interval a multiple of eval_interval={c['eval_interval']} (or neither)")
    if c["eval_tasks"]:
        harness.lm_class()  # lm_eval is installed
    device_type = "cuda" if "cuda" in c["device"] else c["device"]
    ops.resolve(c["kernels"], device_type)  # unknown or unusable kernels
    if c["dtype"] == "auto":  # resolved here, so the checkpoint's config holds the precision that ran
        c["dtype"] = ops.auto_dtype(device_type, c["kernels"])
    if c["init_from"] == "scratch" and not c["eval_only"] and checkpoint.exists(c["out_dir"]):
        raise UserError(f"{c['out_dir']} already holds a checkpoint; pass --init_from=resume (or auto) to continue "
                        "it, or a new --out_dir to start over")
    data_dir = c["data_dir"] or os.path.join("data", c["dataset"])
    check_data(data_dir, c["dataset"], c["block_size"])
    if c["eval_tasks"] and read_meta(data_dir) is not None:
        raise UserError(f"eval_tasks scores GPT-2 BPE models, and {data_dir} is char-level data; drop --eval_tasks")


def rng_state():
    """Every RNG's state as tensors and plain Python, what a weights-only checkpoint holds (numpy's key as a list)."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    return {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])  # also the tuple with an ndarray that checkpoints of earlier releases hold
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


@dataclass
class Process:
    """Where this process runs: rank `rank` of `world` (`ddp`: in a process group, under torchrun or FSDP),
    on `device`."""
    ddp: bool
    rank: int
    local_rank: int
    world: int
    device: str

    @property
    def master(self):  # the rank that prints and writes out_dir
        return self.rank == 0

    @property
    def device_type(self):
        return "cuda" if "cuda" in self.device else self.device


@dataclass
class Run:
    """What the steps of the loop share: the model and its training state (iter_num, best_val_loss, skipped,
    and the sampler state in batch_state are checkpointed), the batch in hand and per-process counters."""
    c: dict
    proc: Process
    ctx: object  # autocast, or nullcontext for float32
    gas: int  # micro-steps per update on this rank
    raw_model: GPT
    model: torch.nn.Module  # raw_model, compiled and/or wrapped in DDP: what runs forward and backward
    margs: dict
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batcher: Batcher
    kernels: dict  # {"device": ..., "backends": {op: backend}}: what ran, recorded in the checkpoint
    iter_num: int = 0
    best_val_loss: float = 1e9
    skipped: int = 0  # steps skipped over a non-finite loss or gradient, in all
    consecutive: int = 0  # ... in a row, up to this step
    batch_state: dict = None  # the sampler as it was before fetching the batch in hand (X, Y)
    X: torch.Tensor = None
    Y: torch.Tensor = None
    local_iter: int = 0  # steps this process ran (MFU waits for the loop to settle)
    running_mfu: float = -1.0
    spikes: health.SpikeDetector = None  # the master's
    health: dict = None  # the last logged step's health fields (nanogpt.health)


def train(c):
    """Set up, run the loop (unless init_from=auto finds out_dir's run done), draw out_dir/loss.png."""
    proc = setup_distributed(c)
    gas, B, T = c["gradient_accumulation_steps"] // proc.world, c["batch_size"], c["block_size"]
    tokens_per_iter = gas * proc.world * B * T
    if proc.master:
        print(f"tokens per iteration: {tokens_per_iter:,} ({proc.world} ranks x {gas} micro-steps x {B} x {T})")
    if proc.device_type == "cpu" and c["cpu_keep_memory"]:
        line = cpu_memory.keep_freed_memory()
        if proc.master:
            print(line)
    ctx = seed_and_precision(c, proc)
    run = init_run(c, proc, ctx, gas)
    if run is not None:
        loop(run, tokens_per_iter)
        if proc.master and not c["eval_only"] and c["plot"]:
            write_loss_plot(c["out_dir"])
    if proc.ddp:
        if c["parallelism"] == "fsdp":
            from nanogpt import dcp  # imported only where used: torch.distributed.checkpoint takes a second
            dcp.close()
        dist.destroy_process_group()


def loop(run, tokens_per_iter):
    """nanoGPT's loop: every eval_interval (and at max_iters) evaluate (and save), then one update per iteration,
    logged; a signal saves and stops at the end of its step."""
    c, proc = run.c, run.proc
    with open_metrics(c, run) as metrics, StopOnSignal() as stop:
        run.batch_state = run.batcher.state_dict()
        run.X, run.Y = run.batcher.get_batch("train")  # each step fetches the next step's batch
        t0 = time.time()
        while True:
            lr = set_lr(run)
            if run.iter_num % c["eval_interval"] == 0 or run.iter_num == c["max_iters"]:
                evaluate(run, lr, metrics)
            if c["eval_only"]:
                break
            start = run.batch_state  # the sampler before this step's batches: where a spike's rows are found
            loss, grad_norm, stopping = train_step(run, stop)
            if c["async_checkpoint"]:  # the rest of a background save's stall: the optimizer step's wait for its copy
                from nanogpt import dcp
                waited = dcp.last_staging_wait()
                if waited is not None:
                    metrics.write({"iter": run.iter_num, "checkpoint_staging_ms": waited})
            count_skip(run, grad_norm)
            t1 = time.time()
            dt, t0 = t1 - t0, t1
            if run.iter_num % c["log_interval"] == 0 and proc.master:
                log_step(run, loss, grad_norm, lr, dt, tokens_per_iter, metrics, start)
            run.iter_num += 1
            run.local_iter += 1
            if stopping:
                save(run, best=False)
                if proc.master:
                    print(f"stopped by signal at iter {run.iter_num}; rerun with --init_from=resume to continue")
                break
            if run.iter_num > c["max_iters"]:
                break
        if c["parallelism"] == "fsdp":
            from nanogpt import dcp
            dcp.wait()  # a checkpoint still being written in the background


# ------------------------------------------------------------ setup

def setup_distributed(c):
    """Read torchrun's environment, check the config (before joining: a bad config is one line per rank), join
    the process group."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    check_config(c, world)
    device = c["device"]
    if ddp:
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        init_process_group(c["backend"] if device.startswith("cuda") else "gloo", rank, world)
    elif c["parallelism"] == "fsdp":
        parallel.init_single_process_group(c["backend"] if device.startswith("cuda") else "gloo")
        ddp = True
    return Process(ddp, rank, local_rank, world, device)


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


def seed_and_precision(c, proc):
    """Seed this rank, set determinism and TF32; returns the autocast context the forward passes run in."""
    random.seed(c["seed"] + proc.rank)
    np.random.seed(c["seed"] + proc.rank)
    torch.manual_seed(c["seed"] + proc.rank)
    if c["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if c["dtype"] == "float32":
        return nullcontext()
    return torch.autocast(device_type=proc.device_type, dtype=getattr(torch, c["dtype"]))


def build_model(c, device_type, margs):
    """The GPT with model args `margs` (on the CPU), running the ops on the kernels c["kernels"] asks for."""
    return GPT(GPTConfig(**margs, kernels=c["kernels"]), device_type)


def load_model(c, device_type, init_from, data_dir):
    """(model, the checkpoint's state payload or None): a new model, out_dir's latest checkpoint, or pretrained
    weights."""
    if init_from == "scratch":
        meta = read_meta(data_dir)
        vocab_size = meta["vocab_size"] if meta else 50304
        margs = {k: c[k] for k in MODEL_KEYS if k != "vocab_size"} | {"vocab_size": vocab_size}
        return build_model(c, device_type, margs), None
    if init_from == "resume":
        mp, state = checkpoint.load(c["out_dir"], sharded=c["parallelism"] == "fsdp")
        margs = mp["model_args"]
        for k in MODEL_KEYS:  # a key older checkpoints lack is GPTConfig's default (GPT-2's)
            saved = margs.get(k, getattr(GPTConfig, k, None))
            if k not in ("vocab_size", "dropout") and saved is not None and saved != c[k]:
                raise UserError(f"the checkpoint in {c['out_dir']} has {k}={saved!r} but the config says "
                                f"{c[k]!r}; pass --{k}={saved!r} (the run's config) or use a new out_dir")
        model = build_model(c, device_type, margs)
        if mp["model"] is not None:  # None: sharded, loaded into the FSDP model in place (restore)
            checkpoint.load_model_state(model, mp["model"], c["out_dir"])
        return model, state
    model = checkpoint.load_pretrained(init_from, c["block_size"], dict(dropout=c["dropout"], kernels=c["kernels"]))
    return model, None


def choose_kernels(c, model, proc, ctx, batcher, state):
    """Set the backend each op runs on (nanogpt.ops.select_kernels: `auto` measured on one batch of this model,
    or a resumed checkpoint's choice on the same machine) and print it; returns what the checkpoint records."""
    X, Y = batcher.get_batch("train", torch.Generator().manual_seed(c["seed"]))  # leaves the sampler as it is
    optim = dict(weight_decay=c["weight_decay"], learning_rate=c["learning_rate"], betas=(c["beta1"], c["beta2"]),
                 grad_clip=c["grad_clip"], optimizer=c["optimizer"])
    ops.select_kernels(model, X, Y, ctx, c["kernels"], c["autotune"], optim, log=print if proc.master else None,
                       recorded=(state or {}).get("kernels"))
    if proc.master:
        print(f"kernels ({proc.device_type}, {c['dtype']}): {ops.describe(model.backends, proc.device_type)}")
    return {"device": ops.device_key(proc.device), "backends": dict(model.backends)}


def init_run(c, proc, ctx, gas):
    """Model, data, optimizer and GradScaler, restored from out_dir's checkpoint when resuming; the model compiled
    and wrapped in DDP last. None when init_from=auto resumes a checkpoint that has reached max_iters."""
    data_dir = c["data_dir"] or os.path.join("data", c["dataset"])
    init_from = c["init_from"]
    if init_from == "auto":
        init_from = "resume" if checkpoint.exists(c["out_dir"]) else "scratch"
    model, state = load_model(c, proc.device_type, init_from, data_dir)
    if c["init_from"] == "auto" and state is not None and state["iter_num"] >= c["max_iters"] and not c["eval_only"]:
        if proc.master:  # e.g. the quick start's command run again: done, not an error
            print(f"already trained to iter {state['iter_num']} in {c['out_dir']}; raise --max_iters to train "
                  "further, or pass a new --out_dir")
        return None
    margs = {k: getattr(model.config, k) for k in MODEL_KEYS}
    model.to(proc.device)
    if proc.master:
        print(f"model: {model.get_num_params() / 1e6:.2f}M parameters, {margs}")
    batcher = Batcher(data_dir, c["dataset"], c["block_size"], c["batch_size"], margs["vocab_size"], proc.device,
                      c["sampler"], c["seed"], proc.rank, proc.world)
    kernels = choose_kernels(c, model, proc, ctx, batcher, state)
    scaler = torch.amp.GradScaler(proc.device_type, enabled=(c["dtype"] == "float16"))
    parallel.checkpoint_activations(model, c["activation_checkpointing"])
    fsdp = c["parallelism"] == "fsdp"
    if fsdp:  # sharded before the optimizer is made: AdamW's state is sharded with the parameters
        parallel.shard(model, proc, c["dtype"], c["compile"])

    def make_optimizer():
        return model.configure_optimizers(c["weight_decay"], c["learning_rate"], (c["beta1"], c["beta2"]),
                                          proc.device_type, grad_clip=c["grad_clip"], optimizer=c["optimizer"],
                                          muon_lr=c["muon_lr"], muon_momentum=c["muon_momentum"])
    optimizer = parallel.fsdp_optimizer(model, make_optimizer, print if proc.master else lambda line: None) \
        if fsdp else make_optimizer()
    kernels["backends"] = dict(model.backends)  # the optimizer's may have fallen back
    run = Run(c, proc, ctx, gas, raw_model=model, model=model, margs=margs, optimizer=optimizer, scaler=scaler,
              batcher=batcher, kernels=kernels)
    if state is not None:
        restore(run, state)
    if c["compile"] and not fsdp:  # (fsdp: compiled per block)
        run.model = torch.compile(run.model)
    if proc.ddp and not fsdp:
        run.model = DDP(run.model, device_ids=[proc.local_rank] if proc.device_type == "cuda" else None)
    return run


def restore(run, state):
    """Continue from a checkpoint's state payload: optimizer, GradScaler, counters, this rank's RNG and sampler.
    nanoGPT's ckpt.pt has no GradScaler, RNG or sampler states (no "ranks"): those start afresh, as in nanoGPT."""
    ranks = state.get("ranks")
    if ranks is not None and len(ranks) != run.proc.world and run.proc.master:
        print(f"resharding: the checkpoint was written by {len(ranks)} ranks, this run has {run.proc.world}; the "
              "sampler goes on where it was, ranks the checkpoint did not have start their RNGs afresh")
    if state.get("dcp"):  # a sharded checkpoint: into this FSDP run's shards, whatever ranks wrote it
        from nanogpt import dcp
        state = state | {"optimizer": dcp.load_sharded(state, run.raw_model, run.optimizer)}
    trained = state.get("config", {}).get("optimizer", "adamw")
    if trained != run.c["optimizer"]:
        raise UserError(f"the checkpoint in {run.c['out_dir']} was trained with optimizer={trained}; pass "
                        f"--optimizer={trained} (the run's config) or use a new out_dir")
    saved = state["optimizer"]
    if len(saved["param_groups"]) == len(run.optimizer.param_groups):  # (else load_state_dict names the mismatch)
        # a group keeps its saved hyperparameters; what it lacks (nanoGPT's: how to run, fused or not) is this run's
        saved = saved | {"param_groups": [{k: v for k, v in own.items() if k != "params"} | group
                                          for own, group in zip(run.optimizer.param_groups, saved["param_groups"])]}
    try:
        run.optimizer.load_state_dict(saved)
        parallel.shard_optimizer_state(run.optimizer)  # FSDP from a whole (DDP) checkpoint: this rank's shard
        if "scaler" in state:
            run.scaler.load_state_dict(state["scaler"])
        if ranks is not None:
            if run.proc.rank < len(ranks):
                set_rng_state(ranks[run.proc.rank]["rng"])
            run.batcher.load_state_dict(ranks[0]["batcher"])  # the same on every rank
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:  # a state of another shape
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise checkpoint.CheckpointError(f"the training state in {run.c['out_dir']} does not fit this run "
                                         f"({type(e).__name__}: {why}): {checkpoint.FIX}") from None
    run.iter_num, run.best_val_loss = state["iter_num"], float(state["best_val_loss"])  # nanoGPT's: a tensor
    run.skipped = state.get("skipped", 0)
    if run.proc.master:
        print(f"resuming from iter {run.iter_num} (best val loss {run.best_val_loss:.4f})")


def open_metrics(c, run):
    """The metrics log (on the master; wandb too when enabled), going on from the restored iteration. Everything
    is checked by now: from here on the run writes to out_dir."""
    if not run.proc.master:
        return MetricsLog()
    wandb = tensorboard = None
    if c["wandb_log"]:
        import wandb
        wandb.init(project=c["wandb_project"], name=c["wandb_run_name"], config=c)
    try:
        os.makedirs(c["out_dir"], exist_ok=True)
        path = os.path.join(c["out_dir"], "metrics.jsonl")
        if not c["eval_only"]:  # the log goes on from the checkpoint (a new run: from scratch)
            trim_log(path, run.iter_num)
        run.spikes = health.SpikeDetector(c["spike_k"], c["spike_window"], health.logged_losses(path))
        if c["tensorboard"]:
            tensorboard = health.tensorboard_writer(c["out_dir"])
        return MetricsLog(path, wandb, tensorboard)
    except OSError as e:
        raise UserError(f"cannot write to out_dir {c['out_dir']} ({e.strerror}); pass a writable --out_dir") from None


# ------------------------------------------------------------ the steps of the loop

def set_lr(run):
    """Every group's lr from the schedule (AdamW's is returned); Muon's group: its own peak, muon_lr, on the same
    schedule, and its momentum ramp."""
    c = run.c
    lr = get_lr(run.iter_num, c) if c["decay_lr"] else c["learning_rate"]
    for group in run.optimizer.param_groups:
        if group.get("muon"):
            group["lr"] = c["muon_lr"] * (lr / c["learning_rate"] if c["learning_rate"] > 0 else 0.0)
            group["momentum"] = get_muon_momentum(run.iter_num, c)
        else:
            group["lr"] = lr
    return lr


@torch.no_grad()
def estimate_loss(run):
    """Mean loss over eval_iters batches per split, the same batches at every eval, averaged over ranks."""
    out = {}
    run.model.eval()
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(run.c["seed"] + 1)
        losses = torch.zeros(run.c["eval_iters"], device=run.proc.device)
        for k in range(run.c["eval_iters"]):
            X, Y = run.batcher.get_batch(split, gen)
            with run.ctx:
                losses[k] = run.model(X, Y)[1]
        mean = losses.mean()
        if run.proc.ddp:
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        out[split] = mean.item()
    run.model.train()
    return out


def evaluate(run, lr, metrics):
    """Print and log both splits' losses; save when val improved (every eval with always_save_checkpoint), and
    at max_iters."""
    losses = estimate_loss(run)
    if run.proc.master:
        print(f"step {run.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    metrics.write({"iter": run.iter_num, "train_loss": losses["train"], "val_loss": losses["val"], "lr": lr})
    if run.c["eval_tasks"] and run.iter_num % run.c["eval_tasks_interval"] == 0:
        score_tasks(run, metrics)
    improved = losses["val"] < run.best_val_loss
    if improved:
        run.best_val_loss = losses["val"]
    last = run.iter_num == run.c["max_iters"]  # saved always: a finished run's checkpoint says it is done
    if (improved or run.c["always_save_checkpoint"] or last) and run.iter_num > 0 and not run.c["eval_only"]:
        metrics.write({"iter": run.iter_num, "checkpoint_ms": save(run, best=improved)})


def score_tasks(run, metrics):
    """eval_tasks through lm-evaluation-harness on rank 0 (the others wait at their next collective): one line
    and one metrics record of each task's scores."""
    if not run.proc.master:
        return
    c = run.c
    results = harness.run_tasks(harness.lm_class()(run.raw_model, c["batch_size"], run.ctx),
                                [t.strip() for t in c["eval_tasks"].split(",") if t.strip()], c["eval_include_path"],
                                limit=c["eval_tasks_limit"], seed=c["seed"])
    scores = {task: {k.split(",")[0]: v for k, v in r.items() if isinstance(v, float) and "stderr" not in k}
              for task, r in results["results"].items()}
    run.raw_model.train()
    print(f"step {run.iter_num}: " + "; ".join(f"{t} " + ", ".join(f"{k} {v:.4f}" for k, v in s.items())
                                              for t, s in scores.items()))
    metrics.write({"iter": run.iter_num, "eval_tasks": scores})


def train_step(run, stop):
    """One update over gas micro-steps; returns (the mean loss, the gradient norm or None when the update was
    skipped, whether to stop after this step)."""
    loss_sum = torch.zeros((), device=run.proc.device)
    for micro_step in range(run.gas):
        parallel.sync_gradients(run.model, micro_step == run.gas - 1)  # on the last micro-step only
        with run.ctx:
            _, loss = run.model(run.X, run.Y)
            loss = loss / run.gas
        loss_sum += loss.detach()
        run.batch_state = run.batcher.state_dict()
        run.X, run.Y = run.batcher.get_batch("train")  # prefetch while the GPU works
        run.scaler.scale(loss).backward()
    # a non-finite loss or gradient norm skips the update (the optimizer and GradScaler skip
    # non-finite gradients themselves); a signal stops the run after this step. Under DDP one
    # all_reduce sums the losses (the global batch's mean loss: non-finite if any rank's is) and
    # the stop flags, so every rank skips and stops at the same step.
    stopping = stop.signal is not None
    if run.proc.ddp:
        sums = torch.stack([loss_sum, torch.full((), float(stopping), device=run.proc.device)])
        dist.all_reduce(sums)
        loss_sum = sums[0] / run.proc.world
        stopping = bool(sums[1].item())
    nonfinite = not torch.isfinite(loss_sum).item()
    grad_norm = None
    probe = None
    if not nonfinite:
        if run.iter_num % run.c["log_interval"] == 0:  # every rank: under FSDP its norms are collectives
            probe = health.Probe(run.raw_model, run.optimizer, run.scaler)
        grad_norm = run.scaler.step(run.optimizer)  # unscales, clips inside; None or non-finite: skipped
        run.scaler.update()
    run.health = probe.finish(grad_norm is not None and bool(torch.isfinite(grad_norm))) if probe else {}
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, stopping


def count_skip(run, grad_norm):
    """Count a skipped update; max_skips in a row stop the run, with the last good checkpoint intact."""
    if grad_norm is not None and torch.isfinite(grad_norm):
        run.consecutive = 0
        return
    run.skipped += 1
    run.consecutive += 1
    c, n = run.c, run.consecutive
    if n >= c["max_skips"]:
        kept = (f"the last good checkpoint (iter {checkpoint.latest_iter(c['out_dir'])}) in {c['out_dir']} is "
                "intact" if checkpoint.exists(c["out_dir"]) else "no checkpoint was written")
        raise TrainingError(f"{n} consecutive steps had a non-finite loss or gradient (iters "
                            f"{run.iter_num - n + 1}-{run.iter_num}): lower learning_rate or raise "
                            f"warmup_iters{' (or use bfloat16)' if c['dtype'] == 'float16' else ''}; {kept}")


def log_step(run, loss, grad_norm, lr, dt, tokens_per_iter, metrics, start):
    """Print the step's line and log its record with the health fields (nanogpt.health), and a spike event
    (master only). start: the sampler's state before the step's batches."""
    lossf = loss.item()  # a sync point: the mean loss over the micro-steps
    norm = None if grad_norm is None else grad_norm.item()
    record = {"iter": run.iter_num, "loss": lossf, "lr": lr, "ms": dt * 1000, "tokens_per_s": tokens_per_iter / dt,
              "grad_norm": norm, "skipped": run.skipped, "mfu": None,
              "clipped": norm is not None and run.c["grad_clip"] > 0 and norm > run.c["grad_clip"],
              "peak_mem_mb": health.peak_memory_mb(run.proc.device_type)} | run.health
    line = f"iter {run.iter_num}: loss {lossf:.4f}, time {dt * 1000:.2f}ms, {tokens_per_iter / dt:,.0f} tok/s"
    if run.proc.device_type == "cuda" and run.local_iter >= 5:  # let the loop settle before measuring MFU
        mfu = run.raw_model.estimate_mfu(run.c["batch_size"] * run.gas, dt, run.c["dtype"])  # per GPU
        run.running_mfu = mfu if run.running_mfu == -1.0 else 0.9 * run.running_mfu + 0.1 * mfu
        record["mfu"] = run.running_mfu
        line += f", mfu {run.running_mfu * 100:.2f}%"
    if run.skipped:
        line += f", {run.skipped} skipped steps"
    print(line)
    metrics.write(record)
    spike = run.spikes.check(lossf)
    if spike:
        print(f"iter {run.iter_num}: loss spike, {lossf:.4f} against {spike[0]:.4f} +- {spike[1]:.4f}")
        metrics.write({"iter": run.iter_num, "event": "spike", "loss": lossf, "mean": spike[0], "std": spike[1],
                       "rows": run.batcher.rows(start, run.gas)})


def save(run, best):
    """Checkpoint iter_num: the weights, and the training state with every rank's RNG and sampler states (under
    FSDP sharded, nanogpt.dcp, maybe in the background). Returns the ms the step loop waited."""
    t0 = time.perf_counter()
    ranks = [{"rng": rng_state(), "batcher": run.batch_state}]
    if run.proc.ddp:
        gathered = [None] * run.proc.world
        dist.all_gather_object(gathered, ranks[0])
        ranks = gathered
    c = run.c
    model_payload = {"model_args": run.margs, "iter_num": run.iter_num, "config": c}
    state_payload = {"scaler": run.scaler.state_dict(), "config": c, "iter_num": run.iter_num,
                     "best_val_loss": run.best_val_loss, "skipped": run.skipped, "ranks": ranks, "kernels": run.kernels}
    where = f"iter {run.iter_num} to {c['out_dir']}{' (best)' if best else ''}"
    if c["parallelism"] == "fsdp":  # every rank writes its shards
        from nanogpt import dcp
        dcp.save(c["out_dir"], run.iter_num, run.raw_model, run.optimizer, model_payload, state_payload, best,
                 background=c["async_checkpoint"])
    elif run.proc.master:
        checkpoint.save(c["out_dir"], run.iter_num, model_payload | {"model": run.raw_model.state_dict()},
                        state_payload | {"optimizer": run.optimizer.state_dict()}, best=best)
    if run.proc.ddp:
        dist.barrier()
    ms = (time.perf_counter() - t0) * 1000
    if run.proc.master:
        print(f"saving checkpoint at {where} in the background (the loop waited {ms:.0f} ms)"
              if c["async_checkpoint"] else f"saved checkpoint at {where} ({ms:.0f} ms)")
    return ms


def write_loss_plot(out_dir):
    """out_dir/loss.png from metrics.jsonl (as `benchmarks/plot.py loss` draws it) when matplotlib is installed;
    it is optional."""
    if importlib.util.find_spec("matplotlib") is None:
        print(f"no {os.path.join(out_dir, 'loss.png')}: matplotlib is not installed (pip install matplotlib)")
        return
    from nanogpt.plot import plot_loss
    print(f"wrote {plot_loss([os.path.join(out_dir, 'metrics.jsonl')], os.path.join(out_dir, 'loss.png'))}")


def _main(argv):
    ops.separate_inductor_cache()
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
