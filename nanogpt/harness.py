"""Zero- and few-shot evaluation through EleutherAI's lm-evaluation-harness (`pip install lm_eval`).

    nanogpt-eval --out_dir=out --tasks=hellaswag
    nanogpt-eval --init_from=gpt2 --tasks=hellaswag,lambada_openai --batch_size=32
    nanogpt-eval --out_dir=out --tasks=my_task --include_path=tasks/   # task YAMLs of your own (local files)

The harness defines the tasks, their prompts and metrics; this module is only our model as an `lm_eval` model
class (NanoGPTLM: loglikelihood, loglikelihood_rolling and generate_until, batched; generation on
nanogpt.generate's KV cache). It prints the harness's table and writes its results as JSON. GPT-2 BPE models
only: the harness's tasks are text, and a char-level model has no end-of-text token to condition on.
"""
import json
import os
import sys
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from nanogpt import checkpoint
from nanogpt import generate as engine
from nanogpt.codec import gpt2
from nanogpt.configurator import Keys, configure
from nanogpt.errors import UserError, run_cli
from nanogpt.sample import load_model

DEFAULTS = Keys("nanogpt-eval", __doc__, {
    "model": dict(
        init_from=("resume", "resume (from out_dir) | gpt2* | a Hugging Face model directory"),
        out_dir=("out", "the training run's out_dir"),
        which=("best", "best | latest checkpoint of out_dir"),
    ),
    "tasks": dict(
        tasks=("hellaswag", "comma-separated lm-evaluation-harness task (or group) names"),
        include_path=("", "a directory of extra task YAMLs"),
        num_fewshot=(0, "few-shot examples per document"),
        limit=(0, "evaluate only the first `limit` documents of each task (0: all)"),
        output=("", "the results JSON (default: out_dir/eval.json, or eval_<init_from>.json)"),
        log_samples=(False, "also write every document's requests and the model's responses to the JSON"),
        seed=(1234, "random seed"),
    ),
    "system": dict(
        batch_size=(16, "documents per forward"),
        device=("cuda" if torch.cuda.is_available() else "cpu", "cpu | cuda | cuda:N | mps"),
        dtype=("bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32",
               "float32 | bfloat16 | float16 (autocast)"),
        kernels=("auto", "auto | torch | triton | ext | per op (see nanogpt-train --help)"),
    ),
})


def lm_class():
    """NanoGPTLM, defined on first use: lm_eval is an optional dependency."""
    try:
        from lm_eval.api.model import TemplateLM
        from lm_eval.models.utils import handle_stop_sequences
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    except ImportError:
        raise UserError("nanogpt-eval needs lm-evaluation-harness: pip install lm_eval") from None

    class NanoGPTLM(TemplateLM):
        """A nanogpt GPT as an lm_eval model. Scores use the tokenizer's vocabulary only (GPT-2's 50257 of a padded
        50304), as the exported Hugging Face model does."""

        def __init__(self, model, batch_size=16, ctx=None):
            super().__init__()
            self.model, self.batch_size, self.ctx = model.eval(), int(batch_size), ctx or nullcontext()
            self.enc = gpt2()
            self._device = next(model.parameters()).device

        @property
        def eot_token_id(self):
            return self.enc.eot_token

        @property
        def max_length(self):
            return self.model.config.block_size

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            return self.enc.encode_ordinary(string)

        def tok_decode(self, tokens, **kwargs):
            return self.enc.decode(tokens)

        @torch.no_grad()
        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
            """[(request, context ids, continuation ids)] -> [(log p(continuation | context), greedy)], in batches of
            similar lengths, right-padded (causal attention: padding after a row never reaches it)."""
            out = [None] * len(requests)
            order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                # the last block_size tokens predict the continuation (its last token is only a target)
                rows = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in batch]
                x = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
                for r, row in enumerate(rows):
                    x[r, :len(row)] = torch.tensor(row)
                with self.ctx:
                    logits = self.model(x.to(self._device), all_logits=True)[0]
                logp = F.log_softmax(logits[..., :self.enc.n_vocab].float(), dim=-1).cpu()
                for r, i in enumerate(batch):
                    cont = torch.tensor(requests[i][2])
                    lp = logp[r, len(rows[r]) - len(cont):len(rows[r])]
                    out[i] = (lp.gather(1, cont[:, None]).sum().item(), bool((lp.argmax(-1) == cont).all()))
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            """Each text's log-likelihood, scored in block_size windows (lm_eval's rolling windows, EOT first)."""
            windows, owner = [], []
            for n, (text,) in enumerate(req.args for req in requests):
                for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                        self.tok_encode(text), self.eot_token_id, self.max_length, context_len=1)):
                    windows.append((None, ctx, cont))
                    owner.append(n)
            total = [0.0] * len(requests)
            for n, (lp, _) in zip(owner, self._loglikelihood_tokens(windows)):
                total[n] += lp
            return total

        @torch.no_grad()
        def generate_until(self, requests, disable_tqdm=False):
            """Greedy (or sampled, when the task asks) continuations on the KV cache, cut at the first stop
            sequence; batched over requests with the same generation settings."""
            out = [None] * len(requests)
            groups = {}
            for i, req in enumerate(requests):
                groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
            for indices in groups.values():
                kw = dict(requests[indices[0]].args[1])
                until = handle_stop_sequences(kw.pop("until", None), self.tok_decode([self.eot_token_id]))
                max_new = int(kw.pop("max_gen_toks", kw.pop("max_new_tokens", 256)))
                sampling = dict(temperature=kw.get("temperature") or 1.0, top_k=kw.get("top_k"),
                                top_p=kw.get("top_p")) if kw.get("do_sample") else dict(top_k=1)  # top_k=1: greedy
                keep = max(1, self.max_length - max_new)  # room for the new tokens in the context
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start:start + self.batch_size]
                    prompts = [(self.tok_encode(requests[i].args[0]) or [self.eot_token_id])[-keep:] for i in batch]
                    with self.ctx:
                        rows = engine.generate(self.model, prompts, max_new, eos_token=self.eot_token_id, **sampling)
                    for i, prompt, row in zip(batch, prompts, rows):
                        text = self.tok_decode(row[len(prompt):])
                        out[i] = text[:min([text.index(s) for s in until if s in text], default=len(text))]
            return out

    return NanoGPTLM


def run_tasks(lm, tasks, include_path="", num_fewshot=0, limit=0, seed=1234, log_samples=False):
    """The harness's results for `tasks` (a list of names) on the lm_eval model `lm`."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    manager = None
    if include_path:  # indexing the harness's own ~15k task configs takes seconds: only when they are asked for
        manager = TaskManager(include_path=include_path, include_defaults=False)
    if manager is None or not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=include_path or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}; see `lm_eval ls tasks`, or pass --include_path "
                        "with their YAMLs")
    return simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit or None, task_manager=manager,
                           log_samples=log_samples, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                           fewshot_random_seed=seed)


def evaluate(c):
    """Evaluate the configured model on c["tasks"]; print the harness's table, write its JSON, return the results."""
    NanoGPTLM = lm_class()
    from lm_eval.utils import handle_non_serializable, make_table
    torch.manual_seed(c["seed"])
    model, data_dir = load_model(c)
    if data_dir is not None and os.path.exists(os.path.join(data_dir, "meta.pkl")):
        raise UserError(f"{c['out_dir']} holds a char-level model ({data_dir}/meta.pkl); nanogpt-eval scores GPT-2 "
                        "BPE models (the harness's tasks are text)")
    model.to(c["device"])
    device_type = "cuda" if "cuda" in c["device"] else "cpu"
    ctx = nullcontext() if c["dtype"] == "float32" else torch.autocast(device_type, dtype=getattr(torch, c["dtype"]))
    lm = NanoGPTLM(model, c["batch_size"], ctx)
    results = run_tasks(lm, [t.strip() for t in c["tasks"].split(",") if t.strip()], c["include_path"],
                        c["num_fewshot"], c["limit"], c["seed"], c["log_samples"])
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    path = c["output"] or (os.path.join(c["out_dir"], "eval.json") if c["init_from"] == "resume"
                           else f"eval_{os.path.basename(os.path.normpath(c['init_from']))}.json")
    text = json.dumps(results, indent=1, default=handle_non_serializable).encode()
    checkpoint.atomic_write(path, lambda f: f.write(text))
    print(f"wrote {path}")
    return results


def main(argv=None):
    run_cli(lambda a: evaluate(configure(DEFAULTS, sys.argv[1:] if a is None else a)), argv)


if __name__ == "__main__":
    main()
