"""VPPO (arXiv 2510.09285): spend the update on visually dependent tokens and trajectories.

Follows the official code (huaixuheqing/VPPO-RL ``dp_actor.py``; research/algorithms.md §3):

* token visual dependency is the sampled-token k3 estimate on old log-probs (the paper writes a
  full-vocabulary KL): ``δ = clamp(a - o, -20, 20)``, ``S = clamp(exp(δ) - δ - 1, 0, 10)``;
* Token-level Gradient Filtering keeps the ``ceil(k·|o_i|)`` highest-S tokens of each response as a
  loss token mask — the policy loss still divides by ALL valid tokens (``grpo.policy_loss(...,
  token_mask=m)``), so the effective step shrinks by about k, as in the code;
* Trajectory-level Advantage Shaping scales Â_i by α_i with a *dynamic* upper bound that makes the
  batch mean of α exactly 1 (the paper states a fixed ``[β_min, β_max]``);
* an entropy *penalty* ``coef·mean(-log π)`` (sampled-token estimate) is added to the loss.
"""

from __future__ import annotations

import torch

_RANGE_EPS = 1e-6
_MU_EPS = 1e-8


def _float(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16 to float32; keep float32/float64 as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def token_dependency(old_logp: torch.Tensor, corrupted_logp: torch.Tensor) -> torch.Tensor:
    """Per-token visual dependency ``S = clamp(exp(δ) - δ - 1, 0, 10)``, ``δ = clamp(a - o, -20, 20)``.

    ``o`` = log π_old(y_t | I), ``a`` = log π_old(y_t | I') with the corrupted image: a k3 estimate of
    KL(π(·|I) ‖ π(·|I')). No mask is applied; :func:`top_k_mask` and :func:`trajectory_scale` take one.
    Returns ``S[N, T]``.
    """
    delta = (_float(corrupted_logp) - _float(old_logp)).clamp(-20.0, 20.0)  # [N, T]
    return (torch.exp(delta) - delta - 1.0).clamp(0.0, 10.0)  # [N, T]


def top_k_mask(S: torch.Tensor, mask: torch.Tensor, k: float = 0.4) -> torch.Tensor:
    """1 on the ``k_i = ceil(k·|o_i|)`` largest-S valid tokens of each response, else 0.

    ``k·|o_i|`` is computed in float32 as in the official code. Padding is treated as -inf so it is
    never picked. Ties are resolved by a stable descending sort: among equal scores the earlier token
    wins (the official code uses an unstable sort, so its choice among ties is arbitrary).
    Returns ``m[N, T]`` in S's float dtype.
    """
    if not 0.0 < k <= 1.0:
        raise ValueError(f"top-k fraction k must be in (0, 1]; got {k}")
    valid = mask.bool()  # [N, T]
    n_valid = valid.sum(dim=1)  # [N]
    k_i = torch.ceil(n_valid.to(torch.float32) * k).long()  # [N]
    scores = torch.where(valid, _float(S), torch.full_like(_float(S), float("-inf")))  # [N, T]
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # [N, T]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(S.shape[1], device=S.device).expand_as(order))  # [N, T]
    keep = valid & (rank < k_i.unsqueeze(1))  # [N, T]
    return keep.to(_float(S).dtype)


def trajectory_scale(S: torch.Tensor, mask: torch.Tensor, beta_min: float = 0.9) -> torch.Tensor:
    """Per-response advantage scale α_i from the mean dependency S̄_i (TAS with dynamic β_max).

    ``S̄_i = Σ_t S·mask / max(|o_i|, 1)``; ``n_i = clamp((S̄_i - mn)/(mx - mn), 0, 1)``;
    ``β_max = β_min + (1 - β_min)/(mean(n) + 1e-8)``; ``α_i = β_min + n_i·(β_max - β_min)``, so the
    mean of α over the responses is 1 (up to ~1e-6). If ``mx - mn ≤ 1e-6`` all α are 1.

    Responses with no valid tokens keep α = 1 and are left out of mn, mx and the mean, as in the code.
    The official code takes mn/mx per device mini-batch and mean(n) per micro-batch (so its result
    depends on the batch split); here both are taken over the rollout batch passed in.
    Returns ``alpha[N]``.
    """
    if not 0.0 <= beta_min <= 1.0:
        raise ValueError(f"beta_min must be in [0, 1]; got {beta_min}")
    S = _float(S)
    valid = mask.bool()  # [N, T]
    n_tok = valid.sum(dim=1)  # [N]
    s_bar = torch.where(valid, S, torch.zeros_like(S)).sum(dim=1) / n_tok.clamp(min=1)  # [N]
    alpha = torch.ones_like(s_bar)  # [N]
    has = n_tok > 0  # [N]
    if int(has.sum()) < 2:
        return alpha
    vals = s_bar[has]  # [n]
    mn, mx = vals.min(), vals.max()
    if float(mx - mn) <= _RANGE_EPS:
        return alpha
    norm = ((vals - mn) / (mx - mn)).clamp(0.0, 1.0)  # [n]
    beta_max = beta_min + (1.0 - beta_min) / (norm.mean() + _MU_EPS)
    alpha[has] = beta_min + norm * (beta_max - beta_min)
    return alpha


def entropy_penalty(logp: torch.Tensor, mask: torch.Tensor, coef: float = 0.06,
                    denominator: float | torch.Tensor | None = None) -> torch.Tensor:
    """``coef · Σ(-l)·mask / denominator`` (default denominator: this call's valid-token count).

    Minimising it lowers the sampled-token entropy estimate; VPPO uses 0.06 for 7B models. Pass the
    mini-batch token count as ``denominator`` for a global token mean over micro-batches.
    """
    valid = mask.bool()
    neg = torch.where(valid, -_float(logp), torch.zeros_like(_float(logp)))  # [N, T]
    denom = valid.sum().clamp(min=1) if denominator is None else denominator
    return coef * neg.sum() / denom
