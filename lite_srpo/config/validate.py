"""Validation of a built recipe: impossible values and combinations, each reported as
'key: value — what is allowed', all of them together (`problems`), before any model loads."""
from __future__ import annotations

import importlib.util
from typing import Any

from ..errors import ConfigError, LiteSrpoError
from .hub_uri import is_hub_uri, parse_hub_uri
from .schema import RunConfig

TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # train.report_to name -> package to install


def tracker_problems(names: list[str]) -> list[str]:
    """Config errors for `train.report_to`: unknown names, duplicates, packages that are not installed."""
    errs = []
    for i, name in enumerate(names):
        if name not in TRACKER_PACKAGES:
            errs.append(f"train.report_to[{i}]: {name!r} is not one of {', '.join(TRACKER_PACKAGES)}")
        elif names.index(name) != i:
            errs.append(f"train.report_to[{i}]: {name!r} is listed twice")
        elif importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            errs.append(f"train.report_to[{i}]: {name!r} needs the {TRACKER_PACKAGES[name]} package — "
                        f"pip install {TRACKER_PACKAGES[name]}")
    return errs


def _whole(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def problems(cfg: RunConfig) -> list[str]:
    """Impossible values, each as 'key: value — what is allowed'."""
    errs: list[str] = []

    def need(ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            errs.append(f"{key}: {value!r} is out of range — {allowed}")

    need(cfg.rollout.group_size >= 2, "rollout.group_size", cfg.rollout.group_size, "needs >= 2 (a group baseline needs two responses)")
    need(cfg.rollout.prompts_per_step >= 1, "rollout.prompts_per_step", cfg.rollout.prompts_per_step, "needs >= 1")
    need(cfg.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", cfg.rollout.max_new_tokens, "needs >= 1")
    need(cfg.rollout.temperature > 0, "rollout.temperature", cfg.rollout.temperature, "needs > 0")
    need(0 < cfg.rollout.top_p <= 1, "rollout.top_p", cfg.rollout.top_p, "needs 0 < top_p <= 1")
    need(cfg.rollout.top_k >= 0, "rollout.top_k", cfg.rollout.top_k, "needs >= 0 (0 = off)")
    need(cfg.optim.lr > 0, "optim.lr", cfg.optim.lr, "needs > 0")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", cfg.optim.weight_decay, "needs >= 0")
    need(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", cfg.optim.warmup_steps, "needs >= 0")
    need(cfg.optim.max_grad_norm > 0, "optim.max_grad_norm", cfg.optim.max_grad_norm, "needs > 0")
    need(len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas", cfg.optim.betas, "two numbers in [0, 1)")
    need(cfg.train.steps >= 1, "train.steps", cfg.train.steps, "needs >= 1")
    need(cfg.train.micro_batch_size >= 1, "train.micro_batch_size", cfg.train.micro_batch_size, "needs >= 1")
    need(cfg.train.mini_batches >= 1, "train.mini_batches", cfg.train.mini_batches, "needs >= 1")
    chunk = cfg.train.logprob_chunk
    need(chunk == "auto" or (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 1),
         "train.logprob_chunk", chunk, "auto or a whole number >= 1")
    need(_whole(cfg.rollout.generation_rows, 0), "rollout.generation_rows", cfg.rollout.generation_rows,
         "a whole number >= 0 (0 = every row of the call at once)")
    rchunk = cfg.train.recompute_chunk
    need(isinstance(rchunk, int) and not isinstance(rchunk, bool) and rchunk >= 0,
         "train.recompute_chunk", rchunk, "0 (off) or a whole number of tokens >= 1")
    need(not cfg.train.offload_activations or cfg.model.gradient_checkpointing, "train.offload_activations",
         cfg.train.offload_activations, "needs model.gradient_checkpointing: true (what is offloaded is the "
         "checkpointed layers' inputs)")
    for key in ("offload_activations", "auto_fit", "deterministic"):
        value = getattr(cfg.train, key)
        need(isinstance(value, bool), f"train.{key}", value, "true or false")
    margin = cfg.train.auto_fit_margin
    need(isinstance(margin, (int, float)) and not isinstance(margin, bool) and 0 <= margin < 0.9,
         "train.auto_fit_margin", margin, "a fraction of the card, 0 <= margin < 0.9 (0.1 leaves 10 %)")
    need(cfg.train.save_every >= 0, "train.save_every", cfg.train.save_every, "needs >= 0 (0 = only at the end)")
    need(cfg.train.keep_last >= 1, "train.keep_last", cfg.train.keep_last, "needs >= 1")
    need(cfg.train.log_completions_every >= 0, "train.log_completions_every", cfg.train.log_completions_every,
         "needs >= 0 (0 = off)")
    if cfg.train.log_completions_every > 0 and not cfg.train.report_to:
        errs.append(f"train.log_completions_every: {cfg.train.log_completions_every} sends tables to trackers, but "
                    "train.report_to is empty — add tensorboard or wandb to it, or set 0")
    need(cfg.lora.r >= 1, "lora.r", cfg.lora.r, "needs >= 1")
    need(0 <= cfg.lora.dropout < 1, "lora.dropout", cfg.lora.dropout, "needs 0 <= dropout < 1")
    # Sampling and scoring must be the same policy: the old log-probs, the ratio and every role score
    # are taken under the full, dropout-free distribution the tokens were sampled from.
    if cfg.lora.dropout > 0:
        errs.append(f"lora.dropout: {cfg.lora.dropout!r} — RL needs 0: the model stays in train mode, so dropout "
                    "would make the old log-probs differ from the policy that sampled the responses")
    if cfg.rollout.top_p < 1 or cfg.rollout.top_k > 0:
        errs.append(f"rollout.top_p={cfg.rollout.top_p!r} / rollout.top_k={cfg.rollout.top_k!r} — RL needs top_p 1.0 and "
                    "top_k 0: tokens sampled from a truncated distribution would be scored under the full one "
                    "(use them with `lite-srpo eval` only)")
    need(cfg.algorithm.clip_low >= 0 and cfg.algorithm.clip_low < 1, "algorithm.clip_low", cfg.algorithm.clip_low, "needs 0 <= clip_low < 1")
    need(cfg.algorithm.clip_high >= 0, "algorithm.clip_high", cfg.algorithm.clip_high, "needs >= 0")
    need(cfg.algorithm.dual_clip is None or cfg.algorithm.dual_clip > 1, "algorithm.dual_clip", cfg.algorithm.dual_clip, "null or > 1")
    rounds = cfg.rollout.max_resample_rounds
    need(isinstance(rounds, int) and not isinstance(rounds, bool) and rounds >= 0, "rollout.max_resample_rounds",
         rounds, "a whole number >= 0 (0 = no re-sampling)")
    if isinstance(rounds, int) and rounds > 0 and not cfg.algorithm.dynamic_sampling:
        errs.append(f"rollout.max_resample_rounds: {rounds} refills the groups dynamic sampling drops, but "
                    "algorithm.dynamic_sampling is false — turn it on, or set 0")
    need(cfg.algorithm.cispo_max > 0, "algorithm.cispo_max", cfg.algorithm.cispo_max, "needs > 0 (TRL recommends 5.0)")
    if cfg.algorithm.policy_loss == "cispo" and cfg.algorithm.dual_clip is not None:
        errs.append(f"algorithm.dual_clip: {cfg.algorithm.dual_clip!r} with algorithm.policy_loss: cispo — CISPO has no "
                    "clipped surrogate for a dual clip to bound (its weight is capped by algorithm.cispo_max); set null")
    need(cfg.algorithm.beta >= 0, "algorithm.beta", cfg.algorithm.beta, "needs >= 0")
    need(0 < cfg.algorithm.srpo.lam < 1, "algorithm.srpo.lam", cfg.algorithm.srpo.lam, "needs 0 < lam < 1 so weights stay positive")
    need(cfg.algorithm.srpo.tau > 0, "algorithm.srpo.tau", cfg.algorithm.srpo.tau, "needs > 0")
    need(cfg.algorithm.srpo.kappa > 0, "algorithm.srpo.kappa", cfg.algorithm.srpo.kappa, "needs > 0")
    need(0 <= cfg.algorithm.corruption.prob <= 1, "algorithm.corruption.prob", cfg.algorithm.corruption.prob, "needs 0 <= prob <= 1")
    need(cfg.algorithm.corruption.patch_size >= 1, "algorithm.corruption.patch_size", cfg.algorithm.corruption.patch_size, "needs >= 1")
    need(0 < cfg.algorithm.vppo.k <= 1, "algorithm.vppo.k", cfg.algorithm.vppo.k, "needs 0 < k <= 1")
    need(0 < cfg.algorithm.vppo.beta_min <= 1, "algorithm.vppo.beta_min", cfg.algorithm.vppo.beta_min, "needs 0 < beta_min <= 1")
    need(0 <= cfg.algorithm.overlong_buffer < 1, "algorithm.overlong_buffer", cfg.algorithm.overlong_buffer,
         "needs 0 <= buffer < 1 (a share of rollout.max_new_tokens)")
    need(cfg.algorithm.overlong_penalty >= 0, "algorithm.overlong_penalty", cfg.algorithm.overlong_penalty, "needs >= 0")
    need(cfg.data.n_val >= 0, "data.n_val", cfg.data.n_val, "needs >= 0")
    need(cfg.data.n_train >= 1, "data.n_train", cfg.data.n_train, "needs >= 1")
    need(cfg.data.image_size >= 28, "data.image_size", cfg.data.image_size, "needs >= 28 (one vision token)")
    need(cfg.sft.steps >= 0, "sft.steps", cfg.sft.steps, "needs >= 0")
    need(cfg.sft.lr > 0, "sft.lr", cfg.sft.lr, "needs > 0")
    if not cfg.model.path:
        errs.append("model.path: missing — a local model directory or a hub id (e.g. Qwen/Qwen2.5-VL-3B-Instruct)")
    if not cfg.data.task and not cfg.data.train_file:
        errs.append("data: set data.task (count_shapes | bar_compare | gauge | near_colours) or data.train_file (JSONL/Parquet/dataset dir)")
    if cfg.algorithm.name == "srpo" and cfg.data.template != "structured":
        errs.append(f"data.template: {cfg.data.template!r} with algorithm.name 'srpo' — SRPO needs the 'structured' "
                    "template (<perception>…</perception><think>…</think>\\boxed{}) to find perception and reasoning tokens")
    from .user_rewards import check_reward_name

    for name, weight in cfg.reward.weights.items():
        problem = check_reward_name(name)  # user functions (file.py:fn, pkg.mod:fn) are imported and checked here
        if problem:
            errs.append(f"reward.weights.{name}: {problem}")
        elif not isinstance(weight, (int, float)):
            errs.append(f"reward.weights.{name}: {weight!r} is not a number")
    need(cfg.reward.timeout_s > 0, "reward.timeout_s", cfg.reward.timeout_s, "needs > 0 (seconds per user reward call)")
    need(0 <= cfg.reward.max_failure_frac <= 1, "reward.max_failure_frac", cfg.reward.max_failure_frac, "needs 0 <= frac <= 1")
    for key, column in cfg.data.columns.items():
        if key not in ("image", "question", "answer", "choices"):
            errs.append(f"data.columns.{key}: unknown field — map image, question, answer or choices to a column")
        elif not isinstance(column, str) or not column:
            errs.append(f"data.columns.{key}: {column!r} should be a column name")
    for key in ("train_file", "test_file"):
        if is_hub_uri(getattr(cfg.data, key)):
            try:
                parse_hub_uri(getattr(cfg.data, key))
            except LiteSrpoError as exc:
                errs.append(f"data.{key}: {exc}")
    errs.extend(tracker_problems(cfg.train.report_to))
    if cfg.train.micro_batch_size > cfg.rollout.group_size * cfg.rollout.prompts_per_step:
        errs.append(f"train.micro_batch_size: {cfg.train.micro_batch_size} exceeds the responses per step "
                    f"({cfg.rollout.prompts_per_step} x {cfg.rollout.group_size})")
    return errs


def check_divisible(prompts_per_step: int, world_size: int) -> None:
    """Groups stay whole on one rank and every rank gets the same number of prompts."""
    if prompts_per_step % world_size:
        raise ConfigError(f"rollout.prompts_per_step={prompts_per_step} is not divisible by the {world_size} ranks: "
                          f"each rank samples prompts_per_step / ranks prompts (x group_size responses). Use a "
                          f"multiple of {world_size}, or another number of processes")
