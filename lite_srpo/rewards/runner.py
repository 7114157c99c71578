"""All of `reward.weights` for one step: built-ins in-process, user functions in the worker pool.

Built-ins (`REWARD_FUNCTIONS`: accuracy, format, and anything registered there in-process) stay in this
process: they are fast, the project's own code, and need the response format. User functions
(`file.py:fn`, `pkg.mod:fn`) run in `RewardPool` with `reward.timeout_s` per call; a call that times out,
raises or returns NaN/inf/a non-number scores 0, is counted in `reward/<name>/failures` and named in a
`warning` event. More than `reward.max_failure_frac` of one function's calls failing in a step stops the
run: a reward that is broken everywhere would otherwise train on zeros.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from ..config import RewardConfig
from ..config.user_rewards import RewardLoadError, is_custom_name, parse_reward_ref
from ..data.prompts import ResponseFormat
from ..data.tasks.base import Sample
from ..errors import ConfigError, LiteSrpoError
from .builtin import REWARD_FUNCTIONS, compute_rewards
from .pool import RewardPool

log = logging.getLogger(__name__)
MAX_LISTED = 3  # failures named per function per step in the warning


class RewardFailureError(LiteSrpoError):
    """A user reward failed on too many of a step's calls."""


class Rewarder:
    """`compute(responses, samples, step)` → (weighted totals, raw values per name, extra metrics)."""

    def __init__(self, cfg: RewardConfig, fmt: ResponseFormat,
                 warn: Callable[[int, str], None] | None = None, workers: int | None = None) -> None:
        self.cfg, self.fmt, self.warn = cfg, fmt, warn
        self.builtin = {n: w for n, w in cfg.weights.items() if n in REWARD_FUNCTIONS or not is_custom_name(n)}
        self.custom = {n: w for n, w in cfg.weights.items() if n not in self.builtin}
        try:
            refs = {name: parse_reward_ref(name) for name in self.custom}
        except RewardLoadError as exc:
            raise ConfigError(f"reward.weights: {exc}") from None
        self.pool = RewardPool(refs, cfg.timeout_s, workers) if refs else None

    def compute(self, responses: list[str], samples: list[Sample], step: int,
                ) -> tuple[list[float], dict[str, list[float]], dict[str, float]]:
        if len(responses) != len(samples):
            raise ValueError(f"{len(responses)} responses but {len(samples)} samples")
        raw: dict[str, list[float]] = {}
        if self.builtin:
            _, raw = compute_rewards(responses, samples, self.builtin, self.fmt,
                                     answer_fallback=self.cfg.answer_fallback)
        metrics: dict[str, float] = {}
        if self.pool is not None:
            raw.update(self._run_custom(responses, samples, step, metrics))
        ordered = {name: raw[name] for name in self.cfg.weights}
        totals = [sum(self.cfg.weights[n] * ordered[n][i] for n in ordered) for i in range(len(responses))]
        return totals, ordered, metrics

    def _run_custom(self, responses: list[str], samples: list[Sample], step: int,
                    metrics: dict[str, float]) -> dict[str, list[float]]:
        calls = [(name, r, s) for name in self.custom for r, s in zip(responses, samples)]
        try:
            results = self.pool.run(calls)
        except RewardLoadError as exc:
            raise ConfigError(f"reward.weights: {exc}") from None
        out: dict[str, list[float]] = {}
        n = len(responses)
        for k, name in enumerate(self.custom):
            chunk = results[k * n:(k + 1) * n]
            out[name] = [r.value if r.value is not None else 0.0 for r in chunk]
            failed = [(samples[i], r.error) for i, r in enumerate(chunk) if r.value is None]
            metrics[f"reward/{name}/failures"] = float(len(failed))
            if not failed:
                continue
            listed = "; ".join(f"{s.source or s.task or 'sample'}: {err}" for s, err in failed[:MAX_LISTED])
            more = f" (+{len(failed) - MAX_LISTED} more)" if len(failed) > MAX_LISTED else ""
            message = f"reward {name} failed on {len(failed)} of {n} calls (scored 0): {listed}{more}"
            log.warning("step %d: %s", step, message)
            if self.warn is not None:
                self.warn(step, message)
            if len(failed) > self.cfg.max_failure_frac * n:
                raise RewardFailureError(
                    f"reward {name}: {len(failed)} of {n} calls failed at step {step}, more than "
                    f"reward.max_failure_frac={self.cfg.max_failure_frac:g}; first error: {failed[0][1]}. Fix the "
                    f"function (or raise reward.timeout_s={self.cfg.timeout_s:g} if it is just slow).")
        return out

    def close(self) -> None:
        """Stop the worker processes (they restart if `compute` is called again)."""
        if self.pool is not None:
            self.pool.close()
