"""PAPO (arXiv 2507.06448): an extra loss that maximises the policy's dependence on the image.

Follows the official code (MikeWangWZHL/PAPO, ``dp_actor.py`` update loop; research/algorithms.md
§2(b)), not the paper text where they differ:

* the "implicit perception loss" KL_prcp is the sampled-token k3 estimator of
  KL(π(·|I) ‖ π(·|I_mask)) with the same clamps as EasyR1's ``low_var_kl``, computed from the
  current log-probs ``l`` (with grad) and the masked-image log-probs ``a`` of the pre-update policy
  (no grad), and it is *maximised*: ``-γ·KL_prcp`` is added to the loss;
* the "double entropy" terms are ``η_ori·mean(-l) + η_aug·mean(-a)``. Because ``a`` comes from a
  no-grad pass, the aug term is a constant with NO gradient, exactly as in the released code (the
  authors confirm this in PAPO issue #20); only ``η_ori`` changes the update, by lowering the
  original view's sampled-token entropy, which counters "KL_prcp hacking".
"""

from __future__ import annotations

import torch

_MODES = ("fixed", "annealing")


def _float(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16 to float32 for the exp/clamp maths; keep float32/float64 as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _valid_only(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Zero the padding before any maths, so junk there (inf/nan) reaches neither values nor grads."""
    return torch.where(valid, x, torch.zeros_like(x))


def perception_kl(logp: torch.Tensor, corrupted_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token k3 of KL(π(·|I) ‖ π(·|I_mask)); 0 on padding.

    ``d = clamp(a - l, -20, 20)``, ``k3 = clamp(exp(d) - d - 1, -10, 10)`` with ``l`` = ``logp`` and
    ``a`` = ``corrupted_logp``. Gradient flows through ``logp`` (and through ``corrupted_logp`` only if
    the caller computed it with grad). Returns ``[N, T]``.
    """
    valid = mask.bool()
    l_, a_ = _valid_only(_float(logp), valid), _valid_only(_float(corrupted_logp), valid)
    diff = (a_ - l_).clamp(-20.0, 20.0)  # [N, T]
    k3 = (torch.exp(diff) - diff - 1.0).clamp(-10.0, 10.0)  # [N, T]
    return torch.where(valid, k3, torch.zeros_like(k3))


def papo_loss_terms(logp: torch.Tensor, corrupted_logp: torch.Tensor, mask: torch.Tensor,
                    gamma: float = 0.02, eta_ori: float = 0.0, eta_aug: float = 0.0,
                    agg_denominator: float | torch.Tensor | None = None,
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """PAPO's extra loss, to be added to the policy loss: ``-γ·KL_prcp + η_aug·H_aug + η_ori·H_ori``.

    Each term is a token mean ``Σ x·mask / Σ mask``; pass ``agg_denominator`` (the number of valid
    tokens in the whole mini-batch) to get a global token mean when the caller accumulates gradients
    over micro-batches. ``H = mean(-log π)`` on the sampled tokens. The ``η_aug`` term has no gradient
    when ``corrupted_logp`` comes from a no-grad pass (the default, as in the official code).

    Returns ``(extra_loss, metrics)``; the metrics ``papo/kl_prcp``, ``papo/entropy_ori`` and
    ``papo/entropy_aug`` are plain token means over this call's ``mask`` (not the global denominator).
    """
    l_ = _float(logp)
    a_ = _float(corrupted_logp)
    valid = mask.bool()
    kl = perception_kl(l_, a_, valid)  # [N, T]
    n_local = valid.sum().clamp(min=1)
    denom = n_local if agg_denominator is None else agg_denominator

    kl_sum = kl.sum()  # padding already 0
    h_ori_sum = -_valid_only(l_, valid).sum()
    h_aug_sum = -_valid_only(a_, valid).sum()
    extra = (-gamma * kl_sum + eta_aug * h_aug_sum + eta_ori * h_ori_sum) / denom

    n = float(n_local)
    metrics = {
        "papo/kl_prcp": float(kl_sum.detach()) / n,
        "papo/entropy_ori": float(h_ori_sum.detach()) / n,
        "papo/entropy_aug": float(h_aug_sum.detach()) / n,
        "papo/extra_loss": float(extra.detach()),
    }
    return extra, metrics


def gamma_schedule(step: int, total_steps: int, mode: str = "fixed", start: float = 0.02,
                   end: float = 0.0, ratio: float = 0.5) -> float:
    """The KL_prcp coefficient γ for training step ``step`` (0-based, updates already done).

    ``fixed`` (PAPO default): always ``start``. ``annealing``: linear from ``start`` to ``end`` over
    the first ``max(1, int(ratio·total_steps))`` steps, then held at ``end`` — the official
    ``AnnealingKLController``. The official code scales the double-entropy coefficients by the same
    discount, i.e. multiply η by ``gamma_schedule(...) / start``.
    """
    if mode not in _MODES:
        raise ValueError(f"gamma schedule mode must be one of {_MODES}; got {mode!r}")
    if mode == "fixed":
        return float(start)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"annealing ratio must be in [0, 1]; got {ratio}")
    anneal_steps = max(1, int(total_steps * ratio))
    progress = min(max(step, 0) / anneal_steps, 1.0)
    return float(start + (end - start) * progress)
