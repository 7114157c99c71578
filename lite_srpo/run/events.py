"""The run's event stream: one JSON object per line in `runs/<name>/events.jsonl` (DESIGN.md §6).

Types: `status` (started / running / finished / stopped / crashed, with a message), `metrics`
(one per step), `tokens` (per-token role, score, weight and advantage of a few responses), `eval`,
`checkpoint`. The CLI's progress bar and the UI both read this file; nothing else is shared.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every line stays parseable."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class EventWriter:
    """Appends events; each line is flushed and fsynced so a crash loses at most the line being written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, type_: str, step: int | None = None, **payload: Any) -> dict:
        event = {"type": type_, "step": step, "time": time.time(), **_clean(payload)}
        line = json.dumps(event, ensure_ascii=False)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        return event

    def truncate_after(self, step: int) -> None:
        """On resume: drop events of steps after the checkpoint, so the log has no duplicates."""
        if not self.path.exists():
            return
        kept = [e for e in read_events(self.path) if e.get("step") is None or e["step"] <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for e in kept:
                f.write(json.dumps(e, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class NullEvents(EventWriter):
    """What ranks other than 0 write to: nothing (rank 0 alone writes the run's event stream)."""

    def __init__(self) -> None:
        self.path = None

    def write(self, type_: str, step: int | None = None, **payload: Any) -> dict:
        return {"type": type_, "step": step, **payload}

    def truncate_after(self, step: int) -> None:
        return None


def read_events(path: str | Path, offset: int = 0) -> list[dict]:
    return list(iter_events(path, offset)[0])


def iter_events(path: str | Path, offset: int = 0) -> tuple[Iterator[dict], int]:
    """Events from byte `offset` on, and the offset to continue from (a half-written last line waits)."""
    path = Path(path)
    if not path.exists():
        return iter(()), offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    events = []
    for raw in data[:end].splitlines():
        try:
            events.append(json.loads(raw))
        except json.JSONDecodeError:
            continue
    return iter(events), offset + end


def latest(events: list[dict], type_: str) -> dict | None:
    for e in reversed(events):
        if e.get("type") == type_:
            return e
    return None
