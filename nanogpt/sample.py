"""Sample from a trained model (an out_dir checkpoint) or from OpenAI's GPT-2.

    nanogpt-sample --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3
    nanogpt-sample --init_from=gpt2-xl --start=FILE:prompt.txt --max_new_tokens=200
"""
import os
import sys
from contextlib import nullcontext

import torch

from nanogpt import checkpoint
from nanogpt.codec import load_codec
from nanogpt.configurator import configure
from nanogpt.errors import UserError, run_cli
from nanogpt.model import GPT, GPTConfig

DEFAULTS = dict(
    init_from="resume",  # resume (from out_dir) | gpt2* | a Hugging Face model directory
    out_dir="out",
    which="best",  # best | latest checkpoint of out_dir
    start="\n",  # prompt text, or FILE:path to read it from a file
    num_samples=10,
    max_new_tokens=500,
    temperature=0.8,  # < 1 sharpens, > 1 flattens the distribution
    top_k=200,  # keep only the top_k most likely tokens (0 or None: all)
    seed=1337,
    device="cuda" if torch.cuda.is_available() else "cpu",
    dtype="bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32",
    kernels="auto",
    compile=False,
)


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


def sample(c):
    torch.manual_seed(c["seed"])
    model, data_dir = load_model(c)
    model.eval().to(c["device"])
    if c["compile"]:
        model = torch.compile(model)
    encode, decode = load_codec(data_dir)
    start = c["start"]
    if start.startswith("FILE:"):
        try:
            with open(start[5:], encoding="utf-8") as f:
                start = f.read()
        except OSError as e:
            raise UserError(f"cannot read prompt file {start[5:]!r}: {e.strerror}") from None
    try:
        ids = encode(start)
    except ValueError as e:
        raise UserError(f"--start: {e}") from None
    if not ids:
        raise UserError("the prompt encodes to no tokens; pass --start with some text")
    x = torch.tensor(ids, dtype=torch.long, device=c["device"])[None, ...]
    device_type = "cuda" if "cuda" in c["device"] else "cpu"
    ctx = nullcontext() if c["dtype"] == "float32" else torch.autocast(device_type, dtype=getattr(torch, c["dtype"]))
    samples = []
    with torch.no_grad(), ctx:
        for _ in range(c["num_samples"]):
            y = model.generate(x, c["max_new_tokens"], temperature=c["temperature"], top_k=c["top_k"] or None)
            samples.append(decode(y[0].tolist()))
            print(samples[-1])
            print("---------------")
    return samples


def main(argv=None):
    run_cli(lambda a: sample(configure(DEFAULTS, sys.argv[1:] if a is None else a)), argv)


if __name__ == "__main__":
    main()
