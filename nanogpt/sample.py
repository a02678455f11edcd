"""Sample from a trained model (an out_dir checkpoint) or from OpenAI's GPT-2.

    nanogpt-sample --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3
    nanogpt-sample --init_from=gpt2-xl --start=FILE:prompt.txt --max_new_tokens=200
    nanogpt-sample --init_from=gpt2 --prompts=prompts.txt --top_p=0.9 --eos="<|endoftext|>"

Generation runs on nanogpt.generate's KV cache; one sequence at a time is streamed as it is produced; the
prefill and decode rates go to stderr at the end.
"""
import os
import sys
from contextlib import nullcontext

import torch

from nanogpt import checkpoint
from nanogpt import generate as engine
from nanogpt.codec import load_codec
from nanogpt.configurator import Keys, configure
from nanogpt.errors import UserError, run_cli
from nanogpt.model import GPT, GPTConfig

DEFAULTS = Keys("nanogpt-sample", __doc__, {
    "model": dict(
        init_from=("resume", "resume (from out_dir) | gpt2* | a Hugging Face model directory"),
        out_dir=("out", "the training run's out_dir"),
        which=("best", "best | latest checkpoint of out_dir"),
    ),
    "prompt": dict(
        start=("\n", "prompt text, or FILE:path to read it from a file"),
        prompts=("", "a file of prompts, one a line, generated as one batch (instead of start)"),
        num_samples=(10, "samples per prompt"),
        max_new_tokens=(500, "tokens generated per sample"),
        eos=("", "stop a sequence at this token's text, e.g. <|endoftext|> (\"\": never)"),
        stream=(None, "True | False: print tokens as they come (None: when one sequence is generated at a time)"),
    ),
    "sampling": dict(
        temperature=(0.8, "< 1 sharpens, > 1 flattens the distribution"),
        top_k=(200, "keep only the top_k most likely tokens (0 or None: all)"),
        top_p=(1.0, "then keep the smallest set of most likely tokens whose probability reaches top_p (1.0: all)"),
        seed=(1337, "random seed"),
    ),
    "system": dict(
        use_cache=(True, "the KV cache; False: recompute the whole context for every token, as nanoGPT does"),
        device=("cuda" if torch.cuda.is_available() else "cpu", "cpu | cuda | cuda:N | mps"),
        dtype=("bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32",
               "float32 | bfloat16 | float16 (autocast)"),
        kernels=("auto", "auto | torch | triton | ext | per op (see nanogpt-train --help)"),
        compile=(False, "accepted for nanoGPT's flags; generation's shapes change every step, so it runs eager"),
    ),
})


def load_model(c):
    """(model, data_dir or None) for the config's init_from."""
    if c["init_from"] != "resume":
        return checkpoint.load_pretrained(c["init_from"], None, dict(dropout=0.0, kernels=c["kernels"])), None
    which = c["which"] if os.path.exists(os.path.join(c["out_dir"], f"{c['which']}.json")) else "latest"
    payload, _ = checkpoint.load(c["out_dir"], which, with_state=False)
    device_type = "cuda" if "cuda" in c["device"] else c["device"]
    model = GPT(GPTConfig(**payload["model_args"] | {"dropout": 0.0}, kernels=c["kernels"]), device_type)
    checkpoint.load_model_state(model, payload["model"], c["out_dir"])
    config = payload.get("config", {})
    return model, config.get("data_dir") or os.path.join("data", config.get("dataset", ""))


def read_text(value, what):
    """value, or the contents of the file that FILE:path names."""
    if not value.startswith("FILE:"):
        return value
    try:
        with open(value[5:], encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot read {what} file {value[5:]!r}: {e.strerror}") from None


def encode_prompts(c, encode):
    """The prompts' token ids: --prompts' lines (blank ones skipped), or --start."""
    texts = [line for line in read_text(f"FILE:{c['prompts']}", "prompts").splitlines() if line.strip()] \
        if c["prompts"] else [read_text(c["start"], "prompt")]
    if not texts:
        raise UserError(f"--prompts: {c['prompts']!r} has no prompt; write one a line")
    try:
        prompts = [encode(t) for t in texts]
    except ValueError as e:
        raise UserError(f"--{'prompts' if c['prompts'] else 'start'}: {e}") from None
    try:
        eos = encode(c["eos"]) if c["eos"] else None
    except ValueError as e:
        raise UserError(f"--eos: {e}") from None
    if not all(prompts):
        raise UserError("the prompt encodes to no tokens; pass --start with some text")
    if eos is not None and len(eos) != 1:
        raise UserError(f"--eos: {c['eos']!r} is {len(eos)} tokens, not one")
    return prompts, None if eos is None else eos[0]


def print_streamed(ids, steps, decode):
    """Print decode(ids) as each step's token is appended to ids. An incomplete UTF-8 character at the end
    (U+FFFD for now) waits for the next token, so what is printed is exactly the text printed unstreamed."""
    shown = 0
    for tokens, _ in steps:
        ids.append(int(tokens[0]))
        text = decode(ids).rstrip("\ufffd")
        sys.stdout.write(text[shown:])
        sys.stdout.flush()
        shown = len(text)
    print(decode(ids)[shown:])
    return ids


def sample(c):
    torch.manual_seed(c["seed"])
    model, data_dir = load_model(c)
    model.eval().to(c["device"])
    encode, decode = load_codec(data_dir)
    prompts, eos = encode_prompts(c, encode)
    stream = len(prompts) == 1 if c["stream"] is None else c["stream"]
    if stream and len(prompts) > 1:
        raise UserError("--stream=True prints one sequence as it comes; with several prompts pass --stream=False")
    device_type = "cuda" if "cuda" in c["device"] else "cpu"
    ctx = nullcontext() if c["dtype"] == "float32" else torch.autocast(device_type, dtype=getattr(torch, c["dtype"]))
    print(engine.inference_layout(model, batch=len(prompts), ctx=ctx), file=sys.stderr)
    kw = dict(temperature=c["temperature"], top_k=c["top_k"] or None, top_p=c["top_p"], eos_token=eos,
              use_cache=c["use_cache"], stats=engine.Stats())
    samples = []
    with torch.no_grad(), ctx:
        for _ in range(c["num_samples"]):
            if stream:
                rows = [print_streamed(list(prompts[0]), engine.stream(model, prompts, c["max_new_tokens"], **kw), decode)]
            else:
                rows = engine.generate(model, prompts, c["max_new_tokens"], **kw)
            for row in rows:
                samples.append(decode(row))
                if not stream:
                    print(samples[-1])
                print("---------------")
    print(kw["stats"].summary(), file=sys.stderr)
    return samples


def main(argv=None):
    run_cli(lambda a: sample(configure(DEFAULTS, sys.argv[1:] if a is None else a)), argv)


if __name__ == "__main__":
    main()
