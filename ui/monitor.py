"""Event stream → what the Monitor tab shows: status, step / total with ETA, curve data, log tail.

Curves read like TensorBoard: each step series is smoothed (TensorBoard's debiased EMA, `run.plot.ema`)
and drawn over its raw values in a faint tint of the same colour; a chart with no data is not drawn.

`EventTail` follows `events.jsonl` incrementally (a resume rewrites the file, which resets the tail);
everything else is a pure function of the event list so it is tested without a browser.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

import pandas as pd

from lite_srpo.run.plot import ema, panel_notes
from lite_srpo.run.progress import eta as progress_eta
from lite_srpo.run.progress import evals_from

ACTIVE = ("started", "running", "resumed")

# Plot title -> (series label, metric key or key suffix). A suffix (leading '*') matches any prefix,
# so every algorithm that reports a mean weight per role is plotted the same way.
PLOTS: dict[str, list[tuple[str, str]]] = {
    "Reward, accuracy, format rate": [("reward", "reward/mean"), ("accuracy", "accuracy"), ("format rate", "format_rate")],
    "Held-out eval accuracy, format rate": [("eval accuracy", "eval:accuracy"),
                                            ("eval format rate", "eval:format_rate")],
    "Loss": [("loss", "loss/total")],
    "KL to reference (k3)": [("kl", "kl/k3")],
    "Groups with no reward spread (no gradient)": [("zero-spread groups", "groups/zero_spread_frac"),
                                                   ("kept by dynamic sampling", "dynamic_sampling/kept_groups_frac")],
    "Mean token weight per role": [("perception", "*/weight_perception"), ("reasoning", "*/weight_reasoning"),
                                   ("other", "*/weight_other")],
    "Peak memory (GB)": [("peak memory", "mem/peak_gb")],
    "Throughput (tokens/s)": [("generation", "perf/gen_tokens_per_s"), ("update", "perf/update_tokens_per_s")],
    "SFT warm-up loss": [("SFT loss", "sft:loss")],
}
# One point per held-out eval (a full pass over the test items): drawn as points, never smoothed.
POINT_PLOTS = {"Held-out eval accuracy, format rate"}
RAW = " (raw)"  # the raw series of a smoothed one: drawn faint, left out of the legend
PALETTE = ("#2563eb", "#ea580c", "#16a34a", "#9333ea")  # series 1..4 of a chart
# Plots whose emptiness has a reason in the recipe (lite_srpo.run.plot.panel_notes): KL off, eval off, no warm-up.
PLOT_PANEL = {"KL to reference (k3)": "kl", "Held-out eval accuracy, format rate": "eval",
              "SFT warm-up loss": "sft"}


class EventTail:
    """All events of one file so far, read incrementally; thread-safe (Gradio runs handlers in threads).

    `tokens` events (per-token records: the bulk of the file) are kept as stubs with their byte span;
    `load_full` reads one back when the viewer needs it, so memory stays small on long runs.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.events: list[dict] = []
        self._offset = 0
        self._inode: int | None = None
        self._lock = threading.Lock()

    def refresh(self) -> list[dict]:
        with self._lock:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                self.events, self._offset, self._inode = [], 0, None
                return self.events
            if st.st_ino != self._inode or st.st_size < self._offset:  # rewritten (resume truncation) or replaced
                self.events, self._offset, self._inode = [], 0, st.st_ino
            if st.st_size > self._offset:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
                end = data.rfind(b"\n") + 1  # a half-written last line waits for the next refresh
                new, pos = [], self._offset
                for raw in data[:end].split(b"\n")[:-1]:
                    event = _parse(raw)
                    if event is not None:
                        if event.get("type") == "tokens":
                            event = {"type": "tokens", "step": event.get("step"), "time": event.get("time"),
                                     "n_samples": len(event.get("samples") or []), "_at": (pos, len(raw))}
                        new.append(event)
                    pos += len(raw) + 1
                self.events = self.events + new
                self._offset += end
            return self.events

    def load_full(self, stub: dict) -> dict | None:
        """The whole event behind a `tokens` stub (None if the file was rewritten meanwhile)."""
        if "_at" not in stub:
            return stub
        start, length = stub["_at"]
        try:
            with open(self.path, "rb") as f:
                f.seek(start)
                event = _parse(f.read(length))
        except OSError:
            return None
        return event if event is not None and event.get("step") == stub.get("step") else None


def _parse(raw: bytes) -> dict | None:
    try:
        event = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return event if isinstance(event, dict) else None


_tails: dict[str, EventTail] = {}
_tails_lock = threading.Lock()


def tail_of(run_dir: str | Path) -> EventTail:
    """The run's tail, shared by every browser session."""
    key = str(Path(run_dir).resolve())
    with _tails_lock:
        return _tails.setdefault(key, EventTail(Path(key) / "events.jsonl"))


def events_of(run_dir: str | Path) -> list[dict]:
    return tail_of(run_dir).refresh()


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def run_state(events: list[dict]) -> dict:
    """Status, step, totals and ETA from the events alone (process liveness is added by the caller)."""
    state = {"status": "created", "message": "", "step": 0, "total_steps": None, "eta_s": None,
             "phase": "rl", "sft_step": 0, "sft_total": None, "last_metrics": {}, "algorithm": None, "model": None,
             "status_time": None, "sft_time": None}
    anchor: dict | None = None  # the status event the current stretch of steps started from
    last_metrics: dict | None = None
    for e in events:
        kind = e.get("type")
        if kind == "status":
            state["status"] = e.get("status", state["status"])
            state["message"] = e.get("message") or ""
            state["status_time"] = e.get("time")
            if e.get("total_steps") is not None:
                state["total_steps"] = e["total_steps"]
            cfg = e.get("config") or {}
            state["algorithm"] = (cfg.get("algorithm") or {}).get("name", state["algorithm"])
            state["model"] = (cfg.get("model") or {}).get("path", state["model"])
            if e.get("status") in ACTIVE:
                anchor = e
                state["phase"] = "rl"
        elif kind == "metrics" and e.get("step") is not None:
            last_metrics = e
            state["step"] = e["step"]
        elif kind == "sft":
            state["phase"] = "sft" if state["status"] not in ("running", "resumed") else state["phase"]
            state["sft_step"], state["sft_total"] = e.get("step") or 0, e.get("total_steps")
            state["sft_time"] = e.get("time")
    if last_metrics is not None:
        state["last_metrics"] = {k: v for k, v in last_metrics.items() if k not in ("type", "time", "step")}
    every = ((anchor or {}).get("config") or {}).get("train", {}).get("eval_every") or 0
    state["eta_s"] = (eta_seconds(anchor, last_metrics, state["total_steps"], events, every)
                      if state["status"] in ACTIVE else None)
    return state


def eval_durations(events: list[dict]) -> dict[int, float]:
    """Step -> seconds of the held-out eval after that step: from its step's metrics event to the eval event."""
    ends = {e["step"]: e.get("time") for e in events if e.get("type") == "metrics" and e.get("step") is not None}
    return {e["step"]: e["time"] - ends[e["step"]] for e in events
            if e.get("type") == "eval" and _num(e.get("time")) is not None and _num(ends.get(e.get("step"))) is not None}


def eta_seconds(anchor: dict | None, last: dict | None, total: int | None, events: list[dict] = (),
                eval_every: int = 0) -> float | None:
    """Seconds per step since the (re)start, evals left out, × steps left, + the evals still to come at the
    mean length of those done (the CLI's `run.progress.eta`); None before the first step.

    Example: started at step 2 at t=100, step 5 done at t=130 → 10 s/step; total 10 → ETA 50 s.
    """
    if anchor is None or last is None or total is None:
        return None
    s0, s1 = anchor.get("step") or 0, last.get("step") or 0
    t0, t1 = anchor.get("time"), last.get("time")
    if s1 <= s0 or t0 is None or t1 is None or t1 < t0:
        return None
    evals = eval_durations(list(events))
    inside = sum(d for step, d in evals.items() if s0 < step < s1)  # evals between the anchor and the last step
    left = evals_from(s1, total, eval_every) - (1 if s1 in evals else 0)
    return progress_eta(s1, s0, total, (t1 - t0) - inside, left, list(evals.values()))[0]


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _series_values(events: list[dict], key: str) -> list[tuple[int, float]]:
    if key.startswith(("sft:", "eval:")):  # fields of `sft` / `eval` events rather than of `metrics`
        kind, field = key.split(":", 1)
        return [(e["step"], v) for e in events if e.get("type") == kind and e.get("step") is not None
                for v in [_num(e.get(field))] if v is not None]
    out = []
    for e in events:
        if e.get("type") != "metrics" or e.get("step") is None:
            continue
        if key.startswith("*/"):
            vals = [_num(v) for k, v in e.items() if k.endswith(key[1:])]
            vals = [v for v in vals if v is not None]
            v = vals[0] if vals else None
        else:
            v = _num(e.get(key))
        if v is not None:
            out.append((e["step"], v))
    return out


def curve_frame(events: list[dict], series: list[tuple[str, str]], smoothing: float = 0.0) -> pd.DataFrame:
    """Long format for gr.LinePlot: one row per (step, series) with a finite value.

    With `smoothing` > 0 each series is its EMA, and its raw values come as "<label> (raw)": every raw
    series first, so they are drawn behind the smoothed lines."""
    raw, rows = [], []
    for label, key in series:
        points = _series_values(events, key)
        if smoothing > 0 and points:
            raw += [(step, v, label + RAW) for step, v in points]
            rows += [(step, v, label) for (step, _), v in zip(points, ema([v for _, v in points], smoothing))]
        else:
            rows += [(step, v, label) for step, v in points]
    rows = raw + rows
    return pd.DataFrame(rows, columns=["step", "value", "series"]).astype({"step": "int64", "value": "float64"})


def faint(colour: str, strength: float = 0.3) -> str:
    """The colour mixed with white: the tint a raw series is drawn in behind its smoothed line."""
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return "#" + "".join(f"{round(255 - (255 - c) * strength):02x}" for c in (r, g, b))


def colour_map(series: list[tuple[str, str]]) -> dict[str, str]:
    """Each series' colour, and the faint tint of it for its raw values."""
    out = {}
    for (label, _), colour in zip(series, PALETTE):
        out[label], out[label + RAW] = colour, faint(colour)
    return out


def chart_notes(events: list[dict]) -> dict[str, str]:
    """Plot title -> why that chart is empty (e.g. "KL not computed: algorithm.beta = 0"); charts with data
    are absent. An empty frame alone reads like a bug; the recipe usually says why there is nothing."""
    panels = panel_notes(events)
    started = any(e.get("type") == "metrics" for e in events)
    algorithm = run_state(events)["algorithm"]
    fallback = "not logged by this run" if started else "no data yet"
    notes = {title: panels.get(PLOT_PANEL.get(title, ""), fallback)
             for title, series in PLOTS.items() if not any(_series_values(events, key) for _, key in series)}
    if started and algorithm and algorithm != "srpo" and "Mean token weight per role" in notes:
        notes["Mean token weight per role"] = f"only SRPO weights tokens by role (this run: {algorithm})"
    return notes


def compare_frame(runs: list[tuple[str, list[dict]]], key: str) -> pd.DataFrame:
    """One metric of several runs on one plot: series = run label."""
    rows = [(step, value, label) for label, events in runs for step, value in _series_values(events, key)]
    return pd.DataFrame(rows, columns=["step", "value", "series"]).astype({"step": "int64", "value": "float64"})


def metric_keys(events: list[dict]) -> list[str]:
    """Every numeric metric key seen, in first-seen order (for the comparison selector)."""
    keys: dict[str, None] = {}
    for e in events:
        if e.get("type") == "metrics":
            for k, v in e.items():
                if k not in ("type", "step", "time") and _num(v) is not None:
                    keys.setdefault(k, None)
    return list(keys)


def log_tail(path: str | Path, max_chars: int = 6000) -> str:
    """The end of a log; carriage-return progress bars keep only their last state per line."""
    path = Path(path)
    if not path.is_file():
        return ""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - max_chars * 2))
        text = f.read().decode("utf-8", errors="replace")
    lines = [line.rstrip("\r").split("\r")[-1] for line in text.split("\n")]
    return "\n".join(lines)[-max_chars:]


def _fmt(v, spec: str = ".3f") -> str:
    return "-" if _num(v) is None else format(float(v), spec)


def event_line(e: dict) -> str | None:
    """One event as a log line (None for bulk events such as per-token records)."""
    kind, step = e.get("type"), e.get("step")
    clock = time.strftime("%H:%M:%S", time.localtime(e["time"])) if _num(e.get("time")) is not None else "--:--:--"
    if kind == "metrics":
        text = (f"step {step}  reward {_fmt(e.get('reward/mean'))}  accuracy {_fmt(e.get('accuracy'))}  "
                f"format {_fmt(e.get('format_rate'))}  no-spread groups {_fmt(e.get('groups/zero_spread_frac'), '.0%')}  "
                f"loss {_fmt(e.get('loss/total'), '.4g')}  "
                f"({_fmt(e.get('time/step'), '.1f')} s)")
    elif kind == "eval":
        text = (f"eval at step {step}: accuracy {_fmt(e.get('accuracy'))}, format rate {_fmt(e.get('format_rate'))}"
                + (f" ({e['protocol']})" if e.get("protocol") else ""))
    elif kind == "status":
        text = f"{e.get('status')} at step {step}" + (f": {e['message']}" if e.get("message") else "")
    elif kind == "sft":
        text = f"SFT warm-up step {step}/{e.get('total_steps')}  loss {_fmt(e.get('loss'), '.4f')}"
    elif kind == "checkpoint":
        text = f"checkpoint at step {step}: {e.get('path')}"
    elif kind == "warning":
        text = f"warning at step {step}: {e.get('message')}"
    else:
        return None
    return f"{clock} {text}"


EVENTS_LOG_NOTE = "(no train.log: this run was not started from this UI; lines from its events.jsonl)"


def events_log(events: list[dict], max_lines: int = 200) -> str:
    """A readable log of the run from its events alone: the log tail of runs started from the CLI."""
    lines: list[str] = []
    for e in reversed(events):
        line = event_line(e)
        if line is not None:
            lines.append(line)
            if len(lines) == max_lines:
                break
    return "\n".join([EVENTS_LOG_NOTE, *reversed(lines)]) if lines else ""
