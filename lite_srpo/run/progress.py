"""A one-line progress bar with ETA on stderr, fed by the step metrics."""
from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    def __init__(self, total: int, start: int = 0, quiet: bool = False, width: int = 24):
        self.total, self.start, self.quiet, self.width = total, start, quiet, width
        self.t0 = time.perf_counter()

    def eta(self, step: int) -> float:
        done = step - self.start
        if done <= 0:
            return float("nan")
        return (time.perf_counter() - self.t0) / done * (self.total - step)

    def update(self, step: int, metrics: dict) -> None:
        if self.quiet:
            return
        filled = int(self.width * step / max(self.total, 1))
        bar = "=" * filled + ">" + " " * (self.width - filled)
        parts = [f"{k.split('/')[0] if k.endswith('/mean') else k} {metrics[k]:.3f}"
                 for k in ("reward/mean", "accuracy", "format_rate", "loss/total") if k in metrics]
        eta = self.eta(step)
        eta_text = format_duration(eta) if eta == eta else "?"
        sys.stderr.write(f"\rstep {step}/{self.total} [{bar[:self.width]}] " + "  ".join(parts) + f"  ETA {eta_text}   ")
        sys.stderr.flush()

    def close(self, message: str) -> None:
        if not self.quiet:
            sys.stderr.write(f"\n{message} ({format_duration(time.perf_counter() - self.t0)})\n")
