"""Learning curves of one or more runs as one PNG (`lite-srpo plot`, `runs/<name>/curves.png`).

Reads only `events.jsonl`, like the UI, so it works on a running, stopped or finished run. Values are
drawn raw, per step; a moving average, when drawn, goes on top and the panel's title says so. A panel
with nothing to show says why in its frame (`panel_notes`), so an empty frame never looks like a bug.
matplotlib is imported inside `write_curves`: importing lite_srpo stays light.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ..errors import LiteSrpoError
from .events import read_events

# panel key -> (title, [(metric key, line style, series name)]); "eval:" / "sft:" read those event types.
PANELS: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "reward": ("reward (mean per step)", [("reward/mean", "-", "reward")]),
    "accuracy": ("sampled accuracy, format rate",
                 [("accuracy", "-", "accuracy"), ("format_rate", "--", "format rate")]),
    "eval": ("held-out eval accuracy", [("eval:accuracy", "-", "accuracy")]),
    "kl": ("KL to reference (k3)", [("kl/k3", "-", "KL")]),
    "length": ("response length (left), truncated fraction (right)",
               [("completion/len_mean", "-", "mean length"), ("completion/truncated_frac", ":", "truncated")]),
    "sft": ("SFT warm-up loss", [("sft:loss", "-", "loss")]),
}
NO_DATA = "no data yet"
FIGSIZE, DPI = (15.0, 8.4), 100  # -> 1500 x 840 pixels


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def series(events: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) sorted by step; the last value wins if a step repeats (e.g. an eval rerun)."""
    type_, field = ("metrics", key)
    if key.startswith(("eval:", "sft:")):
        type_, field = key.split(":", 1)
    by_step: dict[int, float] = {}
    for e in events:
        v = _num(e.get(field))
        if e.get("type") == type_ and isinstance(e.get("step"), int) and v is not None:
            by_step[e["step"]] = v
    return sorted(by_step.items())


def run_config(events: list[dict]) -> dict:
    """The recipe of the last `status` event that carries one (a resume writes it again)."""
    for e in reversed(events):
        if e.get("type") == "status" and isinstance(e.get("config"), dict):
            return e["config"]
    return {}


def panel_notes(events: list[dict]) -> dict[str, str]:
    """Panel key -> why that panel has nothing to show; panels with data are absent.

    The reasons come from the recipe in the events: KL is only computed when algorithm.beta > 0, the
    held-out eval only runs every train.eval_every steps. Otherwise: "no data yet" before the first RL
    step, "not logged by this run" after it.
    """
    cfg = run_config(events)
    beta = _num((cfg.get("algorithm") or {}).get("beta"))
    every = (cfg.get("train") or {}).get("eval_every")
    steps = [e["step"] for e in events if e.get("type") == "metrics" and isinstance(e.get("step"), int)]
    fallback = "not logged by this run" if steps else NO_DATA
    notes: dict[str, str] = {}
    for panel, (_, lines) in PANELS.items():
        if any(series(events, key) for key, _, _ in lines):
            continue
        if panel == "kl" and beta == 0:
            notes[panel] = "KL not computed: algorithm.beta = 0"
        elif panel == "eval" and every == 0:
            notes[panel] = "no held-out eval: train.eval_every = 0"
        elif panel == "eval" and isinstance(every, int) and every > max(steps, default=0):
            notes[panel] = f"no held-out eval yet: the first is at step {every}"
        elif panel == "sft":
            notes[panel] = "no SFT warm-up events in this log"  # the demo rewrites the log after its warm-up
        else:
            notes[panel] = fallback
    return notes


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at each point (fewer at the start): it never looks ahead."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


DEFAULT_SMOOTHING = 0.6  # TensorBoard's default weight: the UI slider's start and the CLI progress line


def ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased so the first points are not pulled
    towards 0. Never looks ahead; non-finite values pass through; a constant series stays exact.

    Example, weight 0.5 on [1, 0, 1]: running 0.5, 0.25, 0.625 / (1 - 0.5**n) = 1, 1/3, 5/7.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    if all(v == values[0] for v in values):
        return list(values)
    out, last, n = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        last = last * weight + (1.0 - weight) * v
        n += 1
        out.append(last / (1.0 - weight ** n))
    return out


def auto_window(n: int) -> int:
    """A light smoothing: none under 20 points, then about a tenth of the points, 3 to 25."""
    return 0 if n < 20 else max(3, min(25, n // 10))


def load_run(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "events.jsonl"
    if not path.is_file():
        where = "no such directory" if not Path(run_dir).is_dir() else "no events.jsonl in it"
        raise LiteSrpoError(f"{run_dir}: {where}; expected a run directory with {path}")
    return read_events(path)


def default_labels(run_dirs: list[Path]) -> list[str]:
    """Run directory names; parent/name where two names collide (e.g. runs/compare/*/srpo)."""
    names = [p.resolve().name for p in run_dirs]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(run_dirs, names)]


def write_curves(run_dirs: list[str | Path], out: str | Path | None = None, labels: list[str] | None = None,
                 *, smooth: int | None = None) -> Path:
    """Draw the runs' learning curves, one colour per run, into a PNG; returns its path.

    `out` defaults to `<first run dir>/curves.png`. `smooth`: moving-average window drawn on top of the raw
    values (None = automatic, 0 = raw only).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise LiteSrpoError("plot: give at least one run directory")
    if labels is not None and len(labels) != len(dirs):
        raise LiteSrpoError(f"plot: {len(labels)} labels for {len(dirs)} runs")
    runs = [load_run(d) for d in dirs]
    labels = list(labels) if labels is not None else default_labels(dirs)
    notes = [panel_notes(events) for events in runs]
    out = Path(out) if out is not None else dirs[0] / "curves.png"

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3).ravel()
    for ax, (panel, (title, lines)) in zip(axes, PANELS.items()):
        shown = [i for i in range(len(runs)) if panel not in notes[i]]
        if not shown:
            reasons = sorted({notes[i][panel] for i in range(len(runs))})
            ax.set_title(title, fontsize=10)
            ax.text(0.5, 0.5, "\n".join(reasons), ha="center", va="center", transform=ax.transAxes,
                    fontsize=11, color="0.35", wrap=True)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        right = ax.twinx() if panel == "length" else None
        n_max = max(len(series(runs[i], key)) for i in shown for key, _, _ in lines)
        window = 0 if panel == "eval" else (auto_window(n_max) if smooth is None else max(0, smooth))
        for i in shown:
            for j, (key, style, _) in enumerate(lines):
                points = series(runs[i], key)
                if not points:
                    continue
                target = right if right is not None and j == 1 else ax
                steps, values = [s for s, _ in points], [v for _, v in points]
                colour = f"C{i % 10}"
                if panel == "eval":
                    target.plot(steps, values, style, marker="o", markersize=4, color=colour, linewidth=1.5)
                    continue
                target.plot(steps, values, style, color=colour, linewidth=1.0, alpha=0.35 if window > 1 else 1.0)
                if window > 1:
                    target.plot(steps, moving_average(values, window), style, color=colour, linewidth=2.0)
        if right is not None:
            right.set_ylim(-0.02, 1.02)
            right.set_ylabel("truncated fraction", fontsize=8)
        protocols = sorted({str(e.get("protocol")) for i in shown for e in runs[i]
                            if e.get("type") == "eval" and e.get("protocol")})
        full = title + (f" ({', '.join(protocols)})" if panel == "eval" and protocols else "")
        if window > 1:
            full += f"\nfaint: per step; bold: mean of last {window} steps"
        ax.set_title(full, fontsize=10)
        # runs without data in this panel say why under it, where no data point can hide behind the words
        missing = "; ".join(f"{labels[i]}: {notes[i][panel]}" for i in range(len(runs)) if i not in shown)
        ax.set_xlabel(("SFT step" if panel == "sft" else "RL step") + (f"\n({missing})" if missing else ""),
                      fontsize=8)
        ax.grid(alpha=0.3)
        if len(lines) > 1:  # which line style is which series
            (right or ax).legend([Line2D([], [], color="0.3", linestyle=s) for _, s, _ in lines],
                                 [n for _, _, n in lines], fontsize=8, loc="best")
    fig.legend([Line2D([], [], color=f"C{i % 10}", linewidth=2.5) for i in range(len(runs))], labels,
               loc="upper center", ncol=min(len(runs), 6), fontsize=10, frameon=False)
    fig.subplots_adjust(left=0.05, right=0.96, bottom=0.07, top=0.88, wspace=0.28, hspace=0.45)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=DPI, format="png")
    os.replace(tmp, out)  # a reader (UI, image viewer) never sees half a file
    return out
