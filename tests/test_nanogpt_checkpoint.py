"""nanoGPT's out_dir (one ckpt.pt) in: sampling and init_from=resume, from a checkpoint in nanoGPT's exact layout
that the test builds from a tiny model (CPU, offline)."""
import hashlib
import pickle
import shutil

import pytest
import torch

from nanogpt import checkpoint
from nanogpt import prepare as P
from nanogpt.model import GPT, GPTConfig
from test_reliability import Workdir, ok, train

# what nanoGPT's train.py puts in model_args, and a part of its config (all of its globals)
MODEL_ARGS = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=65, dropout=0.0)
CONFIG = dict(out_dir="out-shakespeare-char", eval_interval=6, eval_iters=2, always_save_checkpoint=False,
              init_from="scratch", dataset="shakespeare_char", gradient_accumulation_steps=1, batch_size=4,
              learning_rate=1e-3, max_iters=6, weight_decay=0.1, beta1=0.9, beta2=0.99, device="cuda",
              dtype="bfloat16", compile=True, **{k: v for k, v in MODEL_ARGS.items() if k != "vocab_size"})
ITER = 6  # nanoGPT's iteration in ckpt.pt
STEPS = 3  # AdamW steps taken before it


def nanogpt_checkpoint(path):
    """Save ckpt.pt as nanoGPT's train.py does after a compiled model's training: `_orig_mod.` keys, a
    torch.optim.AdamW over nanoGPT's decay / no-decay groups, best_val_loss a 0-d tensor. Returns the model."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL_ARGS, kernels="torch"), "cpu")  # nanoGPT's parameter names and order
    params = [p for _, p in model.named_parameters()]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.99))
    x = torch.randint(65, (4, 32))
    for _ in range(STEPS):
        model(x, x)[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.save({"model": {"_orig_mod." + k: v for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "model_args": MODEL_ARGS, "iter_num": ITER,
                "best_val_loss": torch.tensor(4.05), "config": CONFIG}, path)
    return model


@pytest.fixture(scope="module")
def nano(tmp_path_factory):
    """A run directory of nanoGPT's beside nanoGPT's char-level data (meta.pkl only), and our prepared data."""
    w = Workdir(tmp_path_factory.mktemp("nanogpt"))
    P.prepare("shakespeare_char", w.data)
    (w.path / "out").mkdir()
    w.model = nanogpt_checkpoint(w.path / "out" / "ckpt.pt")
    (w.path / "data" / "shakespeare_char").mkdir(parents=True)
    shutil.copy(f"{w.data}/meta.pkl", w.path / "data" / "shakespeare_char")
    return w


def test_load_converts_nanogpt_layout(nano):
    model_payload, state = checkpoint.load(str(nano.path / "out"))
    assert model_payload["model_args"] == MODEL_ARGS | {"gelu": "none"}  # nn.GELU(): exact erf
    for k, v in nano.model.state_dict().items():
        assert torch.equal(model_payload["model"][k], v), k
    assert state["iter_num"] == ITER and state["best_val_loss"] == pytest.approx(4.05) and "ranks" not in state
    assert checkpoint.exists(nano.path / "out") and checkpoint.latest_iter(nano.path / "out") == ITER
    # nanoGPT without flash attention (torch < 2) also saved each layer's causal mask, a buffer we do not have
    old = nano.path / "old"
    old.mkdir()
    ckpt = torch.load(nano.path / "out" / "ckpt.pt", weights_only=True)
    ckpt["model"]["_orig_mod.transformer.h.0.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    torch.save(ckpt, old / "ckpt.pt")
    assert checkpoint.load(str(old), with_state=False)[0]["model"].keys() == model_payload["model"].keys()
    # weights and model args are all sampling needs (as for nanoGPT's sample.py); resuming needs the rest
    torch.save({k: ckpt[k] for k in ("model", "model_args")}, old / "ckpt.pt")
    assert checkpoint.load(str(old), with_state=False)[0]["model_args"]["gelu"] == "none"
    with pytest.raises(checkpoint.CheckpointError, match=r"ckpt\.pt is malformed \(no 'optimizer'\)"):
        checkpoint.load(str(old))


def test_sample_from_nanogpt_out_dir(nano, capsys, monkeypatch):
    from nanogpt.configurator import configure
    from nanogpt.sample import DEFAULTS, load_model, main
    c = configure(DEFAULTS, ["--out_dir=out", "--device=cpu", "--kernels=torch"])
    monkeypatch.chdir(nano.path)  # nanoGPT's data/<dataset>/meta.pkl, relative to where it runs
    model, data_dir = load_model(c)
    assert model.config.gelu == "none" and data_dir == "data/shakespeare_char"
    with torch.no_grad():
        x = torch.randint(65, (2, 16))
        assert torch.equal(model(x)[0], nano.model.eval()(x)[0])
    main(["--out_dir=out", "--device=cpu", "--dtype=float32", "--kernels=torch", "--start=ROMEO:", "--num_samples=1",
          "--max_new_tokens=20"])
    text = capsys.readouterr().out.split("---------------")[0].rstrip("\n")
    with open("data/shakespeare_char/meta.pkl", "rb") as f:
        vocab = pickle.load(f)["stoi"]  # the test's own file
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 20 and set(text) <= set(vocab)


def test_resume_from_nanogpt_out_dir(nano):
    """init_from=resume continues at nanoGPT's iteration with its optimizer state, writes our checkpoints beside
    ckpt.pt and leaves ckpt.pt as it was."""
    out, ckpt = nano.path / "out", nano.path / "out" / "ckpt.pt"
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    run = ok(train(nano, out_dir=out, init_from="auto", max_iters=ITER + 2, eval_interval=2))
    assert f"resuming from iter {ITER} (best val loss 4.0500)" in run.stdout
    assert f"saved checkpoint at iter {ITER + 2}" in run.stdout and checkpoint.latest_iter(out) == ITER + 2
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest
    # AdamW went on counting from nanoGPT's steps (a fresh optimizer would be at 2)
    nanogpt_state = torch.load(ckpt, weights_only=True)["optimizer"]["state"]
    ours = checkpoint.load(str(out))[1]["optimizer"]
    assert ours["state"].keys() == nanogpt_state.keys()
    assert all(int(ours["state"][i]["step"]) == STEPS + 2 for i in nanogpt_state)
    # with nanoGPT's hyperparameters (its beta2, not the config's 0.95), run as this run's AdamW runs
    assert [(g["betas"], g["weight_decay"], g["decoupled_weight_decay"]) for g in ours["param_groups"]] == \
        [((0.9, 0.99), 0.1, True), ((0.9, 0.99), 0.0, True)]
