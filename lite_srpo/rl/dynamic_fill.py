"""DAPO's dynamic sampling that fills the batch: re-sample prompts until enough groups carry a signal.

Dynamic sampling drops every group whose rewards (or accuracies) are all equal; left alone, the batch
then shrinks from step to step. DAPO keeps sampling until the batch is full, and EasyR1 does too
(`online_filtering`). Here each round samples as many new prompts as groups are missing, up to
`rollout.max_resample_rounds` rounds; the first groups that pass fill the batch, in the order they were
sampled, and the rest are dropped. The extra prompts come from their own deterministic stream (seeded
by the run's seed, the step, the round and the rank), so a resumed run re-samples the same ones.
Each rank fills its own share. What it cost is logged: the rounds, the extra responses generated and
their seconds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .rollout import PromptInputs, RolloutBatch

RESAMPLE_SEED = 7_919  # offsets the extra prompts' stream from the step's own (prompts_for_step)


@dataclass
class Scored:
    """A rollout batch with its rewards and each row's dynamic-sampling verdict."""

    batch: RolloutBatch
    rewards: list[float]
    per_fn: dict[str, list[float]]
    keep_group: list[bool]  # one per group (G consecutive rows)


@dataclass
class Filled:
    batch: RolloutBatch  # every row generated this step, first round first
    rewards: list[float]
    per_fn: dict[str, list[float]]
    kept: list[int]  # rows of `batch` that the update uses: whole groups, at most the first round's count
    metrics: dict[str, float] = field(default_factory=dict)  # what re-sampling cost (empty when it is off)


def concat_batches(a: RolloutBatch, b: RolloutBatch, pad_id: int) -> RolloutBatch:
    """`b`'s rows after `a`'s (their prompts too), responses padded to the wider of the two."""
    width = max(a.response_ids.shape[1], b.response_ids.shape[1])

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(t, (0, width - t.shape[1]), value=value)

    prompts: list[PromptInputs] = a.prompts + b.prompts
    return RolloutBatch(prompts=prompts, prompt_of=a.prompt_of + [p + len(a.prompts) for p in b.prompt_of],
                        response_ids=torch.cat([pad(a.response_ids, pad_id), pad(b.response_ids, pad_id)]),
                        response_mask=torch.cat([pad(a.response_mask, 0), pad(b.response_mask, 0)]),
                        texts=a.texts + b.texts, truncated=torch.cat([a.truncated, b.truncated]),
                        first_prompt=a.first_prompt)


def kept_rows(keep_group: list[bool], group_size: int, max_groups: int) -> list[int]:
    """Rows of the first `max_groups` groups whose verdict is keep."""
    groups = [g for g, keep in enumerate(keep_group) if keep][:max_groups]
    return [g * group_size + j for g in groups for j in range(group_size)]


def fill(first: Scored, group_size: int, max_rounds: int, pad_id: int,
         resample: Callable[[int, int], Scored | None]) -> Filled:
    """Keep the first round's passing groups; while fewer than its group count pass and rounds remain,
    `resample(round, missing)` samples and scores `missing` more prompts (None: no more prompts)."""
    target = len(first.keep_group)
    batch, rewards, per_fn = first.batch, list(first.rewards), {k: list(v) for k, v in first.per_fn.items()}
    verdicts = list(first.keep_group)
    rounds, extra, t0 = 0, 0, time.perf_counter()
    while sum(verdicts) < target and rounds < max_rounds:
        more = resample(rounds + 1, target - sum(verdicts))
        if more is None or more.batch.size == 0:
            break
        rounds += 1
        extra += more.batch.size
        batch = concat_batches(batch, more.batch, pad_id)
        rewards += more.rewards
        for k, v in more.per_fn.items():
            per_fn.setdefault(k, []).extend(v)
        verdicts += more.keep_group
    kept = kept_rows(verdicts, group_size, target)
    metrics = {} if max_rounds <= 0 else {
        "dynamic_sampling/resample_rounds": float(rounds), "dynamic_sampling/extra_responses": float(extra),
        "dynamic_sampling/filled_frac": len(kept) / max(target * group_size, 1),
        "time/resample": time.perf_counter() - t0 if rounds else 0.0}
    return Filled(batch=batch, rewards=rewards, per_fn=per_fn, kept=kept, metrics=metrics)
