"""The contract every backend meets, and what the backends share.

Each op has one signature, whatever backend implements it: its torch reference's, beside `REGISTRY` in
registry.py (`tests/test_registry.py` checks every backend against it). Layer ops are functions; an optimizer
op is a `torch.optim.Optimizer` class taking (params, lr, betas, eps, weight_decay, max_grad_norm=0.0).

Every optimizer's `step()` returns the total gradient norm (0-d tensor) taken before clipping, clips to
`max_grad_norm` when it is > 0, and leaves parameters and state untouched when that norm is not finite, so
the trainer can count a skipped step.

A kernel is correct when its error against a float64 reference is at most twice the error of PyTorch's own
op in the same dtype, plus one unit roundoff at the output's scale (`budget`). The kernel tests and the
measured `auto` (nanogpt_kernels.autotune) use this one rule.
"""
import math
import warnings

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- error budgets

# absolute floors per dtype, added to the "2x PyTorch's own error" budget
ABS_FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def max_err(out, ref64):
    """max |out - ref| in float64; NaN (e.g. an unwritten poisoned element) propagates."""
    d = (out.detach().double().cpu() - ref64.detach().double().cpu()).abs()  # either may be on the GPU
    if torch.isnan(d).any():
        return float("nan")
    return d.max().item() if d.numel() else 0.0


def budget(torch_out, ref64, dtype, scale_hint=0.0):
    """2x PyTorch's same-dtype error vs float64, plus a floor of one unit roundoff at the output's scale.

    scale_hint: magnitude of intermediate terms that cancel in the result (e.g. dp - delta in attention's
    backward), for outputs whose exact value can be ~0 while their rounding error cannot.
    """
    eps = torch.finfo(dtype).eps
    scale = max(ref64.detach().abs().max().item() if ref64.numel() else 0.0, scale_hint)
    return 2.0 * max_err(torch_out, ref64) + max(ABS_FLOOR[dtype], eps * scale)


def attention_grad_hints(q, k, v, dout, scale=None):
    """Scale hints for attention's dq and dk: sums of p * (dp - delta) terms that cancel, so their rounding
    error scales with |dp| (and sqrt(D) terms per dot), not with the (possibly ~0, e.g. T=1) exact result."""
    sm = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
    dp = (dout.double() @ v.detach().double().transpose(-1, -2)).abs().max().item()
    root_d = math.sqrt(q.shape[-1])
    return (root_d * dp * k.detach().abs().max().item() * sm, root_d * dp * q.detach().abs().max().item() * sm)


def within_budget(out, torch_out, ref64, dtype, scale_hint=0.0):
    """(ok, our error, budget): `out` is as close to float64 as the budget allows (NaN never is)."""
    err, tol = max_err(out, ref64), budget(torch_out, ref64, dtype, scale_hint)
    return err == err and err <= tol, err, tol


# ---------------------------------------------------------------- shared by the backends

_announced = set()


def _is_compiling():
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


def sdpa_fallback(q, k, v, causal, scale, dropout_p, why):
    """torch SDPA for a call a backend's kernels do not cover, announced once per `why`. The warning
    comes from the first eager call: inside torch.compile it would break a fullgraph graph."""
    if why not in _announced and not _is_compiling():
        _announced.add(why)
        warnings.warn(f"{why}; falling back to torch scaled_dot_product_attention", stacklevel=3)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)


class FusedAdamWBase(torch.optim.Optimizer):
    """What the fused AdamW backends share: hyperparameter checks, and state kept as torch.optim.AdamW
    names it (exp_avg, exp_avg_sq, a 0-d `step` tensor on the param's device) but always float32."""

    def __init__(self, params, lr, betas, eps, weight_decay, max_grad_norm):
        if lr < 0 or eps < 0 or not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"{type(self).__name__}: invalid lr={lr}, betas={betas} or eps={eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.max_grad_norm = float(max_grad_norm or 0.0)

    def _init_state(self, p):
        st = self.state[p]
        if "exp_avg" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        return st

    def load_state_dict(self, state_dict):
        # Optimizer.load_state_dict casts floating state to each param's dtype: put it back to float32
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        current = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, current):
            saved = state_dict["state"].get(i)
            if not saved:
                continue
            st = self.state[p]
            for key in ("exp_avg", "exp_avg_sq"):
                if key in saved:
                    st[key] = saved[key].to(device=p.device, dtype=torch.float32, copy=True).contiguous()
            if "step" in saved:
                st["step"] = torch.as_tensor(saved["step"]).to(device=p.device, dtype=torch.float32).reshape(()).clone()
