"""One RL step over N ranks with the update of one process over the same global batch.

How a step is split (DESIGN.md §5, data parallelism):
- the step's prompts are cut into N contiguous shares; each group of G responses stays on one rank;
- each rank runs its own rollout, rewards and no-grad passes on its share;
- `exchange` then gives every rank the whole step's per-row vectors (rewards, masks, roles and the
  passes' `[N, R]` log-probs, padded to one width), so advantages, dynamic sampling, SRPO's per-role
  standardisation, VPPO's and VGPO's batch min/max, `adv_scale: batch` and the metrics are computed on
  the global batch, identically on every rank;
- each rank back-propagates its own rows with the global loss denominators, and `reduce_gradients`
  sums the LoRA gradients over the ranks (one all-reduce per optimizer step, so ranks with different
  numbers of micro-batches, or none, stay in step).

With one process every function here is the identity, so the single-process loop runs the same code.
Gradients are summed with `torch.distributed.all_reduce` on one flat buffer rather than by wrapping the
model in `DistributedDataParallel`: the streamed lm_head runs outside the model's `forward`, and ranks
may back-propagate different numbers of micro-batches, which DDP's per-forward bucketing does not allow.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from ..run.distributed import DistContext, all_reduce_sum, gather_objects
from .passes import PassOutputs
from .rollout import RolloutBatch

PASS_FIELDS = ("old_logp", "ref_logp", "corrupted_logp", "removed_logp", "focus_cos")


def rank_share(n: int, ctx: DistContext) -> tuple[int, int]:
    """[first, stop) of this rank's contiguous share of `n` prompts."""
    per = n // ctx.world_size
    return ctx.rank * per, (ctx.rank + 1) * per


@dataclass
class StepShare:
    """What one rank contributes to the step: every row's reward, and the kept rows' per-token vectors."""

    rewards: list[float]
    per_fn: dict[str, list[float]]
    lengths: torch.Tensor  # [n] response lengths of all rows (before dynamic sampling)
    truncated: torch.Tensor  # [n] bool
    kept: list[int]  # local indices of the rows kept by dynamic sampling (all rows without it)
    response_mask: torch.Tensor  # [k, R] of the kept rows
    roles: torch.Tensor | None  # [k, R]
    passes: dict[str, torch.Tensor | None]  # PASS_FIELDS -> [k, R] or None
    violations: int = 0
    reward_metrics: dict[str, float] = field(default_factory=dict)
    pass_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class GlobalStep:
    """The whole step's vectors, in global row order (rank 0's rows first), the same on every rank."""

    rewards: list[float]
    per_fn: dict[str, list[float]]
    lengths: torch.Tensor
    truncated: torch.Tensor
    kept: list[int]  # global row indices kept
    response_mask: torch.Tensor  # [K, R]
    roles: torch.Tensor | None
    passes: PassOutputs
    violations: int
    reward_metrics: dict[str, float]
    row_offset: int  # index of this rank's first kept row among the K kept rows
    width: int  # R: the widest response of the step


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    return t if t.shape[1] == width else F.pad(t, (0, width - t.shape[1]))


def _cat_rows(parts: list[torch.Tensor | None], width: int) -> torch.Tensor | None:
    if parts[0] is None:
        return None
    return torch.cat([_pad(p, width) for p in parts], dim=0)


def passes_share(passes: PassOutputs) -> dict[str, torch.Tensor | None]:
    return {name: getattr(passes, name) for name in PASS_FIELDS}


def exchange(ctx: DistContext, share: StepShare) -> GlobalStep:
    """All-gather the step's shares; padding to the widest response keeps the single-process layout."""
    shares: list[StepShare] = gather_objects(ctx, share)
    width = max(s.response_mask.shape[1] for s in shares)
    kept, offset, row_offset = [], 0, 0
    for r, s in enumerate(shares):
        if r == ctx.rank:
            row_offset = len(kept)
        kept.extend(offset + i for i in s.kept)
        offset += len(s.rewards)
    seconds: dict[str, float] = {}
    for s in shares:  # the slowest rank sets the pace of each pass
        for k, v in s.pass_seconds.items():
            seconds[k] = max(seconds.get(k, 0.0), v)
    passes = PassOutputs(**{name: _cat_rows([s.passes[name] for s in shares], width) for name in PASS_FIELDS},
                         seconds=seconds)
    metrics: dict[str, float] = {}
    for s in shares:  # user-reward failure counts add up over the ranks
        for k, v in s.reward_metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v
    return GlobalStep(
        rewards=[x for s in shares for x in s.rewards],
        per_fn={name: [x for s in shares for x in s.per_fn[name]] for name in shares[0].per_fn},
        lengths=torch.cat([s.lengths for s in shares]), truncated=torch.cat([s.truncated for s in shares]),
        kept=kept, response_mask=_cat_rows([s.response_mask for s in shares], width),
        roles=_cat_rows([s.roles for s in shares], width), passes=passes,
        violations=sum(s.violations for s in shares), reward_metrics=metrics, row_offset=row_offset, width=width)


def pad_batch(batch: RolloutBatch, width: int, pad_id: int) -> RolloutBatch:
    """The same rows padded on the right to the step's global response width."""
    extra = width - batch.response_ids.shape[1]
    if extra <= 0:
        return batch
    values = {f.name: getattr(batch, f.name) for f in fields(batch)}
    values["response_ids"] = F.pad(batch.response_ids, (0, extra), value=pad_id)
    values["response_mask"] = F.pad(batch.response_mask, (0, extra))
    return RolloutBatch(**values)


def local_rows(global_rows: list[int], row_offset: int, n_local: int) -> list[int]:
    """This rank's rows (local indices) among a global mini-batch's rows."""
    return [g - row_offset for g in global_rows if row_offset <= g < row_offset + n_local]


def reduce_gradients(ctx: DistContext, params: list[torch.nn.Parameter], finite: bool,
                     loss: float) -> tuple[bool, float]:
    """Sum the LoRA gradients, the finite flag and the loss over the ranks, in one all-reduce.

    Each rank's loss is already divided by the global denominator, so the sum is the gradient of the
    whole mini-batch, as one process computes it. Parameters without a gradient (a rank with no rows
    in this mini-batch) contribute zeros."""
    if not ctx.enabled:
        return finite, loss
    device = params[0].device
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
                     + [torch.tensor([0.0 if finite else 1.0, loss], device=device)])
    all_reduce_sum(ctx, flat)
    start = 0
    for p in params:
        n = p.numel()
        p.grad = flat[start:start + n].view_as(p).to(p.dtype).clone()
        start += n
    bad, total = flat[start:start + 2].tolist()
    return bad == 0.0, total


def merge_stats(ctx: DistContext, stats: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per-micro-batch metrics of every rank, pooled."""
    if not ctx.enabled:
        return stats
    merged: dict[str, list[float]] = {}
    for part in gather_objects(ctx, stats):
        for k, v in part.items():
            merged.setdefault(k, []).extend(v)
    return merged
