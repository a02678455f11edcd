"""The GPT language model (GPT-2 architecture), with nanoGPT's API, and a modern recipe as options.

Hot ops (attention, layer_norm, the MLP's bias+GELU, the AdamW step) go through the backend
chosen by `GPTConfig.kernels` (see nanogpt_kernels.registry); parameter names match nanoGPT
and Hugging Face's GPT-2 so checkpoints and pretrained weights load as they are.

The options (`MODERN`: each default is GPT-2's) are those of modded-nanogpt and nanochat: rotary position
embeddings, RMSNorm, QK-norm, a ReLU^2 MLP, an untied head, a logit softcap and zero-initialised projections.
Their ops (rope, rms_norm, bias_relu2) go through the registry too; the optimizer for them is nanogpt.muon.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from nanogpt_kernels import registry
from nanogpt import generate as engine
from nanogpt import muon
from nanogpt.mfu import peak_flops

# the weights OpenAI's (and Hugging Face's) GPT-2 keeps in Conv1D layers: our Linear weights transposed
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linears and LayerNorms, like GPT-2; False is a bit better and faster
    gelu: str = "none"  # "none" (exact erf) or "tanh"; GPT-2's weights were trained with "tanh"
    kernels: str = "auto"  # backend selector, see nanogpt_kernels.registry
    # the modern options; defaults are GPT-2's, so older checkpoints' model args (which lack them) load as they were
    pos_emb: str = "learned"  # "learned" (GPT-2's wpe table) or "rope" (rotary, in every attention layer)
    rope_theta: float = 10000.0  # RoPE's base
    norm: str = "layernorm"  # "layernorm" or "rmsnorm" (with a gain, no bias)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys (over the head dimension)
    mlp: str = "gelu"  # "gelu" or "relu2" (ReLU squared)
    tie_embeddings: bool = True  # the token embedding is lm_head's weight
    logit_softcap: float = 0.0  # > 0: logits become softcap * tanh(logits / softcap); 0: off
    zero_init_proj: bool = False  # the residual projections (attn and MLP c_proj) start at zero


MODERN = {"pos_emb": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "relu2", "tie_embeddings": False,
          "logit_softcap": 15.0, "zero_init_proj": True}  # every option on (the modern configs take these)
CHOICES = {"pos_emb": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "relu2"),
           "gelu": ("none", "tanh")}


def non_gpt2(model_args):
    """The modern options model_args sets away from GPT-2's, as ["key=value", ...] (what GPT-2 formats lack)."""
    default = GPTConfig()
    return [f"{k}={model_args[k]!r}" for k in MODERN if k in model_args and model_args[k] != getattr(default, k)]


class Op(nn.Module):
    """A registry op without weights (e.g. rope) as a module, so that GPT.set_backends sets its backend."""

    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, *args):
        return self.fn(*args)


def norm_out_dtype(x):
    """The dtype a norm's output is wanted in: under autocast, autocast's. Every norm of the GPT feeds a matmul
    (c_attn, c_fc, lm_head) that casts its input to that dtype, or (QK-norm) already gets it: the norm op writes
    it itself, the same values without the cast and its backward."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""
    op = "layer_norm"  # the registry op whose backend GPT.set_backends puts in self.fn

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x, add=None):
        """add: (x + add, the norm of that), the residual add in the norm's kernel where the backend fuses it."""
        kw = {} if add is None else {"add": add}
        return self.fn(x, self.weight, self.bias, 1e-5, out_dtype=norm_out_dtype(x), **kw)


class RMSNorm(nn.Module):
    op = "rms_norm"

    def __init__(self, ndim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x, add=None):
        if add is not None:  # as LayerNorm's (no fused kernel: PyTorch adds)
            return registry.add_then(self, x, add)
        return self.fn(x, self.weight, out_dtype=norm_out_dtype(x))


def make_norm(config, ndim=None):
    return RMSNorm(ndim or config.n_embd) if config.norm == "rmsnorm" else LayerNorm(ndim or config.n_embd, config.bias)


class Rotary(nn.Module):
    """RoPE's cos and sin (block_size, head_dim / 2), float32, for the positions a forward covers."""

    def __init__(self, head_dim, block_size, theta):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)
        # not in the state dict: a function of the config
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, start, t):
        return self.cos[start:start + t], self.sin[start:start + t]


class CausalSelfAttention(nn.Module):
    op = "attention"

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        head_dim = config.n_embd // config.n_head
        self.q_norm, self.k_norm = (RMSNorm(head_dim), RMSNorm(head_dim)) if config.qk_norm else (None, None)
        self.rope = Op("rope") if config.pos_emb == "rope" else None

    def forward(self, x, kv=None, rotary=None):
        """rotary: RoPE's (cos, sin) for these tokens' positions (pos_emb=rope)."""
        qkv = self.c_attn(x)  # (B, T, 3 * n_embd): query, key, values for all heads in batch
        dropout_p = self.dropout if self.training else 0.0
        if kv is None and self.rope is None and self.q_norm is None:  # the heads straight from qkv, on the backend
            return self.resid_dropout(self.c_proj(registry.attention_qkv(self.fn, qkv, self.n_head, dropout_p)))
        q, k, v = registry.split_heads(qkv, self.n_head)  # (B, nh, T, hs): head moved forward to be a batch dim
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            q, k = self.rope(q, k, *rotary)
        causal, mask = True, None
        if kv is not None:  # generation (nanogpt.generate.LayerKV): attend over every cached token
            k, v, causal, mask = kv.append(k, v)
        if causal:  # causal self-attention over this call's tokens, on the backend's kernel
            y = self.fn(q, k, v, causal=True, dropout_p=dropout_p)
        else:  # queries at the end of the cache, maybe a padding mask: the backends take neither, SDPA does
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.resid_dropout(self.c_proj(registry.merge_heads(y)))  # all head outputs side by side


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.op = "bias_relu2" if config.mlp == "relu2" else "bias_gelu"
        self.args = () if config.mlp == "relu2" else (config.gelu,)  # the op's arguments after x and bias

    def forward(self, x):
        if self.fn is registry.bias_gelu:  # plain PyTorch: let addmm take the bias
            h = F.gelu(self.c_fc(x), approximate=self.args[0])
        elif self.fn is registry.bias_relu2:
            h = F.relu(self.c_fc(x)).square()
        else:
            h = self.fn(F.linear(x, self.c_fc.weight), self.c_fc.bias, *self.args)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, kv=None, rotary=None):
        x, h = self.ln_2(x, add=self.attn(self.ln_1(x), kv, rotary))  # x = x + attn(...); h = ln_2(x)
        return x + self.mlp(h)


class GPT(nn.Module):
    op = "linear_cross_entropy"  # the training loss; its fn is None when the selector says linear_cross_entropy:none

    def __init__(self, config, device_type=None):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        for key, allowed in CHOICES.items():
            if getattr(config, key) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {getattr(config, key)!r}")
        if config.logit_softcap < 0:
            raise ValueError(f"logit_softcap must be > 0 (or 0: off), got {config.logit_softcap}")
        if config.pos_emb == "rope" and (config.n_embd // config.n_head) % 2:
            raise ValueError(f"pos_emb=rope needs an even head dimension, got n_embd/n_head = "
                             f"{config.n_embd // config.n_head}")
        self.config = config
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        learned = config.pos_emb == "learned"
        self.transformer = nn.ModuleDict(dict(  # in GPT-2's order: the parameters' order is the optimizer state's
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            **({"wpe": nn.Embedding(config.block_size, config.n_embd)} if learned else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        if not learned:
            self.rotary = Rotary(config.n_embd // config.n_head, config.block_size, config.rope_theta)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2 paper: residual projections scaled by 1/sqrt(2 * n_layer); zero_init_proj: zero (modded-nanogpt)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.0 if config.zero_init_proj else
                                      0.02 / math.sqrt(2 * config.n_layer))
        self.set_backends(registry.resolve(config.kernels, device_type))

    def ops(self):
        """The registry ops this model runs, in the registry's order: its layers' and the optimizer's (AdamW, for
        every parameter or, with Muon, those Muon does not take)."""
        used = {m.op for m in self.modules() if hasattr(m, "op")} | {"adamw"}
        return [op for op in registry.OPS if op in used]

    def set_backends(self, backends):
        """Run each op on the backend {op: name} names (e.g. the measured choice; ops the model does not run are
        left out); the weights stay as they are."""
        self.backends = {op: backends[op] for op in self.ops()}
        for m in self.modules():
            if hasattr(m, "op"):
                m.fn = registry.get(m.op, self.backends[m.op])

    def get_num_params(self, non_embedding=True):
        """Parameter count; embedding lookups excluded by default: position embeddings, and token ones unless they
        are tied to lm_head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None, all_logits=False):
        """cache: a nanogpt.generate.KVCache that idx's tokens are appended to (generation). Without targets the
        logits are the last position's, or every position's with all_logits (scoring, as in evaluation)."""
        b, t = idx.size()
        if t > self.config.block_size:
            raise ValueError(f"sequence of length {t} exceeds block_size {self.config.block_size}; "
                             "crop the input or raise block_size")
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device) if cache is None else cache.begin(t)
        x, rotary = self.transformer.wte(idx), None
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(pos)
        else:  # RoPE by cache slot, the same for every row: scores depend on relative positions only, so a
            # left-padded row scores as it would alone
            rotary = self.rotary(0 if cache is None else cache.start, t)
        x = self.transformer.drop(x)
        for block, kv in zip(self.transformer.h, [None] * len(self.transformer.h) if cache is None else cache.layers):
            x = block(x, kv, rotary)
        x = self.transformer.ln_f(x)
        softcap = self.config.logit_softcap or None
        if targets is not None and self.fn is not None:  # fused: the (b, t, vocab) logits are never built
            w = self.lm_head.weight
            if torch.is_autocast_enabled(x.device.type):  # as autocast would have run lm_head
                x, w = (a.to(torch.get_autocast_dtype(x.device.type)) for a in (x, w))
            # targets by keyword: the measured auto keeps keyword arguments as they are (no float copies)
            kw = {} if softcap is None else {"softcap": softcap}  # (GPT-2's call unchanged: its autotune cache holds)
            return None, self.fn(x.reshape(-1, x.size(-1)), w, targets=targets.reshape(-1), ignore_index=-1, **kw)
        logits = self.lm_head(x if targets is not None or all_logits else x[:, [-1], :])  # inference: the last only
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def crop_block_size(self, block_size):
        """Shrink the context (e.g. load GPT-2's 1024 then train at 256)."""
        if block_size > self.config.block_size:
            raise ValueError(f"block_size {block_size} is larger than the model's {self.config.block_size}")
        self.config.block_size = block_size
        if "wpe" in self.transformer:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, name_or_path, override_args=None):
        """GPT-2 weights from Hugging Face: 'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl' or a local directory."""
        from transformers import GPT2LMHeadModel

        override_args = dict(override_args or {})
        allowed = {"dropout", "kernels", "block_size"}
        if set(override_args) - allowed:
            raise ValueError(f"from_pretrained can override only {sorted(allowed)}, got {sorted(override_args)}")
        # a concrete class runs no code from the repository (no trust_remote_code); transformers reads
        # model.safetensors when there is one, and a pytorch_model.bin weights-only
        hf = GPT2LMHeadModel.from_pretrained(name_or_path)
        c = hf.config
        act = getattr(c, "activation_function", "gelu_new")
        config = GPTConfig(
            n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, block_size=c.n_positions,
            vocab_size=c.vocab_size, bias=True, dropout=override_args.get("dropout", 0.0),
            gelu="none" if act == "gelu" else "tanh", kernels=override_args.get("kernels", "auto"),
        )
        if getattr(c, "layer_norm_epsilon", 1e-5) != 1e-5:
            raise ValueError(f"{name_or_path}: layer_norm_epsilon {c.layer_norm_epsilon} is not 1e-5")
        model = cls(config)
        sd = model.state_dict()
        sd_hf = {k: v for k, v in hf.state_dict().items()
                 if not k.endswith((".attn.masked_bias", ".attn.bias"))}
        missing = [k for k in sd if k not in sd_hf]
        if missing:
            raise ValueError(f"{name_or_path}: keys missing from the pretrained model: {missing[:5]}")
        with torch.no_grad():
            for k in sd:
                src = sd_hf[k].t() if k.endswith(CONV1D) else sd_hf[k]
                if src.shape != sd[k].shape:
                    raise ValueError(f"{name_or_path}: {k} has shape {tuple(src.shape)}, expected {tuple(sd[k].shape)}")
                sd[k].copy_(src)
        if "block_size" in override_args:
            model.crop_block_size(override_args["block_size"])
        return model

    def optimizer_groups(self, weight_decay, optimizer="adamw"):
        """AdamW's parameter groups: weight decay on 2-D tensors (matmuls, embeddings) only. With optimizer=muon,
        of the parameters Muon does not take (nanogpt.muon.split_params)."""
        params = muon.split_params(self)[1] if optimizer == "muon" else [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type=None, eps=1e-8, grad_clip=0.0,
                             optimizer="adamw", muon_lr=0.02, muon_momentum=0.95):
        """AdamW from the model's adamw backend (device_type: unused, kept for nanoGPT's signature); optimizer=muon:
        Muon at muon_lr on the hidden matrices (no weight decay, as nanochat), that AdamW on the rest."""
        adamw = registry.get("adamw", self.backends["adamw"])
        kw = dict(lr=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay)
        groups = self.optimizer_groups(weight_decay, optimizer)
        if optimizer == "adamw":
            return adamw(groups, max_grad_norm=grad_clip, **kw)
        if optimizer != "muon":
            raise ValueError(f"optimizer must be adamw or muon, got {optimizer!r}")
        return muon.muon_class(adamw)(muon.split_params(self)[0], groups, muon_lr, muon_momentum=muon_momentum,
                                      max_grad_norm=grad_clip, **kw)

    def flops_per_token(self):
        """Forward+backward FLOPs per token (PaLM appendix B): 6N + 12 L H Q T."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * self.get_num_params() + 12 * L * H * Q * T

    def estimate_mfu(self, fwdbwd_per_iter, dt, dtype="bfloat16"):
        """Model FLOPs utilization: achieved FLOP/s over the current GPU's peak for `dtype`."""
        flops_per_iter = self.flops_per_token() * self.config.block_size * fwdbwd_per_iter
        return flops_per_iter / dt / peak_flops(dtype)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token=None, use_cache=True):
        """Sample max_new_tokens tokens after the (b, t) prompt idx, or after each prompt of a list of token-id
        lists (any lengths, batched); see nanogpt.generate.generate. use_cache=False recomputes the whole context
        for every token, as nanoGPT does."""
        return engine.generate(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               eos_token=eos_token, use_cache=use_cache)
