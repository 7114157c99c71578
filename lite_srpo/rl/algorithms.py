"""Each algorithm as a table row: which extra passes it needs, how it shapes advantages, its extra loss.

The training loop looks the spec up by name (`ALGORITHM_SPECS[cfg.algorithm.name]`); there is no
`if name == ...` ladder in the loop. The math lives in `objectives/`, pure functions on tensors.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import AlgorithmConfig
from .objectives import papo, srpo, vgpo, vppo
from .passes import PassOutputs

log = logging.getLogger(__name__)


@dataclass
class ShapeInputs:
    adv_seq: torch.Tensor  # [N]
    mask: torch.Tensor  # [N, R] float
    roles: torch.Tensor | None  # [N, R] long
    passes: PassOutputs
    group_size: int
    cfg: AlgorithmConfig
    step: int = 0
    total_steps: int = 1


@dataclass
class Shaping:
    """Token advantages plus what the UI shows per token (score, weight)."""

    advantages: torch.Tensor  # [N, R]
    token_mask: torch.Tensor | None = None  # VPPO: tokens that get gradient (denominator unchanged)
    scores: torch.Tensor | None = None  # the algorithm's per-token signal
    weights: torch.Tensor | None = None  # multiplier on the sequence advantage
    metrics: dict[str, float] = field(default_factory=dict)


ExtraLoss = Callable[[torch.Tensor, list[int], ShapeInputs, float], tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class AlgorithmSpec:
    name: str
    shape: Callable[[ShapeInputs], Shaping]
    needs_corrupted: bool = False
    needs_removed: Callable[[AlgorithmConfig], bool] = lambda cfg: False
    needs_focus: bool = False
    needs_roles: bool = False
    extra_loss: ExtraLoss | None = None
    needs_old_scores: bool = False
    """Shapes advantages (or per-token scores) from the old log-probs, so the old pass must run before the
    update. Without it, and with one mini-batch, the update's own log-probs are the old ones (TRL too)."""


def old_pass_needed(spec: AlgorithmSpec, mini_batches: int) -> bool:
    """The separate no-grad old-log-prob pass can only differ from the update's own log-probs when a
    mini-batch's optimizer step lands before a later mini-batch's forward (RL refuses LoRA dropout)."""
    return spec.needs_old_scores or spec.needs_focus or mini_batches > 1


def _broadcast(adv_seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return adv_seq[:, None] * torch.ones_like(mask)


def shape_grpo(x: ShapeInputs) -> Shaping:
    return Shaping(advantages=_broadcast(x.adv_seq, x.mask))


WEIGHTED_ROLES = {"both": (srpo.PERCEPTION, srpo.REASONING), "perception": (srpo.PERCEPTION,),
                  "reasoning": (srpo.REASONING,)}


def shape_srpo(x: ShapeInputs) -> Shaping:
    c = x.cfg.srpo
    old, mask, roles = x.passes.old_logp, x.mask, x.roles
    if x.passes.corrupted_logp is None:
        d = torch.zeros_like(old)
    else:
        d = srpo.perception_scores(old, x.passes.corrupted_logp, roles, mask, kappa=c.kappa)
    if c.consistency == "corrupted":
        e = (torch.zeros_like(old) if x.passes.corrupted_logp is None else
             srpo.reasoning_scores_from_corrupted(old, x.passes.corrupted_logp, roles, mask, kappa=c.kappa, margin=c.margin))
    elif c.consistency == "perception_only":  # image corrupted in both: only the written perception differs
        e = (torch.zeros_like(old) if x.passes.corrupted_logp is None or x.passes.removed_logp is None else
             srpo.reasoning_scores(x.passes.corrupted_logp, x.passes.removed_logp, roles, mask, kappa=c.kappa))
    elif x.passes.removed_logp is None:  # weighted_roles: perception skips the pass; e is not used
        e = torch.zeros_like(old)
    else:
        e = srpo.reasoning_scores(old, x.passes.removed_logp, roles, mask, kappa=c.kappa)
    w = srpo.role_weights(d, e, roles, mask, lam=c.lam, tau=c.tau, renormalize=c.renormalize,
                          weighted=WEIGHTED_ROLES[c.weighted_roles])
    metrics = srpo.role_metrics(w, roles, mask, d, e)
    metrics["srpo/variant"] = {"removed": 1.0, "corrupted": 2.0, "perception_only": 3.0}[c.consistency]
    return Shaping(advantages=srpo.token_advantages(x.adv_seq, w), scores=d + e, weights=w, metrics=metrics)


def shape_papo(x: ShapeInputs) -> Shaping:
    scores = None
    if x.passes.corrupted_logp is not None:
        scores = papo.perception_kl(x.passes.old_logp, x.passes.corrupted_logp, x.mask)
    return Shaping(advantages=_broadcast(x.adv_seq, x.mask), scores=scores)


def papo_extra(logp: torch.Tensor, rows: list[int], x: ShapeInputs, denominator: float):
    c = x.cfg.papo
    if x.passes.corrupted_logp is None:
        return torch.zeros((), device=logp.device), {}
    gamma = papo.gamma_schedule(x.step, x.total_steps, mode=c.schedule, start=c.gamma)
    corrupted = x.passes.corrupted_logp[rows].to(logp.device)
    return papo.papo_loss_terms(logp, corrupted, x.mask[rows].to(logp.device), gamma=gamma, eta_ori=c.eta_ori,
                                eta_aug=c.eta_aug, agg_denominator=denominator)


def shape_vppo(x: ShapeInputs) -> Shaping:
    c = x.cfg.vppo
    if x.passes.corrupted_logp is None:
        return Shaping(advantages=_broadcast(x.adv_seq, x.mask))
    s = vppo.token_dependency(x.passes.old_logp, x.passes.corrupted_logp) * x.mask
    m = vppo.top_k_mask(s, x.mask, k=c.k)
    alpha = vppo.trajectory_scale(s, x.mask, beta_min=c.beta_min)
    metrics = {"vppo/alpha_min": float(alpha.min()), "vppo/alpha_max": float(alpha.max()),
               "vppo/kept_frac": float((m * x.mask).sum() / x.mask.sum().clamp(min=1))}
    return Shaping(advantages=_broadcast(alpha * x.adv_seq, x.mask), token_mask=m, scores=s,
                   weights=alpha[:, None] * m, metrics=metrics)


def vppo_extra(logp: torch.Tensor, rows: list[int], x: ShapeInputs, denominator: float):
    coef = x.cfg.vppo.entropy_coef
    loss = vppo.entropy_penalty(logp, x.mask[rows].to(logp.device), coef=coef, denominator=denominator)
    return loss, {"vppo/entropy_penalty": float(loss.detach())}


def shape_vgpo(x: ShapeInputs) -> Shaping:
    c = x.cfg.vgpo
    token_f, traj_f = vgpo.advantage_factors(x.passes.focus, x.mask, x.group_size, beta=c.beta, gamma=c.gamma,
                                             kappa=c.kappa)
    w = traj_f[:, None] * token_f
    valid = x.mask.bool()
    metrics = {"vgpo/token_factor_mean": float((token_f * x.mask).sum() / x.mask.sum().clamp(min=1)),
               "vgpo/token_factor_min": float(token_f[valid].min()) if valid.any() else 1.0,
               "vgpo/token_factor_max": float(token_f[valid].max()) if valid.any() else 1.0,
               "vgpo/traj_factor_mean": float(traj_f.mean())}
    return Shaping(advantages=x.adv_seq[:, None] * w, scores=x.passes.focus, weights=w, metrics=metrics)


ALGORITHM_SPECS: dict[str, AlgorithmSpec] = {
    "grpo": AlgorithmSpec("grpo", shape_grpo),
    "dapo": AlgorithmSpec("dapo", shape_grpo),
    "dr_grpo": AlgorithmSpec("dr_grpo", shape_grpo),
    "srpo": AlgorithmSpec("srpo", shape_srpo, needs_corrupted=True, needs_roles=True, needs_old_scores=True,
                          needs_removed=lambda cfg: cfg.srpo.consistency in ("removed", "perception_only")
                          and cfg.srpo.weighted_roles != "perception"),
    "papo": AlgorithmSpec("papo", shape_papo, needs_corrupted=True, extra_loss=papo_extra, needs_old_scores=True),
    "vppo": AlgorithmSpec("vppo", shape_vppo, needs_corrupted=True, extra_loss=vppo_extra, needs_old_scores=True),
    "vgpo": AlgorithmSpec("vgpo", shape_vgpo, needs_focus=True, needs_old_scores=True),
}

