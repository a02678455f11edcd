"""nanogpt-eval: our model as an lm-evaluation-harness model class, end to end offline on a local task in
HellaSwag's layout; the harness's numbers equal the same log-likelihoods computed directly from our model."""
import json
import os
from pathlib import Path

import lm_eval
import pytest
import torch
import torch.nn.functional as F

from nanogpt import harness
from nanogpt.codec import gpt2
from runs import tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 50257  # scores over the tokenizer's vocabulary, not the padded one
# the harness's own HellaSwag task, pointed at a local file
TASK = """task: tiny_hellaswag
include: {hellaswag}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    validation: {data}
training_split: null
validation_split: validation
"""
DOCS = [("Baking cookies", "A woman puts flour in a bowl.", "she", ["stirs it slowly.", "flies away to the moon now.",
                                                                    "sings.", "adds two eggs and some sugar."], 3),
        ("Surfing", "A man paddles out on a board.", "he", ["stands up and rides a wave.", "eats a sandwich.",
                                                           "reads.", "falls asleep on the beach towel."], 0),
        ("Playing piano", "A boy sits at the piano.", "the boy", ["plays a song.", "jumps.", "opens a window and waves",
                                                                  "closes the lid and leaves the room."], 0),
        ("Running", "People run along a track in the rain.", "they", ["cross the finish line.", "swim.", "stop and "
                                                                      "talk to a dog for a while.", "fly."], 0),
        ("Painting", "An artist mixes blue and yellow.", "she", ["gets green.", "paints a tree on the canvas.",
                                                                "cries.", "drives a car to the store."], 1)]


def logprob(model, ctx, cont):
    """log p(cont | ctx) from one plain forward of our model (no batching, no padding)."""
    ids = torch.tensor([ctx + cont])[:, -(model.config.block_size + 1):]
    with torch.no_grad():
        logp = F.log_softmax(model(ids[:, :-1], all_logits=True)[0][0, :, :VOCAB], dim=-1)
    return logp[-len(cont):].gather(1, torch.tensor(cont)[:, None]).sum().item()


@pytest.fixture
def tasks(tmp_path, monkeypatch):
    """A directory holding the task tiny_hellaswag: DOCS in HellaSwag's jsonl layout, offline."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "hs.jsonl"
    data.write_text("".join(json.dumps({"ind": i, "activity_label": a, "ctx_a": ca, "ctx_b": cb,
                                        "ctx": f"{ca} {cb.capitalize()}", "endings": e, "source_id": f"x{i}",
                                        "split": "val", "split_type": "indomain", "label": str(label)}) + "\n"
                                for i, (a, ca, cb, e, label) in enumerate(DOCS)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    hellaswag = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
    (tasks / "tiny_hellaswag.yaml").write_text(TASK.format(hellaswag=hellaswag, data=data))
    return tasks


def test_harness_hellaswag_layout_end_to_end(tmp_path, tasks):
    model, _ = tiny_run(tmp_path / "out", tmp_path / "data", block_size=32)
    out = tmp_path / "eval.json"
    harness.main([f"--out_dir={tmp_path / 'out'}", "--tasks=tiny_hellaswag", f"--include_path={tasks}",
                  "--device=cpu", "--dtype=float32", "--kernels=torch", "--batch_size=3", f"--output={out}",
                  "--log_samples=True"])
    results = json.loads(out.read_text())
    got = results["results"]["tiny_hellaswag"]
    samples = sorted(results["samples"]["tiny_hellaswag"], key=lambda s: s["doc_id"])
    # the same choice made directly: HellaSwag's query, each ending after a space, argmax of the log-likelihood
    # (acc) and of it per character of the ending (acc_norm)
    enc, acc, acc_norm = gpt2(), 0, 0
    for (a, ca, cb, endings, label), sample in zip(DOCS, samples, strict=True):
        ctx = enc.encode_ordinary(f"{a}: {ca} {cb.capitalize()}")
        lls = [logprob(model, ctx, enc.encode_ordinary(f"{a}: {ca} {cb.capitalize()} {e}")[len(ctx):]) for e in endings]
        assert [float(r[0]) for r in sample["filtered_resps"]] == pytest.approx(lls, abs=1e-4)
        acc += max(range(4), key=lambda k: lls[k]) == label
        acc_norm += max(range(4), key=lambda k: lls[k] / len(endings[k])) == label
    assert (got["acc,none"], got["acc_norm,none"]) == (acc / len(DOCS), acc_norm / len(DOCS))


class Request:  # what the harness hands a model: the arguments of one request
    def __init__(self, *args):
        self.args = args


@pytest.fixture
def lm(tmp_path):
    model, _ = tiny_run(tmp_path / "out", tmp_path / "data", block_size=16)
    return harness.lm_class()(model, batch_size=3), model


def test_loglikelihood_batched_equals_direct(lm):
    lm, model = lm
    enc = gpt2()
    pairs = [("The cat sat on", " the mat"), ("A", " b c d e f"), ("Once upon a time there was a very long story "
             "that does not fit in the context window of sixteen tokens", " at all, really"), ("", "Hello world"),
             ("x", " y"), ("Numbers: 1 2 3", " 4 5 6 7")]
    got = lm.loglikelihood([Request(*p) for p in pairs])
    for (ctx, cont), (lp, _) in zip(pairs, got):
        c = enc.encode_ordinary(ctx) if ctx else [enc.eot_token]
        want = logprob(model, c, enc.encode_ordinary(ctx + cont)[len(c) if ctx else 0:])
        assert abs(lp - want) < 1e-4, (ctx, cont, lp, want)
    # rolling: every token of a text longer than block_size scored once, the first after EOT
    text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen"
    ids = [enc.eot_token] + enc.encode_ordinary(text)
    want = sum(logprob(model, ids[max(0, i - 16):i], [ids[i]]) for i in range(1, len(ids)))
    assert abs(lm.loglikelihood_rolling([Request(text)])[0] - want) < 1e-3


def test_generate_until_is_greedy_and_stops(lm):
    lm, model = lm
    enc = gpt2()
    prompts = ["The quick brown fox", "Hi"]
    out = lm.generate_until([Request(p, {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}) for p in prompts])
    for p, text in zip(prompts, out):
        ids = enc.encode_ordinary(p)
        for _ in range(6):  # greedy without a cache: the argmax of the last position, one token at a time
            with torch.no_grad():
                ids.append(int(model(torch.tensor([ids]))[0][0, -1, :VOCAB].argmax()))
        want = enc.decode(ids[len(enc.encode_ordinary(p)):])
        want = want[:want.index("\n\n")] if "\n\n" in want else want
        assert text == want.split("<|endoftext|>")[0]


def test_bad_task_is_one_line(tmp_path, capsys, monkeypatch):
    import lm_eval.tasks
    tiny_run(tmp_path / "out", tmp_path / "data")
    real = lm_eval.tasks.TaskManager  # the harness's own task index, skipped here: it takes 20 s to build
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda include_path=None, **kw: real(include_path,
                                                                                          include_defaults=False))
    with pytest.raises(SystemExit) as e:
        harness.main([f"--out_dir={tmp_path / 'out'}", "--tasks=no_such_task", "--device=cpu", "--kernels=torch"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "unknown task(s) no_such_task" in err
    assert not os.path.exists(tmp_path / "out" / "eval.json")


def test_trainer_scores_eval_tasks_every_interval(tmp_path, tasks, capsys):
    """--eval_tasks: the harness's scores at iters 0 and 2 in metrics.jsonl, the last equal to nanogpt-eval's on the
    checkpoint the run ends with."""
    from nanogpt import prepare, train
    prepare.prepare("shakespeare", tmp_path / "bpe")
    out = tmp_path / "run"
    common = ["--device=cpu", "--dtype=float32", "--kernels=torch", f"--include_path={tasks}"]
    train.main([f"--out_dir={out}", "--dataset=shakespeare", f"--data_dir={tmp_path / 'bpe'}", "--n_layer=1",
                "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=2", "--gradient_accumulation_steps=1",
                "--max_iters=2", "--eval_interval=1", "--eval_iters=1", "--compile=False", "--autotune=False",
                "--eval_tasks=tiny_hellaswag", "--eval_tasks_interval=2", *common[:3],
                f"--eval_include_path={tasks}"])
    assert "step 2: tiny_hellaswag acc " in capsys.readouterr().out
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_tasks" in r]
    assert [r["iter"] for r in records] == [0, 2]
    harness.main([f"--out_dir={out}", "--which=latest", "--tasks=tiny_hellaswag", f"--output={tmp_path / 'e.json'}",
                  *common])
    got = json.loads((tmp_path / "e.json").read_text())["results"]["tiny_hellaswag"]
    assert records[-1]["eval_tasks"]["tiny_hellaswag"] == {k.split(",")[0]: v for k, v in got.items()
                                                           if isinstance(v, float) and "stderr" not in k}


def test_trainer_eval_tasks_settings_are_checked(tmp_path, capsys):
    from nanogpt import train
    for bad in (["--eval_tasks=hellaswag"], ["--eval_tasks_interval=4"],
                ["--eval_tasks=hellaswag", "--eval_tasks_interval=3", "--eval_interval=2"]):
        with pytest.raises(SystemExit) as e:
            train.main([f"--out_dir={tmp_path}", "--device=cpu", *bad])
        assert e.value.code == 2 and "give both, the interval a multiple of eval_interval" in capsys.readouterr().err
