"""GRPO and its variants (DAPO, Dr. GRPO): group advantages, the clipped policy loss, the k3 KL.

Formulas follow EasyR1's `core_algos.py` (research/algorithms.md §1.1), which PAPO, VPPO and VGPO all
build on; the variants differ only in knobs (§1.2):

| variant  | advantage scale | loss aggregation | clip (low, high) |
|----------|-----------------|------------------|------------------|
| GRPO     | "group"         | "seq"            | 0.2, 0.2         |
| DAPO     | "group"         | "token"          | 0.2, 0.28 + dynamic sampling |
| Dr. GRPO | "none"          | "dr_grpo"        | 0.2, 0.2         |

Shapes: `N` responses, `T` padded response length, `mask[N, T]` valid tokens, groups of `group_size`
consecutive rows.
"""
from __future__ import annotations

import math

import torch

_SCALES = ("group", "batch", "none")
_AGGS = ("token", "seq", "dr_grpo")


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Rewards as `[B, G]`, after checking that the batch splits into whole groups of at least 2."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N]; got shape {tuple(rewards.shape)}")
    n = rewards.shape[0]
    if group_size < 2 or n % group_size != 0:
        raise ValueError(f"N={n} rewards must split into groups of group_size={group_size} "
                         "(group_size >= 2 and N divisible by group_size)")
    return rewards.float().view(n // group_size, group_size)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """Sequence advantages `adv[N]` from each response's reward relative to its group.

    "group": (r - mean_g) / (std_g + eps)   GRPO / EasyR1 (std unbiased, as torch.std)
    "batch": (r - mean_g) / (std_all + eps) TRL's scale_rewards="batch" (one unbiased std over all N)
    "none":  r - mean_g                     Dr. GRPO (no std division, which up-weights easy/hard groups)
    A group with equal rewards gets 0 advantage (0 / eps), never NaN.
    """
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}; got {scale!r}")
    r = _groups(rewards, group_size)  # [B, G]
    centred = r - r.mean(dim=1, keepdim=True)  # [B, G]
    if scale == "group":
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (r.std() + eps)
    return centred.reshape(-1)  # [N]


def dynamic_sampling_keep(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """DAPO dynamic sampling: `keep[B]` is False for groups whose rewards are all equal (max - min <= eps);
    such groups have zero advantage and carry no policy-gradient signal."""
    r = _groups(rewards, group_size)  # [B, G]
    return (r.max(dim=1).values - r.min(dim=1).values) > eps


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` weighted by `mask` (over everything, or along `dim`); 0 where the mask is empty.
    Values under a zero mask are ignored even if they are inf/NaN (padding can hold anything)."""
    x = x if x.is_floating_point() else x.float()
    m = mask.to(x.dtype)
    xm = x * m
    xm = torch.where(m != 0, xm, torch.zeros_like(xm))
    if dim is None:
        return xm.sum() / m.sum().clamp(min=1e-8)
    return xm.sum(dim=dim) / m.sum(dim=dim).clamp(min=1e-8)


def aggregate(values: torch.Tensor, mask: torch.Tensor, agg: str, max_len: int | None = None,
              denominator: float | None = None) -> torch.Tensor:
    """Reduce per-token `values[N, T]` to a scalar loss, as the policy loss does (shared by extra terms).

    "token":   Σ values·mask / Σ mask                     DAPO global token mean
    "seq":     mean over sequences of Σ_t values·mask / Σ_t mask   GRPO paper (empty sequences count as 0)
    "dr_grpo": Σ values·mask / (N · max_len)             Dr. GRPO, max_len defaults to T

    `denominator`, when given, replaces the divisor: for "token" and "dr_grpo" the masked sum is divided
    by it, for "seq" the sum of per-sequence means is. The trainer passes the whole mini-batch's token
    count ("token"), `rows · max_len` ("dr_grpo") so micro-batch losses of gradient accumulation add up
    to one global mean instead of a mean of means.
    """
    if agg not in _AGGS:
        raise ValueError(f"agg must be one of {_AGGS}; got {agg!r}")
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(f"values and mask must both be [N, T]; got {tuple(values.shape)} and {tuple(mask.shape)}")
    m = mask.to(values.dtype)
    masked = torch.where(m != 0, values * m, torch.zeros_like(values))  # [N, T]
    if agg == "seq":
        per_seq = masked.sum(dim=1) / m.sum(dim=1).clamp(min=1)  # [N]
        return per_seq.sum() / (per_seq.shape[0] if denominator is None else denominator)
    if denominator is not None:
        return masked.sum() / denominator
    if agg == "token":
        return masked.sum() / m.sum().clamp(min=1)
    return masked.sum() / (values.shape[0] * (values.shape[1] if max_len is None else max_len))


def log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, level: str = "token") -> torch.Tensor:
    """log(π/π_old), clamped to ±20: per token `[N, T]`, or with level "sequence" (GSPO) each response's
    mean over its valid tokens, `[N, 1]` (so the ratio is exp of the mean, one per response)."""
    logr = logp - old_logp.to(logp.dtype)
    if level == "sequence":
        valid = mask.to(logp.dtype)
        logr = ((logr * valid).sum(dim=1, keepdim=True) / valid.sum(dim=1, keepdim=True).clamp(min=1.0))
    elif level != "token":
        raise ValueError(f"importance sampling level must be token or sequence; got {level!r}")
    return logr.clamp(-20.0, 20.0)


def cispo_per_token(logp: torch.Tensor, logr: torch.Tensor, adv: torch.Tensor, cap: float) -> torch.Tensor:
    """CISPO's per-token loss -sg(min(ρ, cap))·Â·log π (MiniMax-M1): the importance weight is truncated and
    detached, and the gradient flows through log π on every token, clipped or not."""
    return -torch.exp(logr).clamp(max=cap).detach() * adv * logp


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                clip_low: float = 0.2, clip_high: float = 0.28, dual_clip: float | None = None, agg: str = "token",
                max_len: int | None = None, token_mask: torch.Tensor | None = None,
                denominator: float | None = None, level: str = "token", loss: str = "clip",
                cispo_max: float = 5.0) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate with optional dual clip, EasyR1 style; returns `(loss, metrics)`.

    logr = clamp(logp - old_logp, ±20); ρ = exp(logr); ρ_clip = exp(clamp(logr, log(1-clip_low), log(1+clip_high)))
    L = max(-Â·ρ, -Â·ρ_clip); where Â < 0 and dual_clip = c: L = min(L, -Â·c)
    `adv` is `[N]` (one per sequence) or `[N, T]` (per token, e.g. SRPO/VGPO weights). `token_mask`
    (VPPO) zeroes L on unselected tokens while the denominator stays all valid tokens of `mask`.
    See `aggregate` for `agg`, `max_len` and `denominator`. `level` "sequence" (GSPO) uses one ratio per
    response (`log_ratio`); `loss` "cispo" replaces the surrogate with `cispo_per_token` (capped at
    `cispo_max`; clip/frac_high then counts tokens whose weight the cap truncated, Â > 0, as TRL does).

    metrics (python floats over valid tokens): clip/frac_low (ρ < 1-clip_low and the clip bites, Â < 0),
    clip/frac_high (ρ > 1+clip_high, Â > 0), clip/frac (either), ratio/mean, loss/pg (detached), and
    dual_clip/frac (Â < 0 and max(-Â·ρ, -Â·ρ_clip) > -Â·c, i.e. the dual clip bites) when dual_clip is set.
    """
    if logp.shape != old_logp.shape or logp.shape != mask.shape or logp.dim() != 2:
        raise ValueError(f"logp, old_logp and mask must all be [N, T]; got {tuple(logp.shape)}, "
                         f"{tuple(old_logp.shape)}, {tuple(mask.shape)}")
    if adv.dim() == 1 and adv.shape[0] == logp.shape[0]:
        adv = adv.unsqueeze(1)  # [N, 1]
    elif adv.shape != logp.shape:
        raise ValueError(f"adv must be [N] or [N, T] = {tuple(logp.shape)}; got {tuple(adv.shape)}")
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0; got {clip_low}, {clip_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (EasyR1 uses 3.0); got {dual_clip}")
    if loss not in ("clip", "cispo"):
        raise ValueError(f"policy loss must be clip or cispo; got {loss!r}")
    if loss == "cispo" and dual_clip is not None:
        raise ValueError("dual_clip bounds the clipped surrogate; CISPO has none (its weight is capped by cispo_max)")
    adv = adv.to(logp.dtype)
    logr = log_ratio(logp, old_logp, mask, level).expand_as(logp)  # [N, T] (one value per row for GSPO)
    ratio = torch.exp(logr)  # [N, T]
    ratio_clip = torch.exp(logr.clamp(math.log(1.0 - clip_low), math.log(1.0 + clip_high)))  # [N, T]
    loss_unclipped = -adv * ratio  # [N, T]
    loss_clipped = -adv * ratio_clip  # [N, T]
    per_token = torch.maximum(loss_unclipped, loss_clipped)  # [N, T]
    clipped = loss_clipped > loss_unclipped  # [N, T] the clip is what sets L
    if loss == "cispo":
        per_token = cispo_per_token(logp, logr, adv, cispo_max)
        clipped = (ratio > cispo_max) & (adv > 0)
    dual_bites = None
    if dual_clip is not None:
        cap = -adv * dual_clip
        dual_bites = (adv < 0) & (per_token > cap)  # [N, T]
        per_token = torch.where(adv < 0, torch.minimum(per_token, cap), per_token)
    if token_mask is not None:
        per_token = per_token * token_mask.to(per_token.dtype)
    loss = aggregate(per_token, mask, agg, max_len=max_len, denominator=denominator)

    with torch.no_grad():
        valid = mask.to(logp.dtype)
        low = clipped & (logr < math.log(1.0 - clip_low))
        high = clipped & (logr > math.log(1.0 + clip_high))
        metrics = {
            "clip/frac_low": float(masked_mean(low.to(logp.dtype), valid)),
            "clip/frac_high": float(masked_mean(high.to(logp.dtype), valid)),
            "clip/frac": float(masked_mean(clipped.to(logp.dtype), valid)),
            "ratio/mean": float(masked_mean(ratio, valid)),
            "loss/pg": float(loss.detach()),
        }
        if dual_bites is not None:
            metrics["dual_clip/frac"] = float(masked_mean(dual_bites.to(logp.dtype), valid))
    return loss, metrics


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(π_θ ‖ π_ref) per token, clamped as EasyR1's low_var_kl:
    kl = clamp(ref - logp, ±20); k3 = clamp(exp(kl) - kl - 1, ±10). Returns `[N, T]`."""
    kl = (ref_logp.to(logp.dtype) - logp).clamp(-20.0, 20.0)
    return (torch.exp(kl) - kl - 1.0).clamp(-10.0, 10.0)


def overlong_penalty(lengths: torch.Tensor, truncated: torch.Tensor, max_len: int, buffer_frac: float,
                     penalty: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (DAPO §3.4, verl's `compute_score` with `overlong_buffer`) `[N]`.

    With `L_b = buffer_frac · max_len`: 0 while `L ≤ max_len − L_b`; then `−penalty · (L − (max_len − L_b)) / L_b`,
    a linear ramp to `−penalty` at the cap; a truncated response (no EOS) gets the full `−penalty`.
    `lengths` counts each response's tokens (EOS included). With `buffer_frac = 0` only truncation is punished.
    """
    lengths = lengths.float()
    buffer = buffer_frac * max_len
    start = max_len - buffer
    ramp = -penalty * (lengths - start).clamp(min=0) / buffer if buffer > 0 else torch.zeros_like(lengths)
    return torch.where(truncated.bool(), torch.full_like(lengths, -penalty), ramp.clamp(min=-penalty))
