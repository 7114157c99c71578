"""The pieces of one RL step around the loop in `train.rl_step`: which prompts a step samples, their
encoding, the roles of response tokens, dynamic sampling's key, the corruption settings, row subsets and
the step's metrics. Pure or nearly so, so the loop itself reads top to bottom."""
from __future__ import annotations

import logging

import numpy as np
import torch

from ..config import RunConfig
from ..data.prompts import token_roles
from ..data.tasks.base import Sample
from ..errors import LiteSrpoError
from .data_parallel import GlobalStep
from .rollout import RolloutBatch, encode_prompt
from .state import Run

log = logging.getLogger("lite_srpo.rl.train")


def prompts_for_step(train_set: list[Sample], step: int, per_step: int, seed: int) -> list[Sample]:
    """Deterministic data order: epoch-wise permutations, so position = f(step) and resume is exact."""
    n = len(train_set)
    out = []
    for j in range(per_step):
        index = (step - 1) * per_step + j
        epoch, pos = divmod(index, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(train_set[int(perm[pos])])
    return out


def encode_prompts(run: Run, samples: list[Sample]):
    prompts = []
    for s in samples:
        p = encode_prompt(run.policy, s, run.cfg.data.template, run.fmt)
        if p.length > run.cfg.data.max_prompt_length:
            log.warning("skipping %s: prompt is %d tokens (> data.max_prompt_length=%d); image tokens are never cut",
                        s.source, p.length, run.cfg.data.max_prompt_length)
            continue
        prompts.append(p)
    if not prompts:
        raise LiteSrpoError(f"every prompt of this step exceeds data.max_prompt_length={run.cfg.data.max_prompt_length}; "
                            "raise it or lower the image resolution")
    return prompts


def batch_roles(run: Run, batch: RolloutBatch) -> tuple[torch.Tensor, int]:
    """Role ids per response token (0 other, 1 perception, 2 reasoning) and the format-violation count."""
    roles = torch.zeros_like(batch.response_ids)
    violations = 0
    for i in range(batch.size):
        length = int(batch.response_mask[i].sum())
        ids = batch.response_ids[i, :length].tolist()
        r, valid = token_roles(run.policy.tokenizer, ids, run.fmt)
        roles[i, :length] = torch.tensor(r, dtype=torch.long)
        violations += int(not valid)
    return roles, violations


def filter_key(cfg: RunConfig, rewards: torch.Tensor, per_fn: dict[str, list[float]]) -> torch.Tensor:
    """What dynamic sampling compares within a group: accuracy, as DAPO's and EasyR1's code do (a group
    that is all wrong but differs in format carries no answer signal), or the total reward. Without an
    accuracy reward in the recipe, the total reward is the only key there is."""
    if cfg.algorithm.filter_on == "accuracy" and "accuracy" in per_fn:
        return torch.tensor(per_fn["accuracy"], dtype=torch.float32)
    return rewards


def corruption_params(cfg: RunConfig) -> dict:
    c = cfg.algorithm.corruption
    return {"patch": {"patch": c.patch_size, "prob": c.prob}, "noise": {"std": c.noise_std},
            "blur": {"radius": c.blur_radius}, "constant": {}}[c.kind]


def subset(batch: RolloutBatch, rows: list[int]) -> RolloutBatch:
    return RolloutBatch(prompts=batch.prompts, prompt_of=[batch.prompt_of[i] for i in rows],
                        response_ids=batch.response_ids[rows], response_mask=batch.response_mask[rows],
                        texts=[batch.texts[i] for i in rows], truncated=batch.truncated[rows],
                        first_prompt=batch.first_prompt)


def step_metrics(g: GlobalStep, rewards: torch.Tensor) -> dict[str, float]:
    """Rewards, lengths and format of the whole step (all ranks, before dynamic sampling)."""
    metrics: dict[str, float] = {
        "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        "completion/len_mean": float(g.lengths.float().mean()), "completion/truncated_frac": float(g.truncated.float().mean()),
    }
    for name, values in g.per_fn.items():
        metrics[f"reward/{name}/mean"] = float(np.mean(values))
    metrics["accuracy"] = metrics.get("reward/accuracy/mean", float("nan"))
    metrics["format_rate"] = metrics.get("reward/format/mean", float("nan"))
    metrics.update(g.reward_metrics)  # reward/<name>/failures of user rewards
    metrics["format_violations"] = float(g.violations)
    return metrics
