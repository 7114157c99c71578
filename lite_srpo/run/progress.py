"""The CLI's view of a run: where its files go (its first line), then a one-line progress bar on stderr.

The bar shows reward and accuracy smoothed like the UI (TensorBoard's EMA), and an ETA that counts the
periodic held-out evals still to come, timed from the evals done so far (step time excludes them).
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Iterator

from .plot import DEFAULT_SMOOTHING, ema

SMOOTHED = ("reward/mean", "accuracy")  # shown as EMAs: one step's value is noise
RAW = ("format_rate", "loss/total")
def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def outputs_line(run_dir: str | Path, report_to: list[str] | tuple[str, ...] = (), save_every: int = 0) -> str:
    """The run's first line: where its events, checkpoints, curves and tracker files go."""
    d = Path(run_dir)
    every = f" every {save_every} steps and at the end" if save_every else " at the end"
    # run/trackers.py writes each tracker's files under <run>/<tracker name>
    trackers = ", ".join(f"{d / name}/ ({name})" for name in report_to) or \
        "none (train.report_to is empty)"
    return (f"[run] {d}: events {d / 'events.jsonl'} · checkpoints {d / 'checkpoints'}/{every} · "
            f"curves {d / 'curves.png'} at the end (any time: lite-srpo plot {d}) · trackers {trackers}")


def announce(line: str, quiet: bool = False) -> None:
    """One whole line on stderr, where the progress bar goes."""
    if not quiet:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def evals_from(step: int, total: int, every: int) -> int:
    """Held-out evals at steps step..total (inclusive): those still to run when step `step` has just ended,
    since the loop evaluates after the step's update. Example: step 15, total 60, every 15 -> 4."""
    if not every or step > total:
        return 0
    return total // every - (step - 1) // every


def eta(step: int, start: int, total: int, train_seconds: float, evals_left: int,
        eval_seconds: list[float] | tuple[float, ...] = ()) -> tuple[float | None, int]:
    """(seconds left, evals left whose length is still unknown).

    Step time is the mean since the (re)start, evals excluded; each remaining eval costs the mean of the
    evals timed so far. Before the first eval is timed, the evals are left out and counted instead.
    Example: 10 steps in 50 s since step 0, 40 left at 5 s = 200 s, + 2 evals x 12 s = 224 s.
    """
    done = step - start
    if done <= 0:
        return None, evals_left
    left = train_seconds / done * max(0, total - step)
    if eval_seconds and evals_left:
        return left + sum(eval_seconds) / len(eval_seconds) * evals_left, 0
    return left, evals_left


def eta_text(seconds: float | None, unknown_evals: int, evals_left: int) -> str:
    """'ETA 3m05s incl. 3 evals'; before any eval is timed: 'ETA 2m10s + 4 evals (not yet timed)'."""
    if seconds is None:
        return "ETA ?"
    text = f"ETA {format_duration(seconds)}"
    if unknown_evals:
        return text + f" + {unknown_evals} eval{'s' * (unknown_evals > 1)} (not yet timed)"
    return text + (f" incl. {evals_left} eval{'s' * (evals_left > 1)}" if evals_left else "")


class Progress:
    def __init__(self, total: int, start: int = 0, quiet: bool = False, width: int = 24, eval_every: int = 0,
                 smoothing: float = DEFAULT_SMOOTHING):
        self.total, self.start, self.quiet, self.width = total, start, quiet, width
        self.eval_every, self.smoothing = eval_every, smoothing
        self.t0 = time.perf_counter()
        self.eval_seconds: list[float] = []
        self.history: dict[str, list[float]] = {k: [] for k in SMOOTHED}

    @contextlib.contextmanager
    def timing_eval(self) -> Iterator[None]:
        """Wrap a periodic eval: its length feeds the ETA and is kept out of the step time."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.eval_seconds.append(time.perf_counter() - t)

    def eta(self, step: int) -> tuple[float | None, int]:
        train_seconds = time.perf_counter() - self.t0 - sum(self.eval_seconds)
        return eta(step, self.start, self.total, train_seconds, evals_from(step, self.total, self.eval_every),
                   self.eval_seconds)

    def line(self, step: int, metrics: dict) -> str:
        """The bar's text after step `step`; feeds the EMAs, so call it once per step."""
        filled = int(self.width * step / max(self.total, 1))
        bar = ("=" * filled + ">" + " " * (self.width - filled))[:self.width]
        parts = []
        for key in SMOOTHED:
            v = metrics.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.history[key].append(float(v))
            if self.history[key]:
                parts.append(f"{key.split('/')[0]}(ema) {ema(self.history[key], self.smoothing)[-1]:.3f}")
        parts += [f"{k.split('/')[0]} {metrics[k]:.3f}" for k in RAW
                  if isinstance(metrics.get(k), (int, float)) and math.isfinite(metrics[k])]
        seconds, unknown = self.eta(step)
        return (f"step {step}/{self.total} [{bar}] " + "  ".join(parts) + "  "
                + eta_text(seconds, unknown, evals_from(step, self.total, self.eval_every)))

    def update(self, step: int, metrics: dict) -> None:
        if not self.quiet:
            sys.stderr.write("\r" + self.line(step, metrics) + "   ")
            sys.stderr.flush()

    def close(self, message: str) -> None:
        if not self.quiet:
            sys.stderr.write(f"\n{message} ({format_duration(time.perf_counter() - self.t0)})\n")
