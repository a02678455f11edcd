"""nanogpt-export: to Hugging Face (transformers loads it; logits equal ours) and to nanoGPT's ckpt.pt (CPU, offline)."""
import pytest
import tiktoken
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

from nanogpt import export
from nanogpt.model import GPT, GPTConfig
from runs import tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("gelu,padded", [("none", True), ("tanh", True), ("none", False), ("tanh", False)])
def test_hf_export_logits_equal_ours(tmp_path, gelu, padded):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if not padded:  # a char-level model: its data dir has a meta.pkl, its vocab is the model's
        (data_dir / "meta.pkl").write_bytes(b"")
    model, _ = tiny_run(tmp_path / "out", data_dir, 50304 if padded else 65, gelu, bias=gelu == "tanh")
    export.main([f"--out_dir={tmp_path / 'out'}", "--format=hf", f"--to={tmp_path / 'hf'}"])
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.activation_function == ("gelu" if gelu == "none" else "gelu_new")
    assert hf.config.vocab_size == (50257 if padded else 65)
    idx = torch.randint(0, hf.config.vocab_size, (3, 16))
    with torch.no_grad():
        ours = model(idx, all_logits=True)[0][..., :hf.config.vocab_size]
        torch.testing.assert_close(hf(idx).logits, ours, atol=1e-5, rtol=0)
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    if padded:  # GPT-2 BPE: transformers' tokenizer from the exported files encodes as tiktoken does
        text = "Hello world — ünïcödé ✓ 12345  two spaces\n\nnew<|endoftext|>x"
        assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode(text) == \
            tiktoken.get_encoding("gpt2").encode(text, allowed_special="all")
    else:
        assert "vocab.json" not in files


def test_nanogpt_export_reads_back(tmp_path):
    model, opt = tiny_run(tmp_path / "out", tmp_path / "data")
    export.main([f"--out_dir={tmp_path / 'out'}", "--format=nanogpt", f"--to={tmp_path / 'nano'}"])
    ckpt = torch.load(tmp_path / "nano" / "ckpt.pt", weights_only=True)  # what nanoGPT's sample.py does
    assert set(ckpt) == {"model", "optimizer", "model_args", "iter_num", "best_val_loss", "config"}
    assert ckpt["model_args"] == dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=False, vocab_size=50304,
                                      dropout=0.0)  # exactly nanoGPT's GPTConfig fields
    assert (ckpt["iter_num"], ckpt["best_val_loss"], ckpt["config"]["dataset"]) == (7, 3.5, "x")
    # nanoGPT's GPT takes these names as they are; ours has the same parameter names and GELU
    again = GPT(GPTConfig(**ckpt["model_args"], kernels="torch"), "cpu").eval()
    again.load_state_dict(ckpt["model"])
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert torch.equal(again(idx, all_logits=True)[0], model(idx, all_logits=True)[0])
    # nanoGPT's train.py resume: torch's AdamW over its two groups (decay: >= 2-D) loads the optimizer state
    groups = again.optimizer_groups(0.1)
    resumed = torch.optim.AdamW(groups, lr=1e-2)
    resumed.load_state_dict(ckpt["optimizer"])
    assert torch.equal(resumed.state[groups[0]["params"][0]]["exp_avg"], opt.state[next(model.parameters())]["exp_avg"])


def test_export_errors(tmp_path, capsys):
    tiny_run(tmp_path / "out", tmp_path / "data", gelu="tanh")
    (tmp_path / "taken").mkdir()
    cases = [(["--format=onnx", "--to=x"], "unknown format 'onnx'"),
             (["--format=hf"], "pass --to=DIR"),
             (["--format=hf", f"--to={tmp_path / 'taken'}"], "already exists"),
             (["--format=nanogpt", f"--to={tmp_path / 'n'}"], "--format=hf instead"),
             (["--out_dir=nowhere", f"--to={tmp_path / 'n'}"], "no checkpoint in nowhere")]
    for args, expect in cases:
        with pytest.raises(SystemExit) as e:
            export.main([f"--out_dir={tmp_path / 'out'}", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expect in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "taken"]  # nothing half-written
