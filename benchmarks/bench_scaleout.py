"""Scale-out measurements: FSDP's per-rank memory against DDP's, the step loop's stall on an async checkpoint
against a synchronous save, activation checkpointing's activation memory and step time.

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_scaleout.py     # CPU: gloo
    torchrun --standalone --nproc_per_node=8 benchmarks/bench_scaleout.py --device=cuda --n_layer=12 --n_embd=768

- memory: the bytes of this rank's parameters and AdamW state after one step (local shards under FSDP),
  DDP and FSDP, and their ratio;
- stall: nanogpt.dcp.save of the FSDP model and optimizer, then the next step (forward, backward, AdamW),
  synchronous (the save's time) and async (the loop's wait: the save call, and the optimizer step's wait for the
  background copy into memory, which the forward and backward overlap; the copy's memory is allocated at the first
  async save and refilled after), medians; and the forward+backward's time in both (the copy competes with it);
- activation checkpointing (rank 0, one process), per mode: the activations (what autograd keeps for backward
  at the end of the forward, their peak) and the step's peak beyond the weights (activations, temporaries,
  gradients), both by torch.distributed._tools.MemTracker, which follows every tensor; and the step's time.
"""
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanogpt import dcp, parallel  # noqa: E402
from nanogpt.configurator import Keys, configure  # noqa: E402
from nanogpt.model import GPT, GPTConfig  # noqa: E402
from nanogpt.train import Process  # noqa: E402

DEFAULTS = Keys("torchrun ... benchmarks/bench_scaleout.py", __doc__, {"shape": dict(
    n_layer=(6, "transformer blocks"), n_head=(6, "attention heads"), n_embd=(384, "embedding width"),
    block_size=(256, "context length"), vocab_size=(50304, "vocabulary size"), batch_size=(4, "rows per step"),
), "run": dict(
    device=("cpu", "cpu | cuda"), kernels=("auto", "the model's kernels (nanogpt-train --kernels)"),
    saves=(5, "checkpoints per mode (sync, async, interleaved)"),
    steps=(3, "timed steps per activation checkpointing mode"),
)})


def model(c):
    torch.manual_seed(0)
    margs = {k: c[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")}
    return GPT(GPTConfig(**margs, bias=False, kernels=c["kernels"]), c["device"]).to(c["device"])


def batch(c):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, c["vocab_size"], (c["batch_size"], c["block_size"] + 1), generator=g).to(c["device"])
    return x[:, :-1], x[:, 1:]


def local_bytes(tensors):
    from torch.distributed.tensor import DTensor
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors if torch.is_tensor(t))


def trained(c, proc, fsdp):
    """A model and optimizer after one step, DDP (whole on every rank) or FSDP (sharded)."""
    m = model(c)
    if fsdp:
        parallel.shard(m, proc, "float32", False)
    def make():
        return m.configure_optimizers(0.1, 6e-4, (0.9, 0.95), grad_clip=1.0)
    opt = parallel.fsdp_optimizer(m, make, lambda line: None) if fsdp else make()
    x, y = batch(c)
    fwd = m if fsdp else torch.nn.parallel.DistributedDataParallel(m)
    fwd(x, y)[1].backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return m, opt


def main(argv):
    c = configure(DEFAULTS, argv)
    dist.init_process_group("nccl" if c["device"] == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if c["device"] == "cuda":
        c["device"] = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(c["device"])
    proc = Process(True, rank, int(os.environ["LOCAL_RANK"]), world, c["device"])
    say = print if rank == 0 else (lambda *a: None)
    n = model(c).get_num_params(non_embedding=False)
    say(f"{n / 1e6:.1f}M parameters, {world} ranks, {c}")

    mem = {}
    for name in ("ddp", "fsdp"):
        m, opt = trained(c, proc, name == "fsdp")
        mem[name] = local_bytes(m.parameters()) + local_bytes(v for s in opt.state.values() for v in s.values())
    say(f"memory per rank, parameters + AdamW state: ddp {mem['ddp'] / 2**20:.1f} MiB, fsdp "
        f"{mem['fsdp'] / 2**20:.1f} MiB: {mem['fsdp'] / mem['ddp']:.3f}x")

    with tempfile.TemporaryDirectory() as tmp:  # every rank writes into rank 0's directory
        box = [tmp]
        dist.broadcast_object_list(box, 0)
        x, y = batch(c)
        stalls, calls, steps = ({False: [], True: []} for _ in range(3))
        for i in range(c["saves"]):
            for background in (False, True):  # interleaved: the machine's drift hits both alike
                call = dcp.save(box[0], 2 * i + background, m, opt, {}, {}, background=background)
                t0 = time.perf_counter()
                m(x, y)[1].backward()  # the next step, which the background copy overlaps up to its optimizer step
                steps[background].append((time.perf_counter() - t0) * 1000)
                opt.step()
                opt.zero_grad(set_to_none=True)
                calls[background].append(call)
                stalls[background].append(call + (dcp.last_staging_wait() or 0.0))
                dcp.wait()
                dist.barrier()
        say(f"per save (ms): sync {[round(t) for t in stalls[False]]}, async stall {[round(t) for t in stalls[True]]}; "
            f"forward+backward after sync {[round(t) for t in steps[False]]}, during the async copy "
            f"{[round(t) for t in steps[True]]}")
        med = {b: {k: statistics.median(v[b][1:]) for k, v in (("stall", stalls), ("call", calls), ("step", steps))}
               for b in (False, True)}
        sync, steady = med[False]["stall"], med[True]["stall"]
        say(f"checkpoint: synchronous save {sync:.0f} ms; async stall {steady:.0f} ms ({med[True]['call']:.0f} in the "
            f"save call, the rest before the next optimizer step): {steady / sync:.3f}x (medians of the "
            f"{c['saves'] - 1} saves after the first; the first async one allocates its copy: stall "
            f"{stalls[True][0]:.0f} ms, {stalls[True][0] / sync:.3f}x); the forward+backward the copy overlaps "
            f"{med[True]['step']:.0f} ms, after a synchronous save {med[False]['step']:.0f} ms")
        dist.barrier()

    if rank == 0:
        from torch.distributed._tools.mem_tracker import MemTracker
        x, y = batch(c)
        for mode in parallel.ACTIVATION_CHECKPOINTING:
            m = model(c)
            parallel.checkpoint_activations(m, mode)
            tracker = MemTracker()
            tracker.track_external(m)
            with tracker:
                loss = m(x, y)[1]
                kept = next(iter(tracker.get_tracker_snapshot("current").values()))  # the forward's activations
                loss.backward()
            peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
            weights = sum(v for k, v in peak.items() if str(k).endswith("PARAM"))
            acts, beyond = kept["Total"] - weights, peak["Total"] - weights
            m.zero_grad(set_to_none=True)
            times = []
            for _ in range(c["steps"]):
                t0 = time.perf_counter()
                m(x, y)[1].backward()
                times.append(time.perf_counter() - t0)
                m.zero_grad(set_to_none=True)
            print(f"activation_checkpointing={mode}: activations {acts / 2**20:.1f} MiB (kept for backward at the "
                  f"end of the forward), step peak {beyond / 2**20:.1f} MiB beyond the weights, forward+backward "
                  f"{statistics.median(times) * 1000:.0f} ms (median of {c['steps']})", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
