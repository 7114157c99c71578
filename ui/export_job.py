"""Export from the UI: `python -m lite_srpo export SOURCE --mode adapter|merged --out DIR` as a child process.

The record (`ui_export.json`) and log (`export.log`) sit in the run directory, so progress survives a
page reload and the result (output path, files) is shown when the process ends.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .monitor import format_duration, log_tail
from .process import ProcessRecord, exit_code, is_alive, spawn

EXPORT_FILE = "ui_export.json"
EXPORT_LOG = "export.log"
MODES = ("adapter", "merged")


def export_command(source: str | Path, mode: str, out_dir: str | Path, force: bool = False) -> list[str]:
    if mode not in MODES:
        raise ValueError(f"export mode {mode!r}: use adapter or merged")
    cmd = [sys.executable, "-m", "lite_srpo", "export", str(source), "--mode", mode, "--out", str(out_dir)]
    return cmd + ["--force"] if force else cmd


def default_out_dir(run_dir: str | Path, source: str | Path, mode: str) -> Path:
    tag = Path(source).name if Path(source).name.startswith("step_") else "last"
    return Path(run_dir) / "exports" / f"{tag}_{mode}"


def _read(run_dir: Path) -> ProcessRecord | None:
    try:
        return ProcessRecord(**json.loads((run_dir / EXPORT_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


def start_export(run_dir: str | Path, source: str | Path, mode: str, out_dir: str | Path, force: bool = False) -> str:
    run_dir = Path(run_dir)
    current = _read(run_dir)
    if is_alive(current):
        return f"an export of this run is already running (pid {current.pid})"
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        return f"{out_dir} exists and is not empty: tick 'overwrite' or choose another directory"
    _, record = spawn(export_command(source, mode, out_dir, force), run_dir / EXPORT_LOG, os.getcwd())
    record.extra = {"mode": mode, "out": str(out_dir.resolve()), "source": str(source)}
    tmp = run_dir / (EXPORT_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=1), encoding="utf-8")
    os.replace(tmp, run_dir / EXPORT_FILE)
    return f"exporting {Path(source).name} ({mode}) to {out_dir} (pid {record.pid})"


def export_status(run_dir: str | Path) -> tuple[str, str]:
    """(status markdown, log tail) of the run's latest export."""
    run_dir = Path(run_dir)
    record = _read(run_dir)
    if record is None:
        return "no export yet", ""
    out = Path(record.extra.get("out", ""))
    tail = log_tail(run_dir / EXPORT_LOG, 4000)
    if is_alive(record):
        return (f"⏳ exporting ({record.extra.get('mode')}) … {format_duration(time.time() - record.started)} "
                f"elapsed → `{out}`"), tail
    code = exit_code(record)
    files = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if files and code in (0, None):
        return f"✅ exported ({record.extra.get('mode')}) to `{out}`: {', '.join(files[:12])}", tail
    return f"❌ export failed (exit code {code if code is not None else '?'}); see the log below", tail
