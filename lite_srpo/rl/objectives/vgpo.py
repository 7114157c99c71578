"""VGPO (arXiv 2604.09349): reweight advantages by how much each token "looks at" the image.

No corruption and no extra forward pass: a token's visual focus is the cosine between its final
hidden state and the mean hidden state of the image tokens. Follows the official code
(wzb-bupt/VGPO ``dp_actor.py`` / ``core_algos.py``; research/algorithms.md §4) where it differs from
the paper's equations:

* focus scores are min-max normalised over the whole batch, padding positions included with
  cosine 0, instead of Eq. 4's ``(cos + 1)/2``;
* the trajectory accumulation uses the per-sequence *normalised* weights ŵ, not Eq. 9's raw w;
* groups are consecutive blocks of ``group_size`` rows (the code's ``rollout_n`` blocks);
* min-max normalisations divide by ``range + 1e-8``, so a constant sequence/group maps to zeros;
* token factors are clamped to [0.1, 2.0] and trajectory factors to [0.9, 2.0]. The upper bound 2.0
  can never bind in either: both are ``1 + (x - mean x)`` with ``x ∈ [0, 1]``, which stays below 2.

The final advantage is ``Â_i · traj_factor_i · token_factor_{i,t}``. The code takes the hidden states
from the update forward pass (current parameters, no gradient through the factors); these functions
only need the hidden states, whichever pass they come from. Everything here is vectorised (the
official code loops per token with ``.item()``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_MINMAX_EPS = 1e-8
_TOKEN_CLAMP = (0.1, 2.0)
_TRAJ_CLAMP = (0.9, 2.0)


def _float(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bfloat16 to float32; keep float32/float64 as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def image_hidden_mean(hidden_full: torch.Tensor, image_token_mask: torch.Tensor) -> torch.Tensor:
    """Mean final hidden state over each row's image tokens, ``[N, L, H] → [N, H]``.

    Rows without image tokens get a zero vector, whose cosine with anything is 0 (the code gives
    such rows focus 0 too).
    """
    h = _float(hidden_full)
    m = image_token_mask.to(h.dtype).unsqueeze(-1)  # [N, L, 1]
    count = m.sum(dim=1).clamp(min=1.0)  # [N, 1]
    return (h * m).sum(dim=1) / count  # [N, H]


def visual_focus(hidden: torch.Tensor, image_hidden_mean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Visual focus ρ of each response token, min-max normalised over the whole batch.

    ``cos_t = cos(h_t, μ_v)`` with ``h_t`` the token's own final hidden state; padding positions count
    as cosine 0 and take part in the batch min/max (as in the code, so padding can move the scale);
    ``ρ = (cos - min)/(max - min + 1e-8)``. The paper's Eq. 4 instead uses ``(cos + 1)/2``. The code
    normalises over its update micro-batch; here over whatever batch is passed in.
    Returns ``rho[N, T]``, 0 on padding.
    """
    return minmax_focus(focus_cosine(hidden, image_hidden_mean, mask), mask)


def focus_cosine(hidden: torch.Tensor, image_hidden_mean: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``cos(h_t, μ_v)`` per response token, 0 on padding: per row, so micro-batches (and ranks) can
    compute it apart and the batch min-max (`minmax_focus`) runs once over the whole step."""
    valid = mask.bool()  # [N, T]
    h = _float(hidden)  # [N, T, H]
    mu = _float(image_hidden_mean).to(h.dtype).unsqueeze(1)  # [N, 1, H]
    cos = F.cosine_similarity(h, mu, dim=-1, eps=1e-8)  # [N, T]
    return torch.where(valid, cos, torch.zeros_like(cos))


def minmax_focus(cos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ρ = (cos - min)/(max - min + 1e-8) over the whole batch (padding's zeros included), 0 on padding."""
    if cos.numel() == 0:  # no rows (dynamic sampling kept none on this rank)
        return cos
    valid = mask.bool()
    lo, hi = cos.min(), cos.max()
    rho = (cos - lo) / (hi - lo + _MINMAX_EPS)  # [N, T]
    return torch.where(valid, rho, torch.zeros_like(rho))


def _row_minmax(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-row ``(x - min)/(max - min + 1e-8)`` over valid entries; 0 elsewhere and on constant rows."""
    inf = torch.full_like(x, float("inf"))
    lo = torch.where(valid, x, inf).amin(dim=1, keepdim=True)  # [N, 1]
    hi = torch.where(valid, x, -inf).amax(dim=1, keepdim=True)  # [N, 1]
    lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))  # rows with no valid entries
    hi = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
    out = (x - lo) / (hi - lo + _MINMAX_EPS)
    return torch.where(valid, out, torch.zeros_like(out))


def _tail_gate(rho: torch.Tensor, valid: torch.Tensor, gamma: float, kappa: float) -> torch.Tensor:
    """Eq. 6 gate: among valid tokens with index ≥ ⌊γ·T_i⌋ (index among valid tokens), mark those
    whose score is ≥ the n_top-th largest tail score, ``n_top = max(1, int(κ·n_tail))``; ties pass."""
    n_valid = valid.sum(dim=1)  # [N]
    index = valid.long().cumsum(dim=1) - 1  # [N, T] position among the valid tokens
    start = torch.floor(n_valid.to(torch.float64) * gamma).long()  # [N]
    tail = valid & (index >= start.unsqueeze(1))  # [N, T]
    n_tail = tail.sum(dim=1)  # [N]
    n_top = torch.floor(n_tail.to(torch.float64) * kappa).long().clamp(min=1)  # [N]
    tail_scores = torch.where(tail, rho, torch.full_like(rho, float("-inf")))  # [N, T]
    ranked = torch.sort(tail_scores, dim=1, descending=True).values  # [N, T]
    pick = (n_top - 1).clamp(max=rho.shape[1] - 1).unsqueeze(1)  # [N, 1]
    threshold = ranked.gather(1, pick)  # [N, 1]
    return tail & (rho >= threshold)


def advantage_factors(rho: torch.Tensor, mask: torch.Tensor, group_size: int, beta: float = 0.3,
                      gamma: float = 0.5, kappa: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """VGPO's intra- and inter-trajectory advantage factors (Eq. 5–11, code behaviour).

    * compensation ``comp_t = β·(t - t_min)/(t_max - t_min)`` over each row's valid positions;
    * tail gate G (see ``_tail_gate``; ``gamma`` = tail start ratio, ``kappa`` = top fraction);
    * ``w = ρ·(1 + G·comp)``, per-row min-max → ŵ (constant row → zeros);
    * token factor ``f = clamp(1 + ŵ - mean_valid(ŵ), 0.1, 2.0)``, 1 on padding;
    * ``s_i = Σ_t ŵ``; per block of ``group_size`` consecutive rows min-max → n (constant → zeros),
      trajectory factor ``g = clamp(1 + n - mean(n), 0.9, 2.0)``.

    Returns ``(token_factor[N, T], traj_factor[N])``; multiply both into Â_i.
    """
    n_rows, n_pos = rho.shape
    if group_size < 1 or n_rows % group_size:
        raise ValueError(f"group_size must divide the number of rows ({n_rows}); got {group_size}")
    valid = mask.bool()  # [N, T]
    rho = torch.where(valid, _float(rho), torch.zeros_like(_float(rho)))  # [N, T]

    pos = torch.arange(n_pos, device=rho.device, dtype=rho.dtype).expand(n_rows, n_pos)  # [N, T]
    comp = beta * _row_minmax(pos, valid)  # [N, T]
    gate = _tail_gate(rho, valid, gamma, kappa)  # [N, T]
    w = rho * (1.0 + gate.to(rho.dtype) * comp)  # [N, T]
    w_hat = _row_minmax(w, valid)  # [N, T]

    n_valid = valid.sum(dim=1, keepdim=True).clamp(min=1)  # [N, 1]
    row_mean = w_hat.sum(dim=1, keepdim=True) / n_valid  # [N, 1]
    token_factor = (1.0 + w_hat - row_mean).clamp(*_TOKEN_CLAMP)
    token_factor = torch.where(valid, token_factor, torch.ones_like(token_factor))  # [N, T]

    s = w_hat.sum(dim=1).view(-1, group_size)  # [N/G, G]
    lo = s.amin(dim=1, keepdim=True)
    hi = s.amax(dim=1, keepdim=True)
    n = (s - lo) / (hi - lo + _MINMAX_EPS)  # [N/G, G]
    traj_factor = (1.0 + n - n.mean(dim=1, keepdim=True)).clamp(*_TRAJ_CLAMP).reshape(-1)  # [N]
    return token_factor, traj_factor
