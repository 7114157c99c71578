"""Steps that teach nothing, said plainly: groups whose responses all got the same reward.

A group whose G rewards are equal has zero advantage everywhere: no gradient. Small VLMs starting from a
base checkpoint often break the answer format, so every response gets the same reward and most groups
are like that (Unsloth's Qwen3-VL GRPO notebook shows zero reward spread in most groups). With dynamic
sampling such a step drops every group and updates nothing; those are the steps where a user most needs
to see the completions. So:

- `zero_spread_share` is logged every step (`groups/zero_spread_frac`), for every algorithm;
- a step whose groups were all dropped still writes its completions table and its Tokens events
  (`log_dropped_step`), from the responses as sampled, with zero advantage;
- `ZeroSpreadWatch` turns a share that stays high into one warning with what to try.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .algorithms import Shaping
from .completions import batch_completions
from .rollout import RolloutBatch
from .state import Run
from .step_parts import batch_roles
from .token_events import token_event_records

HINT_SHARE = 0.8
HINT_STEPS = 5
HINT = ("{share:.0%} or more of the groups had one reward for every response in each of the last {steps} steps: "
        "those groups give no gradient. Look at the completions (Tokens tab, train.log_completions_every): a "
        "model that breaks the answer format scores the same every time. Try an SFT warm-up (sft.steps), a "
        "format reward weight, a larger rollout.group_size, or rollout.temperature above 1.")


def zero_spread_share(rewards: torch.Tensor, group_size: int) -> float:
    """The share of groups (consecutive runs of `group_size` rewards) whose rewards are all equal."""
    groups = rewards.float().view(-1, group_size)
    if groups.shape[0] == 0:
        return 0.0
    return float((groups.max(dim=1).values == groups.min(dim=1).values).float().mean())


@dataclass
class ZeroSpreadWatch:
    """Counts consecutive steps at or above `share`; says so once when the streak reaches `steps`."""

    share: float = HINT_SHARE
    steps: int = HINT_STEPS
    streak: int = 0

    def update(self, value: float | None) -> str | None:
        self.streak = self.streak + 1 if value is not None and value >= self.share else 0
        return HINT.format(share=self.share, steps=self.steps) if self.streak == self.steps else None


def log_dropped_step(run: Run, batch: RolloutBatch, rewards: list[float], per_fn: dict[str, list[float]],
                     step: int) -> None:
    """The completions table and Tokens events of a step whose groups dynamic sampling all dropped: this
    rank's responses as sampled, with their rewards, roles and zero advantage (no update ran)."""
    cfg = run.cfg
    tokens_due = cfg.train.tokens_every and step % cfg.train.tokens_every == 0
    table_due = cfg.train.log_completions_every and step % cfg.train.log_completions_every == 0
    if not run.dist.is_main or not (tokens_due or table_due) or batch.size == 0:
        return
    roles = batch_roles(run, batch)[0] if cfg.data.template == "structured" else None
    zero = Shaping(advantages=torch.zeros(batch.response_ids.shape))
    if tokens_due:
        records = token_event_records(run, batch, rewards, zero, roles, step)
        run.events.write("tokens", step, algorithm=cfg.algorithm.name, samples=records, dropped=True)
    if table_due:
        run.trackers.log_completions(step, batch_completions(run.policy.tokenizer, batch, rewards, per_fn, roles,
                                                             [0.0] * batch.size, None))
