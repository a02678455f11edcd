"""Export a trained model (an out_dir checkpoint) for other tools.

    nanogpt-export --out_dir=out --format=hf --to=gpt2-mine        # transformers.GPT2LMHeadModel.from_pretrained
    nanogpt-export --out_dir=out --format=nanogpt --to=out-nanogpt # nanoGPT's sample.py / train.py (resume)

hf: config.json (activation_function `gelu` for our exact GELU, `gelu_new` for tanh), model.safetensors, the
vocabulary trimmed back to the tokenizer's (GPT-2's 50304 padded rows to 50257), and GPT-2's tokenizer files
(vocab.json and merges.txt are tiktoken's own gpt2 files, which are OpenAI's encoder.json and vocab.bpe) when the
model uses GPT-2 BPE. A model without biases gets zero biases, which Hugging Face's GPT-2 always has.
nanogpt: DEST/ckpt.pt with nanoGPT's keys (model, optimizer, model_args, iter_num, best_val_loss, config).
Nothing is written over: DEST must not exist yet, and it appears whole or not at all.
"""
import os
import shutil
import sys

import torch

from nanogpt import checkpoint
from nanogpt.configurator import Keys, configure
from nanogpt.errors import UserError, run_cli
from nanogpt.model import CONV1D, non_gpt2

DEFAULTS = Keys("nanogpt-export", __doc__, {
    "export": dict(
        out_dir=("out", "the training run's out_dir"),
        which=("best", "best | latest checkpoint of out_dir"),
        format=("hf", "hf (a transformers GPT2LMHeadModel directory) | nanogpt (nanoGPT's ckpt.pt)"),
        to=("", "the directory to write (must not exist)"),
    ),
})
GPT2_VOCAB, EOT = 50257, 50256
NANOGPT_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")  # its GPTConfig
# tiktoken's gpt2 files (tiktoken_ext.openai_public.gpt2): OpenAI's vocabulary and merges, as transformers reads them
GPT2_FILES = {
    "vocab.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                   "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "merges.txt": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                   "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}


class ExportError(UserError, ValueError):
    pass


def hf_state_dict(model_args, state_dict, hf_state, vocab_size):
    """Our weights under the names of Hugging Face GPT-2's state dict hf_state: Conv1D weights transposed, the
    vocabulary cut to vocab_size, zero biases where our model has none."""
    out = {}
    for k, like in hf_state.items():
        if k in state_dict:
            t = state_dict[k].t() if k.endswith(CONV1D) else state_dict[k]
            out[k] = t[:vocab_size] if k in ("transformer.wte.weight", "lm_head.weight") else t
        elif k.endswith(".bias") and not model_args["bias"]:
            out[k] = torch.zeros_like(like)
        else:
            raise ExportError(f"the checkpoint has no {k!r}; it is not a GPT-2 model this exporter knows")
    return out


def write_gpt2_tokenizer(dest):
    """vocab.json and merges.txt from tiktoken's cache (or download), then transformers' tokenizer files."""
    from tiktoken.load import read_file_cached
    from transformers import GPT2Tokenizer
    try:
        for name, (url, sha) in GPT2_FILES.items():
            with open(os.path.join(dest, name), "wb") as f:
                f.write(read_file_cached(url, sha))
    except Exception as e:  # offline without the cache: say how to fix it rather than dump a network traceback
        raise ExportError(f"cannot read tiktoken's gpt2 files ({type(e).__name__}: {e}); they need network access "
                          "once, or TIKTOKEN_CACHE_DIR pointing at their cached copies") from None
    GPT2Tokenizer.from_pretrained(dest).save_pretrained(dest)


def export_hf(payload, dest):
    """Write payload's model as a Hugging Face GPT-2 directory; returns a description of what was written."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise ExportError("--format=hf needs transformers: pip install transformers") from None
    margs, config = payload["model_args"], payload.get("config", {})
    data_dir = config.get("data_dir") or os.path.join("data", config.get("dataset", ""))
    gpt2 = margs["vocab_size"] >= GPT2_VOCAB and not os.path.exists(os.path.join(data_dir, "meta.pkl"))
    vocab_size = GPT2_VOCAB if gpt2 else margs["vocab_size"]
    gelu = margs.get("gelu", "none")
    hf_config = GPT2Config(vocab_size=vocab_size, n_positions=margs["block_size"], n_embd=margs["n_embd"],
                           n_layer=margs["n_layer"], n_head=margs["n_head"], layer_norm_epsilon=1e-5,
                           activation_function="gelu" if gelu == "none" else "gelu_new",
                           resid_pdrop=margs["dropout"], embd_pdrop=margs["dropout"], attn_pdrop=margs["dropout"],
                           bos_token_id=EOT if gpt2 else None, eos_token_id=EOT if gpt2 else None)
    hf = GPT2LMHeadModel(hf_config)
    sd = checkpoint.clean_state_dict(payload["model"])
    hf.load_state_dict(hf_state_dict(margs, sd, hf.state_dict(), vocab_size))
    hf.save_pretrained(dest)
    if gpt2:
        write_gpt2_tokenizer(dest)
    trimmed = f" ({margs['vocab_size']} trimmed)" if vocab_size != margs["vocab_size"] else ""
    tokenizer = "GPT-2 tokenizer files" if gpt2 else "no tokenizer files (not GPT-2 BPE)"
    return (f"Hugging Face GPT-2, {margs['n_layer']} layers, vocab {vocab_size}{trimmed}, "
            f"activation {hf_config.activation_function}, {tokenizer}")


def export_nanogpt(payload, state, dest):
    """Write payload's model and its training state as nanoGPT's DEST/ckpt.pt."""
    margs = payload["model_args"]
    if margs.get("gelu", "none") != "none":
        raise ExportError(f"the model uses the {margs['gelu']} GELU and nanoGPT's model has only the exact one "
                          "(nn.GELU()); export it with --format=hf instead")
    ckpt = {"model": checkpoint.clean_state_dict(payload["model"]), "optimizer": state["optimizer"],
            "model_args": {k: margs[k] for k in NANOGPT_ARGS}, "iter_num": state["iter_num"],
            "best_val_loss": state["best_val_loss"], "config": payload.get("config", state.get("config", {}))}
    os.makedirs(dest)
    checkpoint.atomic_write(os.path.join(dest, "ckpt.pt"), lambda f: torch.save(ckpt, f))
    return f"nanoGPT checkpoint ckpt.pt, iter {ckpt['iter_num']}, {margs['n_layer']} layers, vocab {margs['vocab_size']}"


def export(c):
    if c["format"] not in ("hf", "nanogpt"):
        raise ExportError(f"unknown format {c['format']!r}; use hf or nanogpt")
    if not c["to"]:
        raise ExportError("no destination; pass --to=DIR (a directory that does not exist yet)")
    dest = os.path.abspath(c["to"])
    if os.path.exists(dest):
        raise ExportError(f"{c['to']} already exists; pass a new --to, or remove it first")
    which = c["which"] if os.path.exists(os.path.join(c["out_dir"], f"{c['which']}.json")) else "latest"
    payload, state = checkpoint.load(c["out_dir"], which, with_state=c["format"] == "nanogpt")
    modern = non_gpt2(payload["model_args"])
    if modern:
        raise ExportError(f"the model uses {', '.join(modern)}, which GPT-2's architecture (Hugging Face's and "
                          f"nanoGPT's) lacks, so --format={c['format']} cannot hold it; sample and evaluate it here "
                          "(nanogpt-sample, nanogpt-eval)")
    tmp = f"{dest}.tmp{os.getpid()}"  # built beside dest and renamed into place: dest is whole or absent
    try:
        what = export_nanogpt(payload, state, tmp) if c["format"] == "nanogpt" else export_hf(payload, tmp)
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {c['to']}: {what}")
    return dest


def main(argv=None):
    run_cli(lambda a: export(configure(DEFAULTS, sys.argv[1:] if a is None else a)), argv)


if __name__ == "__main__":
    main()
