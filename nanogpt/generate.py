"""Generation engine: a KV cache, batched prompts of different lengths, top-k/top-p sampling, a stop token.

`generate` prefills the prompts in one forward, then decodes one token at a time against the cache. Prompts of
different lengths are left-padded: each row keeps its own positions (0 at its first real token) and never
attends to padding, so a row gets the tokens it would get alone. Past block_size every row conditions on its
last block_size tokens, as in nanoGPT: the cropped window is prefilled again (learned absolute positions move
with the window, so the cached keys cannot be reused). With rotary embeddings (pos_emb=rope) every row's
queries and keys are rotated by cache slot, padding included: the scores depend on relative positions only.
"""
import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class LayerKV:
    """One layer's (B, H, T_max, D) key and value buffers, allocated on first use (in the dtype the layer
    produces, e.g. bf16 under autocast) and reused for every later step and re-prefill."""

    def __init__(self, cache):
        self.cache = cache
        self.k = self.v = None

    def append(self, k, v):
        """Store this forward's keys/values; returns all cached keys and values, and how to attend: causal (the
        tokens are the whole sequence) and the mask (None: none needed)."""
        c = self.cache
        if self.k is None:
            B, H, _, D = k.shape
            self.k, self.v = k.new_empty(B, H, c.max_len, D), v.new_empty(B, H, c.max_len, D)
        self.k[:, :, c.start:c.pos] = k
        self.v[:, :, c.start:c.pos] = v
        return self.k[:, :, :c.pos], self.v[:, :, :c.pos], c.causal, c.mask


class KVCache:
    """The model's KV cache: per-layer buffers and the positions/mask of the tokens the next forward appends.

    Rows are left-padded by `pad` tokens; GPT.forward calls `begin` once per forward, each attention layer
    `layers[i].append`.
    """

    def __init__(self, n_layer, max_len):
        self.max_len = max_len
        self.layers = [LayerKV(self) for _ in range(n_layer)]
        self.start = self.pos = 0

    def reset(self, pad):
        """Empty the cache (the buffers stay) for a prefill of rows left-padded by pad (B,) tokens."""
        self.start = self.pos = 0
        self.pad = pad
        self.real = torch.arange(self.max_len, device=pad.device) >= pad[:, None]  # (B, T_max): not padding
        self.padded = bool(pad.any())

    def begin(self, t):
        """(B, t) positions of the t tokens this forward appends; sets how their queries attend."""
        self.start, self.pos = self.pos, self.pos + t
        if self.pos > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {self.pos} asked for")
        q = torch.arange(self.start, self.pos, device=self.pad.device)[:, None]
        k = torch.arange(self.pos, device=self.pad.device)
        self.causal = self.start == 0 and not self.padded  # the tokens are the whole sequence
        if self.causal or (t == 1 and not self.padded):  # (one query at the end sees every key)
            self.mask = None
        else:  # causal over real tokens; a padding query sees itself, else its all -inf row makes NaN values
            self.mask = ((k <= q) & (self.real[:, None, :self.pos] | (k == q)))[:, None]  # (B, 1, t, pos)
        return (q[:, 0] - self.pad[:, None]).clamp(min=0)


@dataclass
class Stats:
    """Prefill (the prompts' forward, up to the first new token) and decode (every later token) counts and
    seconds, summed over calls."""
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_steps: int = 0
    decode_s: float = 0.0

    def summary(self):
        rate = lambda n, s: n / s if s > 0 else float("nan")  # noqa: E731
        return (f"prefill: {self.prefill_tokens} tokens at {rate(self.prefill_tokens, self.prefill_s):,.1f} tokens/s; "
                f"decode: {self.decode_tokens} tokens at {rate(self.decode_tokens, self.decode_s):,.1f} tokens/s "
                f"({1000 * self.decode_s / max(self.decode_steps, 1):.2f} ms per step)")


def top_p_filter(logits, top_p):
    """logits with -inf outside the smallest set of most likely tokens whose probability reaches top_p."""
    probs, order = F.softmax(logits, dim=-1).sort(dim=-1, descending=True)
    drop = probs.cumsum(dim=-1) - probs >= top_p  # the more likely tokens already reach top_p
    return logits.masked_fill(torch.empty_like(drop).scatter_(-1, order, drop), -float("inf"))


def sample(logits, temperature=1.0, top_k=None, top_p=None):
    """(B,) next tokens from (B, V) logits: temperature, then top-k, then top-p (None or >= 1: off). With top_k the
    draw is among the k kept tokens only: the same distribution as over the masked vocabulary, without a random
    number per vocabulary entry (at V = 50304 that draw took a third of a batch-8 decode step on CPU)."""
    logits = logits.float() / temperature
    kept = None
    if top_k is not None:
        logits, kept = torch.topk(logits, min(top_k, logits.size(-1)))  # (B, k), most likely first
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    tokens = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
    return (tokens if kept is None else kept.gather(-1, tokens))[:, 0]


def _linears(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def _relayout(model, in_out):
    """Every Linear weight stored (in, out) (weight.t() contiguous) or back to (out, in): same values and shape."""
    for m in _linears(model):
        m.weight.data = m.weight.data.t().contiguous().t() if in_out else m.weight.data.contiguous()


def linear_pass_ms(model, rows, ctx=None):
    """ms for one product of `rows` rows by every Linear weight of the model (what a decode step reads), the best
    of 5 after a warm-up, under `ctx` (the decode's autocast: its products, and its cast copies of the weights,
    which keep their layout and are made in the warm-up)."""
    weights = [m.weight for m in _linears(model)]
    xs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}
    best = float("inf")
    with torch.no_grad(), ctx or contextlib.nullcontext():
        for rep in range(6):
            t0 = time.perf_counter()
            for w in weights:
                F.linear(xs[w.shape[1]], w)
            if rep:
                best = min(best, time.perf_counter() - t0)
    return 1e3 * best


MIN_LAYOUT_MS = 1.0  # below this a decode step's Linear products are kept as trained, unmeasured


def inference_layout(model, batch=None, margin=0.03, ctx=None):
    """For a CPU model that will only generate: store every Linear weight as (in, out) in memory (values, shape and
    autograd unchanged; weight.t() becomes contiguous) where that is faster. A decode step multiplies a few rows by
    every weight, so reading the weights is the step, and which layout MKL reads faster at a few rows depends on
    the CPU: (in, out) made a batch-8 decode step of GPT-2 124M 1.45x faster on an AVX-512 Xeon, and 1.3x slower on
    the same Xeon with MKL capped to AVX2 (README "Generation"). With `batch` (the decode step's rows) both layouts
    are timed over the model's weights under `ctx`, the decode's autocast context (None: in their own dtype), and
    (in, out) is kept only when at least `margin` faster, and only for models whose products take MIN_LAYOUT_MS or
    more (the layouts' sums may round apart in the last bits: a seeded run samples the same tokens every time);
    batch=None relays without measuring. Not for training: the optimizers take contiguous weights. Returns a one-line account."""
    if next(model.parameters()).device.type != "cpu":
        return "weights: as trained (the (in, out) layout is for CPU decoding)"
    if batch is None:
        _relayout(model, True)
        return "weights: stored (in, out) for decoding"
    t0 = time.perf_counter()
    plain = linear_pass_ms(model, batch, ctx)
    if plain < MIN_LAYOUT_MS:
        return (f"weights: as trained (one decode step's Linear products take {plain:.2f} ms at batch {batch}: too "
                f"little for the layout to matter, and a layout chosen by the timer's noise would change the logits' "
                f"last bits from run to run)")
    _relayout(model, True)
    relaid = linear_pass_ms(model, batch, ctx)
    keep = relaid < plain * (1 - margin)
    if not keep:
        _relayout(model, False)
    verdict = "stored (in, out)" if keep else f"as trained, (out, in): (in, out) not {margin:.0%} faster"
    return (f"weights: {verdict} (one decode step's Linear products at batch {batch}: {plain:.2f} ms as trained, "
            f"{relaid:.2f} ms (in, out); measured in {time.perf_counter() - t0:.1f} s)")


def left_pad(prompts, device):
    """(B, P) token ids with each prompt right-aligned, and the (B,) number of padding tokens per row."""
    if torch.is_tensor(prompts):
        return prompts, torch.zeros(prompts.size(0), dtype=torch.long, device=prompts.device)
    if not prompts or not all(len(p) for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    seq = torch.zeros(len(prompts), P, dtype=torch.long)
    for row, p in zip(seq, prompts):
        row[P - len(p):] = torch.as_tensor(p)
    return seq.to(device), torch.tensor([P - len(p) for p in prompts], device=device)


@torch.no_grad()
def stream(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token=None,
           use_cache=True, stats=None):
    """Yield (tokens (B,), logits (B, V)) for each new token of every row. A row that produced eos_token gets
    eos_token from then on; the stream ends when every row has. prompts: a (B, T) tensor or lists of ids."""
    block = model.config.block_size
    seq, pad = left_pad(prompts, next(model.parameters()).device)
    cache = KVCache(model.config.n_layer, block)
    done = torch.zeros(seq.size(0), dtype=torch.bool, device=seq.device)
    for step in range(max_new_tokens):
        t0 = time.perf_counter()
        if use_cache and 0 < cache.pos < block:  # room for one more key: the last token against the cache
            logits, _ = model(seq[:, -1:], cache=cache)
        else:  # the prompts, a full cache (condition on the last block_size tokens), or no cache at all
            crop = max(seq.size(1) - block, 0)
            cache.reset((pad - crop).clamp(min=0))
            logits, _ = model(seq[:, crop:], cache=cache if use_cache or cache.padded else None)
        logits = logits[:, -1, :]
        tokens = sample(logits, temperature, top_k, top_p)
        if eos_token is not None:
            tokens = tokens.masked_fill(done, eos_token)
            done |= tokens == eos_token
        seq = torch.cat((seq, tokens[:, None]), dim=1)
        if stats is not None:
            if seq.is_cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if step == 0:
                stats.prefill_tokens += int((seq.size(1) - 1 - crop - cache.pad).sum())
                stats.prefill_s += dt
            else:
                stats.decode_tokens += seq.size(0)
                stats.decode_steps += 1
                stats.decode_s += dt
        yield tokens, logits
        if eos_token is not None and bool(done.all()):
            return


def generate(model, prompts, max_new_tokens, eos_token=None, **kw):
    """prompts (B, T) tensor -> (B, T + n) tensor, rows that stopped filled with eos_token; a list of token-id
    lists (any lengths) -> a list of lists, each prompt and its new tokens up to and including eos_token.
    The other arguments are stream's."""
    steps = [tokens for tokens, _ in stream(model, prompts, max_new_tokens, eos_token=eos_token, **kw)]
    if torch.is_tensor(prompts):
        return torch.cat([prompts, *(t[:, None] for t in steps)], dim=1)
    rows = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in prompts]
    return [list(p) + (row[:row.index(eos_token) + 1] if eos_token in row else row) for p, row in zip(prompts, rows)]
