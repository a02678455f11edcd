"""The generation engine (nanogpt.generate): KV cache, batched prompts, top-p, eos, streaming, the benchmark."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from nanogpt import generate as engine
from nanogpt.configurator import configure
from nanogpt.model import GPT, MODERN, GPTConfig
from nanogpt_kernels import registry

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=71, dropout=0.0)
BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(registry.unavailable("attention", b, "cpu") is not None,
                                                     reason=f"{b} attention cannot run here")) for b in ("torch", "ext")]
# GPT-2's recipe, and every modern option (rotary embeddings: cached keys rotated by their slot)
RECIPES = pytest.mark.parametrize("recipe", [{}, MODERN], ids=["gpt2", "modern"])


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(kernels="torch", **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**(TINY | kw), kernels=kernels), device_type="cpu").eval()


@pytest.mark.parametrize("kernels,recipe", [pytest.param(b.values[0], {}, marks=b.marks, id=b.values[0])
                                            for b in BACKENDS] + [pytest.param("torch", MODERN, id="modern")])
def test_cache_equals_recomputing_past_block_size(kernels, recipe, monkeypatch):
    """Greedy: the same tokens, and logits within 1e-5 at every step, 200 tokens past block_size; the cache's
    buffers are allocated once per layer for the whole generation."""
    model = tiny_model(kernels, **recipe)
    buffers, append = set(), engine.LayerKV.append

    def spy(self, k, v):
        out = append(self, k, v)
        buffers.add(self.k.data_ptr())
        return out
    monkeypatch.setattr(engine.LayerKV, "append", spy)
    idx = torch.randint(0, TINY["vocab_size"], (2, 5))
    n = TINY["block_size"] - 5 + 200
    cached = list(engine.stream(model, idx, n, top_k=1))
    assert len(buffers) == TINY["n_layer"]
    plain = list(engine.stream(model, idx, n, top_k=1, use_cache=False))
    assert len(cached) == len(plain) == n
    for step, ((t1, l1), (t2, l2)) in enumerate(zip(cached, plain)):
        torch.testing.assert_close(l1, l2, atol=1e-5, rtol=0, msg=f"step {step}")
        assert torch.equal(t1, t2), step


@pytest.mark.parametrize("plain_ms,in_out_ms,kept", [(1.10, 1.0, True), (1.02, 1.0, False), (1.0, 1.10, False)],
                         ids=["in-out-10%-faster", "in-out-2%-faster", "in-out-slower"])
def test_inference_layout_keeps_the_measured_faster_layout(monkeypatch, plain_ms, in_out_ms, kept):
    """With a batch, the weights are timed in both layouts (here by a stand-in timer that reads their layout) and
    (in, out) is kept only when at least 3% faster; otherwise every weight is contiguous (out, in) again. The values
    never change."""
    model = tiny_model("torch")
    before = {n: p.clone() for n, p in model.named_parameters()}
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    seen = []

    def fake_ms(m, rows, ctx=None):
        in_out = all(w.t().is_contiguous() and not w.is_contiguous() for w in linears)
        seen.append((in_out, rows))
        return in_out_ms if in_out else plain_ms
    monkeypatch.setattr(engine, "linear_pass_ms", fake_ms)
    line = engine.inference_layout(model, batch=8)
    assert seen == [(False, 8), (True, 8)], seen
    assert all(w.t().is_contiguous() and not w.is_contiguous() for w in linears) == kept
    assert all(w.is_contiguous() for w in linears) != kept
    assert ("stored (in, out)" in line) == kept and "at batch 8" in line and "\n" not in line, line
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_inference_layout_leaves_a_small_model_as_trained(monkeypatch):
    """Under MIN_LAYOUT_MS a step the layout is not measured further nor changed (a seeded run stays the same)."""
    model = tiny_model("torch")
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    calls = []
    monkeypatch.setattr(engine, "linear_pass_ms",
                        lambda m, rows, ctx=None: calls.append(rows) or 0.5 * engine.MIN_LAYOUT_MS)
    assert "too little for the layout to matter" in engine.inference_layout(model, batch=2)
    assert calls == [2] and all(w.is_contiguous() for w in linears)


def test_linear_pass_ms_times_every_weight(monkeypatch):
    model = tiny_model("torch")
    ms = engine.linear_pass_ms(model, 3)
    assert 0 < ms < 1e4
    # under the decode's autocast it times the products that decode runs: bf16, from the weights' cast copies
    seen = []
    linear = engine.F.linear
    monkeypatch.setattr(engine.F, "linear", lambda x, w: seen.append(torch.is_autocast_enabled("cpu")) or linear(x, w))
    engine.linear_pass_ms(model, 3, torch.autocast("cpu", dtype=torch.bfloat16))
    n = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert seen == [True] * (6 * n), seen


@pytest.mark.parametrize("kernels", ["torch", "ext"])
@RECIPES
def test_inference_layout_keeps_the_tokens(kernels, recipe):
    """Linear weights stored (in, out): every one re-laid (the tied head and embedding are one), the same greedy
    tokens, and logits within 1e-5 at every step, with the cache."""
    if registry.unavailable("attention", kernels, "cpu") is not None:
        pytest.skip(f"{kernels} cannot run here")
    model = tiny_model(kernels, **recipe)
    idx = torch.randint(0, TINY["vocab_size"], (3, 5))
    before = list(engine.stream(model, idx, 40, top_k=1))
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert engine.inference_layout(model) == "weights: stored (in, out) for decoding"
    assert all(w.t().is_contiguous() and not w.is_contiguous() for w in linears)
    assert (model.transformer.wte.weight is model.lm_head.weight) == model.config.tie_embeddings
    after = list(engine.stream(model, idx, 40, top_k=1))
    for step, ((t1, l1), (t2, l2)) in enumerate(zip(before, after)):
        torch.testing.assert_close(l2, l1, atol=1e-5, rtol=0, msg=f"step {step}")
        assert torch.equal(t1, t2), step


def test_greedy_equals_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=64, vocab_size=97,
                                  resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # fresh biases are zero: randomize so a missed bias fails
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(str(tmp_path), dict(kernels="torch")).eval()
    idx = torch.randint(0, 97, (2, 7))
    ref = hf.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False, max_new_tokens=50,
                      min_new_tokens=50, pad_token_id=0)
    assert torch.equal(model.generate(idx, 50, top_k=1), ref)


@RECIPES
def test_batched_prompts_of_different_lengths_equal_each_alone(recipe):
    """Left-padded rows, across the re-prefills past block_size, with and without the cache, and eos per row."""
    model = tiny_model(**recipe)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist() for n in (3, 17, 9)]
    alone = [model.generate([p], 40, top_k=1)[0] for p in prompts]
    assert model.generate(prompts, 40, top_k=1) == alone
    assert model.generate(prompts, 40, top_k=1, use_cache=False) == alone
    eos = alone[1][len(prompts[1]) + 4]  # row 1 stops at its 5th new token
    stopped = [model.generate([p], 40, top_k=1, eos_token=eos)[0] for p in prompts]
    assert len(stopped[1]) <= len(prompts[1]) + 5 and stopped[1][-1] == eos
    assert model.generate(prompts, 40, top_k=1, eos_token=eos) == stopped


def test_tensor_prompts_and_eos():
    """(B, T) in, (B, T + n) out; rows that stopped are filled with eos; all rows stopped ends the stream."""
    model = tiny_model()
    idx = torch.randint(0, TINY["vocab_size"], (2, 4))
    out = model.generate(idx, 10, top_k=1)
    assert out.shape == (2, 14) and torch.equal(out[:, :4], idx)
    eos = int(out[0, 5])  # row 0's second new token
    stopped = model.generate(idx, 10, top_k=1, eos_token=eos)
    ends = [ref.index(eos) + 1 if eos in ref else len(ref) for ref in out[:, 4:].tolist()]
    for row, ref, end in zip(stopped[:, 4:].tolist(), out[:, 4:].tolist(), ends):
        assert row[:end] == ref[:end] and set(row[end:]) <= {eos}
    assert model.generate(idx[:1], 10, top_k=1, eos_token=eos).shape == (1, 4 + ends[0])


def test_seeded_sampling_is_reproducible():
    model = tiny_model()
    idx = torch.randint(0, TINY["vocab_size"], (3, 4))
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(model.generate(idx, 40, temperature=0.9, top_k=20, top_p=0.9))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15], [0.1, 0.2, 0.3, 0.4]])
    logits = probs.log()
    kept = lambda p: [set(torch.nonzero(row.isfinite()).flatten().tolist()) for row in engine.top_p_filter(logits, p)]  # noqa: E731
    assert kept(0.3) == [{0}, {3}]
    assert kept(0.75) == [{0, 2}, {3, 2, 1}]
    assert kept(0.85) == [{0, 2, 3}, {3, 2, 1}]
    assert kept(0.97) == [{0, 1, 2, 3}, {0, 1, 2, 3}]
    torch.manual_seed(0)
    draws = torch.stack([engine.sample(logits, top_p=0.75) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {0, 2} and set(draws[:, 1].tolist()) == {1, 2, 3}


def test_top_k_draws_the_k_most_likely_with_their_renormalized_probabilities():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.25, 0.2], [0.3, 0.1, 0.2, 0.15, 0.25]])
    torch.manual_seed(0)
    draws = torch.stack([engine.sample(probs.log(), top_k=3, top_p=0.99) for _ in range(4000)])
    for row, top in zip(range(2), ([1, 3, 4], [0, 4, 2])):
        freq = torch.bincount(draws[:, row], minlength=5).double() / len(draws)
        want = torch.zeros(5, dtype=torch.float64)
        want[top] = probs[row, top].double() / probs[row, top].sum()
        assert (freq - want).abs().max() < 0.03, (row, freq, want)  # 4000 draws: standard error < 0.008
    assert torch.equal(engine.sample(probs.log(), top_k=1), probs.argmax(-1))


def test_streamed_text_keeps_incomplete_characters_back(capsys):
    """A token may end inside a UTF-8 character: nothing is printed that a later token would change."""
    from nanogpt.sample import print_streamed
    data = "né €x".encode()
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    steps = ((torch.tensor([b]), None) for b in data[2:])
    assert print_streamed(list(data[:2]), steps, decode) == list(data)
    assert capsys.readouterr().out == "né €x\n"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("gen") / "tiny-gpt2"
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32,
                                                         vocab_size=50257)).save_pretrained(d)
    return d


def run_sample(capsys, hf_dir, *args):
    from nanogpt.sample import DEFAULTS, sample
    base = [f"--init_from={hf_dir}", "--device=cpu", "--dtype=float32", "--kernels=torch", "--max_new_tokens=40"]
    samples = sample(configure(DEFAULTS, [*base, *args]))
    out = capsys.readouterr()
    return samples, out.out, out.err


def test_sample_streams_the_same_text(capsys, hf_dir):
    streamed = run_sample(capsys, hf_dir, "--start=Hello world", "--num_samples=2")
    plain = run_sample(capsys, hf_dir, "--start=Hello world", "--num_samples=2", "--stream=False")
    assert streamed[:2] == plain[:2] and len(streamed[0]) == 2 and streamed[0][0] != streamed[0][1]
    assert "prefill:" in streamed[2] and "tokens/s" in streamed[2]


def test_sample_prompts_file_is_batched(capsys, hf_dir, tmp_path):
    lines = ["Hello world", "Once upon a time there was", "The"]
    (tmp_path / "prompts.txt").write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n")
    batched, out, _ = run_sample(capsys, hf_dir, f"--prompts={tmp_path / 'prompts.txt'}", "--num_samples=1",
                                 "--top_k=1")
    assert out.count("---------------") == 3
    assert batched == [run_sample(capsys, hf_dir, f"--start={line}", "--num_samples=1", "--top_k=1")[0][0]
                       for line in lines]


def test_bench_generate_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_generate",
                                                  Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--vocab_size=65",
            "--prompt_len=4", "--max_new_tokens=20", "--batch_sizes=1,2", "--no_cache_batch_sizes=2",
            "--kernels=torch", f"--json={tmp_path / 'gen.json'}"]
    bench.main(argv)
    result = json.loads((tmp_path / "gen.json").read_text())
    assert [(r["cache"], r["batch"]) for r in result["runs"]] == [(True, 1), (True, 2), (False, 2)]
    assert all(r["decode_tokens"] == 19 * r["batch"] and r["ms_per_token"] > 0 for r in result["runs"])
    assert set(result["cache_speedup"]) == {"2"} and "error" not in json.dumps(result["runs"])
    assert "at batch 2:" in result["inference_layout"]  # measured at the largest batch it runs
    with pytest.raises(SystemExit):
        bench.main([*argv[:-1], "--inference_layout=maybe"])
