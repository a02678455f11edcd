"""Generation benchmark: prefill and decode rates with the KV cache and without it, per batch size.

    python benchmarks/bench_generate.py                          # GPT-2 124M shape, random weights, fp32
    python benchmarks/bench_generate.py --init_from=resume --out_dir=out-shakespeare-char --json=out/gen.json
    python benchmarks/bench_generate.py --device=cuda --dtype=bfloat16 --batch_sizes=1,8,32

Random weights by default (`init_from=scratch`, the shape keys below), so it runs offline; `resume` (out_dir's
checkpoint), `gpt2*` or a Hugging Face directory load a model instead. Each run generates `max_new_tokens`
greedily after random `prompt_len`-token prompts, one untimed warm-up generation first. Prefill is the prompts'
forward up to the first new token; decode is every later token (tokens/s over all rows, ms per step). Runs
with and without the cache at the same batch size must give the same tokens (else exit code 1). The cache
(`cache_mib`) is allocated once per generation, for the batch and block_size.
"""
import datetime
import json
import os
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernel_cases import device_name  # noqa: E402
from nanogpt import generate as engine  # noqa: E402
from nanogpt.configurator import Keys, configure  # noqa: E402
from nanogpt.errors import UserError, run_cli  # noqa: E402
from nanogpt.model import GPT, GPTConfig  # noqa: E402
from nanogpt.sample import load_model  # noqa: E402

DEFAULTS = Keys("python benchmarks/bench_generate.py", __doc__, {
    "model": dict(
        init_from=("scratch", "scratch (random weights) | resume (out_dir) | gpt2* | a Hugging Face GPT-2 directory"),
        out_dir=("out", "the training run's out_dir (init_from=resume)"),
        which=("best", "best | latest checkpoint of out_dir"),
        n_layer=(12, "transformer blocks (scratch)"),
        n_head=(12, "attention heads (scratch)"),
        n_embd=(768, "embedding width (scratch)"),
        block_size=(1024, "context length (scratch)"),
        vocab_size=(50304, "vocabulary size (scratch)"),
        bias=(True, "biases in the Linear layers and LayerNorms (scratch)"),
    ),
    "generation": dict(
        prompt_len=(16, "tokens per random prompt"),
        max_new_tokens=(256, "tokens generated per row"),
        batch_sizes=("1,8", "batch sizes run with the cache"),
        no_cache_batch_sizes=("1", "also without it (every token recomputes the whole context: slow)"),
    ),
    "system": dict(
        device=("cuda" if torch.cuda.is_available() else "cpu", "cpu | cuda | cuda:N"),
        dtype=("float32", "float32 | bfloat16 | float16 (autocast)"),
        kernels=("auto", "auto | torch | triton | ext | per op (see nanogpt-train --help)"),
        inference_layout=("auto", "auto: store the Linear weights (in, out) where measured faster at the largest batch "
                          "| True: always | False: never (nanogpt.generate.inference_layout)"),
        threads=(0, "torch.set_num_threads when > 0 (CPU); 0 keeps torch's default"),
        seed=(1337, "random seed (weights and prompts)"),
    ),
    "output": dict(
        json=("", "write the results here too"),
    ),
})


def build(c):
    if c["init_from"] != "scratch":
        return load_model(c)[0]
    shape = {k: c[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")}
    return GPT(GPTConfig(**shape, kernels=c["kernels"]), c["device"].split(":")[0])


def measure(model, prompts, c, use_cache, ctx):
    """One timed greedy generation: the tokens and the rates."""
    kw = dict(top_k=1, use_cache=use_cache)
    stats = engine.Stats()
    with ctx:
        engine.generate(model, prompts, min(4, c["max_new_tokens"]), **kw)  # warm-up: allocator, lazy init
        t0 = time.perf_counter()
        out = engine.generate(model, prompts, c["max_new_tokens"], stats=stats, **kw)
    B = prompts.size(0)
    cfg = model.config
    cache_bytes = 2 * cfg.n_layer * B * cfg.block_size * cfg.n_embd * torch.finfo(getattr(torch, c["dtype"])).bits // 8
    return out, dict(
        cache=use_cache, batch=B, prefill_tokens=stats.prefill_tokens, decode_tokens=stats.decode_tokens,
        prefill_tokens_per_s=stats.prefill_tokens / stats.prefill_s,
        decode_tokens_per_s=stats.decode_tokens / stats.decode_s,
        ms_per_token=1000 * stats.decode_s / stats.decode_steps, total_s=time.perf_counter() - t0,
        cache_mib=cache_bytes / 2**20 if use_cache else 0.0)


def run(c, argv=(), log=print):
    if c["threads"] > 0:
        torch.set_num_threads(c["threads"])
    torch.manual_seed(c["seed"])
    model = build(c).eval().to(c["device"])
    layout = str(c["inference_layout"])
    if layout not in ("auto", "True", "False"):
        raise UserError(f"--inference_layout={layout}: expected auto, True or False")
    sizes = [int(b) for key in ("batch_sizes", "no_cache_batch_sizes") for b in c[key].split(",") if b.strip()]
    device_type = c["device"].split(":")[0]
    ctx = nullcontext() if c["dtype"] == "float32" else torch.autocast(device_type, dtype=getattr(torch, c["dtype"]))
    layout_line = ("weights: as trained (--inference_layout=False)" if layout == "False" else
                   engine.inference_layout(model, batch=max(sizes, default=1) if layout == "auto" else None, ctx=ctx))
    result = dict(
        command=" ".join(["python", "benchmarks/bench_generate.py", *argv]), device=device_name(c["device"]),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), torch=torch.__version__,
        threads=torch.get_num_threads(), loadavg_before=os.getloadavg()[0], config=c, backends=model.backends,
        inference_layout=layout_line, runs=[])
    log(f"{result['device']}, torch {torch.__version__}, {result['threads']} threads, {c['dtype']}, "
        f"{model.get_num_params() / 1e6:.1f}M params, block_size {model.config.block_size}, load average "
        f"{result['loadavg_before']:.2f}")
    log(layout_line)
    log(f"{'cache':>5} {'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/token':>9} {'total s':>8} {'cache MiB':>9}")
    tokens, ok = {}, True
    for use_cache, key in ((True, "batch_sizes"), (False, "no_cache_batch_sizes")):
        for B in [int(b) for b in c[key].split(",") if b.strip()]:
            prompts = torch.randint(0, model.config.vocab_size, (B, c["prompt_len"]),
                                    generator=torch.Generator().manual_seed(c["seed"] + B)).to(c["device"])
            out, r = measure(model, prompts, c, use_cache, ctx)
            if B in tokens and not torch.equal(tokens[B], out):
                r["error"], ok = "tokens differ from the run with the cache", False
            tokens.setdefault(B, out)
            result["runs"].append(r)
            log(f"{'yes' if use_cache else 'no':>5} {B:>5} {r['prefill_tokens_per_s']:>14,.0f} "
                f"{r['decode_tokens_per_s']:>13,.1f} {r['ms_per_token']:>9.2f} {r['total_s']:>8.2f} "
                f"{r['cache_mib']:>9.1f}" + (f"  ERROR: {r['error']}" if "error" in r else ""))
    rate = {(r["cache"], r["batch"]): r["decode_tokens_per_s"] for r in result["runs"]}
    result["cache_speedup"] = {B: rate[True, B] / rate[False, B] for (cached, B) in rate if not cached and (True, B) in rate}
    result["batch_speedup"] = {B: rate[True, B] / rate[True, 1] for (cached, B) in rate if cached and (True, 1) in rate}
    for B, x in result["cache_speedup"].items():
        log(f"batch {B}: decode with the cache {x:.1f}x the tokens/s without")
    for B, x in result["batch_speedup"].items():
        if B != 1:
            log(f"batch {B}: {x:.1f}x the decode tokens/s of batch 1 (with the cache)")
    result["loadavg_after"] = os.getloadavg()[0]
    if c["json"]:
        os.makedirs(os.path.dirname(os.path.abspath(c["json"])), exist_ok=True)
        with open(c["json"], "w") as f:
            json.dump(result, f, indent=1)
    if not ok:
        sys.exit(1)
    return result


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    run_cli(lambda a: run(configure(DEFAULTS, a), a), argv)


if __name__ == "__main__":
    main()
