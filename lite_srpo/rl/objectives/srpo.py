"""SRPO: role-aware token weights that rescale the GRPO advantage without changing its sign.

The SRPO paper (arXiv 2605.07274) is public only as an abstract and no code was found, so this is
lite-srpo's concrete formulation (DESIGN.md §4, research/algorithms.md §5.2), faithful to every
statement of the abstract:

* perception tokens (role 1) are scored by their visual dependency, ``d = clamp(o - c, 0, κ)``,
  where ``o``/``c`` are the old policy's log-probs with the original / corrupted image;
* reasoning tokens (role 2) are scored by their consistency with the generated perception,
  ``e = clamp(o - n, 0, κ)``, ``n`` being the log-prob with the perception content removed
  (or the cheaper ``consistency: corrupted`` variant, see :func:`reasoning_scores_from_corrupted`);
* both scores are standardised per role over the rollout batch, centred on ONE shared baseline per
  trajectory and squashed into positive weights ``w = 1 + λ·tanh((u - b_i)/τ)``;
* the token advantage is ``w · Â_i``: the reward and the sign of every token's advantage are GRPO's.

Every constant is an argument so the formulation can follow the paper once its details are known.
All functions are pure tensor maths; scores are meant to be computed from no-grad passes.
"""

from __future__ import annotations

import torch

OTHER, PERCEPTION, REASONING = 0, 1, 2

_STD_EPS = 1e-6


def _float(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16 (or integer) tensors to float32; keep float32/float64 as they are."""
    dtype = torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32
    return x.to(dtype)


def _role_score(diff: torch.Tensor, roles: torch.Tensor, mask: torch.Tensor, role: int,
                kappa: float) -> torch.Tensor:
    """clamp(diff, 0, κ) on the valid tokens of ``role``, exactly 0 elsewhere (padding may hold junk)."""
    diff = _float(diff)
    keep = mask.bool() & (roles == role)  # [N, T]
    return torch.where(keep, diff.clamp(0.0, kappa), torch.zeros_like(diff))


def perception_scores(old_logp: torch.Tensor, corrupted_logp: torch.Tensor, roles: torch.Tensor,
                      mask: torch.Tensor, kappa: float = 10.0) -> torch.Tensor:
    """Visual dependency of perception tokens, ``d = clamp(o - c, 0, κ)`` (0 on other tokens).

    A perception token the policy can only write while seeing the image (``o`` high, ``c`` low)
    scores high; one it would write anyway scores 0. Returns ``d[N, T]``.
    """
    return _role_score(old_logp - corrupted_logp, roles, mask, PERCEPTION, kappa)  # [N, T]


def reasoning_scores(old_logp: torch.Tensor, removed_logp: torch.Tensor, roles: torch.Tensor,
                     mask: torch.Tensor, kappa: float = 10.0) -> torch.Tensor:
    """Consistency of reasoning tokens with the generated perception, ``e = clamp(o - n, 0, κ)``.

    ``removed_logp`` (``n``) comes from the same policy and image with the perception content removed
    from the response (tags kept), re-aligned to the original token positions; a reasoning token that
    becomes unlikely without the written evidence relied on it. Returns ``e[N, T]`` (0 off role 2).
    """
    return _role_score(old_logp - removed_logp, roles, mask, REASONING, kappa)  # [N, T]


def reasoning_scores_from_corrupted(old_logp: torch.Tensor, corrupted_logp: torch.Tensor,
                                    roles: torch.Tensor, mask: torch.Tensor, kappa: float = 10.0,
                                    margin: float = 0.0) -> torch.Tensor:
    """Cheap ``consistency: corrupted`` variant, ``e = clamp(c - o + m, 0, κ)`` on reasoning tokens.

    Reuses the corrupted-image pass (one forward fewer): a reasoning token that stays likely when the
    image is corrupted but the written perception is still in context is read as grounded in that
    perception. It is not equivalent to :func:`reasoning_scores` and is logged as its own variant
    (research/algorithms.md §5.2).
    """
    return _role_score(corrupted_logp - old_logp + margin, roles, mask, REASONING, kappa)  # [N, T]


def role_weights(perception_score: torch.Tensor, reasoning_score: torch.Tensor, roles: torch.Tensor,
                 mask: torch.Tensor, lam: float = 0.5, tau: float = 1.0,
                 renormalize: bool = True, weighted: tuple[int, ...] = (PERCEPTION, REASONING)) -> torch.Tensor:
    """Positive per-token weights from role scores with one shared baseline per trajectory.

    Per role r ∈ {1, 2}: ``u = (s - μ_r)/(σ_r + 1e-6)`` with μ_r, σ_r the mean and population std of
    that role's score (perception_score for r = 1, reasoning_score for r = 2) over all valid role-r
    tokens of the batch. ``b_i`` = mean of ``u`` over trajectory i's role tokens (both roles together),
    and ``w = 1 + λ·tanh((u - b_i)/τ)`` on role tokens, 1 on other tokens and on padding, so
    ``w ∈ (1 - λ, 1 + λ)``. With ``renormalize`` each trajectory's role-token weights are divided by
    their mean over its role tokens: the mass moves between perception and reasoning tokens only, their
    mean weight is exactly 1, and tags, braces, EOS and padding stay exactly 1. (Dividing by the mean
    over all valid tokens instead would hand the tags the mass that the skewed, tanh-saturated role
    weights lose.) Still positive, no longer bounded by 1 ± λ; a trajectory without role tokens stays
    exactly 1. Returns ``w[N, T]``.
    """
    if not 0.0 < lam < 1.0:
        raise ValueError(f"lam must be in (0, 1) so weights stay positive; got {lam}")
    if not tau > 0.0:
        raise ValueError(f"tau must be > 0; got {tau}")
    out_dtype = torch.promote_types(_float(perception_score).dtype, _float(reasoning_score).dtype)
    # Statistics in float64: with float32 the rounding error of μ (~1e-7·|s|) is not small next to
    # the 1e-6 in σ + 1e-6, and equal scores would get weights visibly different from 1.
    dtype = torch.float64
    valid = mask.bool()  # [N, T]
    if not weighted or set(weighted) - {PERCEPTION, REASONING}:
        raise ValueError(f"weighted must name roles {PERCEPTION} (perception) and/or {REASONING} (reasoning); got {weighted}")
    is_p = valid & (roles == PERCEPTION) & (PERCEPTION in weighted)  # [N, T]
    is_r = valid & (roles == REASONING) & (REASONING in weighted)  # [N, T]
    is_role = is_p | is_r  # [N, T]

    u = torch.zeros(valid.shape, dtype=dtype, device=valid.device)  # [N, T]
    for score, sel in ((perception_score.to(dtype), is_p), (reasoning_score.to(dtype), is_r)):
        if sel.any():
            vals = score[sel]  # [n_r]
            mu, sigma = vals.mean(), vals.std(correction=0)
            u = torch.where(sel, (score - mu) / (sigma + _STD_EPS), u)

    n_role = is_role.sum(dim=1, keepdim=True)  # [N, 1]
    baseline = (u * is_role).sum(dim=1, keepdim=True) / n_role.clamp(min=1)  # [N, 1]
    ones = torch.ones_like(u)
    w = torch.where(is_role, 1.0 + lam * torch.tanh((u - baseline) / tau), ones)  # [N, T]

    if renormalize:
        role_mean = (w * is_role).sum(dim=1, keepdim=True) / n_role.clamp(min=1)  # [N, 1]
        w = torch.where(is_role, w / role_mean, w)  # other tokens and role-free rows stay exactly 1
    return w.to(out_dtype)


def token_advantages(adv: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Token-level advantage ``Â_{i,t} = w_{i,t}·Â_i``; w > 0 keeps every token's sign = Â_i's."""
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)  # [N, 1]
    return w * adv  # [N, T]


def _masked_mean(x: torch.Tensor, sel: torch.Tensor, empty: float) -> float:
    """Mean of ``x`` over ``sel`` as a float, ``empty`` when nothing is selected (keeps logs JSON-safe)."""
    n = int(sel.sum())
    return float(x[sel].float().mean()) if n else empty


def role_metrics(w: torch.Tensor, roles: torch.Tensor, mask: torch.Tensor, d: torch.Tensor,
                 e: torch.Tensor) -> dict[str, float]:
    """Per-step SRPO diagnostics: mean weight and token share per role, score means.

    A role with no tokens in the batch reports weight 1.0 (the neutral weight) and score 0.0, so the
    values stay finite for the JSONL event stream.
    """
    with torch.no_grad():
        valid = mask.bool()
        is_p, is_r = valid & (roles == PERCEPTION), valid & (roles == REASONING)
        is_o = valid & ~(is_p | is_r)
        n_valid = max(int(valid.sum()), 1)
        return {
            "srpo/weight_perception": _masked_mean(w, is_p, 1.0),
            "srpo/weight_reasoning": _masked_mean(w, is_r, 1.0),
            "srpo/weight_other": _masked_mean(w, is_o, 1.0),
            "srpo/weight_min": float(w[valid].min()) if valid.any() else 1.0,
            "srpo/weight_max": float(w[valid].max()) if valid.any() else 1.0,
            "srpo/perception_score_mean": _masked_mean(d, is_p, 0.0),
            "srpo/reasoning_score_mean": _masked_mean(e, is_r, 0.0),
            "srpo/perception_frac": int(is_p.sum()) / n_valid,
            "srpo/reasoning_frac": int(is_r.sum()) / n_valid,
        }
