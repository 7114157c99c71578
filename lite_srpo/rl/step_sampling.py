"""A step's rewards and dynamic-sampling verdicts, and the extra rounds that fill its batch (`dynamic_fill.py`).

Split out of `train.rl_step` so that the first round and every re-sampled round are scored the same way:
the rewards with DAPO's overlong punishment, then each group's keep/drop verdict."""
from __future__ import annotations

import torch

from ..run.runtime import row_sampling_seed, sampling_seed
from .dynamic_fill import RESAMPLE_SEED, Scored
from .objectives import grpo
from .rollout import PromptInputs, RolloutBatch, generate
from .state import Run
from .step_parts import encode_prompts, filter_key, prompts_for_step

RANK_SEED = 104_729
ROUND_PROMPTS = 1_000_000  # prompt indices of round r start at r x this: their sampler seeds never collide


def score(run: Run, batch: RolloutBatch, step: int) -> tuple[list[float], dict[str, list[float]], dict]:
    """Rewards of every row (with the overlong punishment as a reward part), their parts, reward metrics."""
    cfg = run.cfg
    rewards, per_fn, metrics = run.rewarder.compute(batch.texts, batch.samples(), step)
    if cfg.algorithm.overlong == "punish":  # DAPO's soft overlong punishment
        penalty = grpo.overlong_penalty(batch.response_mask.sum(dim=1), batch.truncated, cfg.rollout.max_new_tokens,
                                        cfg.algorithm.overlong_buffer, cfg.algorithm.overlong_penalty)
        per_fn["overlong"] = penalty.tolist()
        rewards = [r + p for r, p in zip(rewards, per_fn["overlong"])]
    return rewards, per_fn, metrics


def keep_groups(run: Run, rewards: list[float], per_fn: dict[str, list[float]]) -> list[bool]:
    """Dynamic sampling's verdict per group: its accuracy (or total reward) differs within the group."""
    key = filter_key(run.cfg, torch.tensor(rewards, dtype=torch.float32), per_fn)
    return [bool(k) for k in grpo.dynamic_sampling_keep(key, run.cfg.rollout.group_size)]


def rollout(run: Run, prompts: list[PromptInputs], step: int, seed: int, first: int) -> RolloutBatch:
    """G responses per prompt with the recipe's settings; the sampler is seeded by (seed, step, prompt index),
    the prompts' indices starting at `first` (the rank's share, or a re-sampling round's)."""
    cfg = run.cfg
    return generate(run.policy, prompts, cfg.rollout.group_size, cfg.rollout.max_new_tokens, cfg.rollout.temperature,
                    cfg.rollout.top_p, cfg.rollout.top_k, batch_prompts=run.generation_batch,
                    seed_of=lambda i: sampling_seed(seed, step, first + i), batch_rows=run.generation_rows,
                    row_seed_of=lambda i, j: row_sampling_seed(seed, step, first + i, j))


def resample(run: Run, step: int, round_: int, missing: int) -> Scored | None:
    """`missing` new prompts from the round's own stream, sampled, scored and judged like the first round's."""
    seed = run.cfg.train.seed + RESAMPLE_SEED * round_ + RANK_SEED * run.dist.rank
    prompts = encode_prompts(run, prompts_for_step(run.train_set, step, missing, seed))
    batch = rollout(run, prompts, step, seed, ROUND_PROMPTS * round_)
    rewards, per_fn, _ = score(run, batch, step)
    return Scored(batch, rewards, per_fn, keep_groups(run, rewards, per_fn))
