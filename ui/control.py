"""Launch / resume / stop decisions: one training process per device slot, never two runs in one directory."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from lite_srpo.config import RunConfig, dump_yaml
from lite_srpo.run.checkpoint import latest_checkpoint

from .process import LAUNCH_RECIPE, device_slots, is_alive, read_record, request_stop, slot_devices, start_training
from .runs import find_runs, summarize

_lock = threading.Lock()  # check-then-spawn must not interleave between two browser sessions


@dataclass
class Outcome:
    ok: bool
    message: str
    run_dir: Path | None = None


def busy_slots(roots: list[str | Path]) -> dict[str, Path]:
    """Slot -> run directory of the live training process holding it."""
    busy: dict[str, Path] = {}
    for run_dir in find_runs(roots):
        record = read_record(run_dir)
        if is_alive(record):
            assert record is not None
            for device in slot_devices(record.slot):  # a multi-process run holds each of its GPUs
                busy[device] = run_dir
    return busy


def free_slot(roots: list[str | Path], nproc: int = 1) -> tuple[str | None, str]:
    """Device slot(s) with no training on them ('cpu', or `nproc` comma-joined GPU ids), or None and a
    sentence saying why. On the CPU, N processes share the one CPU slot (gloo)."""
    busy = busy_slots(roots)
    free = [slot for slot in device_slots() if slot not in busy]
    if free == ["cpu"]:
        return "cpu", ""
    if len(free) >= nproc:
        return ",".join(free[:nproc]), ""
    holders = ", ".join(f"'{p.name}' on {'the CPU' if s == 'cpu' else 'GPU ' + s}" for s, p in busy.items())
    if nproc > 1 and len(device_slots()) >= nproc:
        return None, (f"Not started: {nproc} processes need {nproc} free GPUs, {len(free)} free"
                      + (f" ({holders} training)" if holders else "") + ".")
    if nproc > 1:
        return None, f"Not started: {nproc} processes need {nproc} GPUs; this machine has {len(device_slots())}."
    return None, (f"Not started: {holders} is already training (one run at a time per device). "
                  "Stop it or wait for it to finish.")


def launch(cfg: RunConfig, roots: list[str | Path], cwd: str | Path | None = None, nproc: int = 1) -> Outcome:
    run_dir = cfg.run_dir
    if nproc < 1 or cfg.rollout.prompts_per_step % nproc:
        return Outcome(False, f"Not started: processes={nproc} must be >= 1 and divide rollout.prompts_per_step="
                              f"{cfg.rollout.prompts_per_step} (each process samples whole groups).")
    with _lock:
        slot, why = free_slot(list(roots) + [cfg.output_dir], nproc)
        if slot is None:
            return Outcome(False, why)
        if (run_dir / "events.jsonl").exists() or (run_dir / "checkpoints").exists():
            return Outcome(False, f"Not started: {run_dir} already holds a run. Pick another run name, "
                                  "or select that run and press Resume.", run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        yaml_path = run_dir / LAUNCH_RECIPE
        yaml_path.write_text(dump_yaml(cfg), encoding="utf-8")
        record = start_training(run_dir, yaml_path, cwd=cwd or os.getcwd(), slot=slot, nproc=nproc)
    where = "the CPU" if slot == "cpu" else f"GPU{'s' if ',' in slot else ''} {slot}"
    procs = f"{nproc} processes on " if nproc > 1 else ""
    return Outcome(True, f"Started '{cfg.name}' on {procs}{where} (pid {record.pid}). Log: {run_dir / 'train.log'}",
                   run_dir)


def resume(run_dir: str | Path, roots: list[str | Path]) -> Outcome:
    """Continue from the last checkpoint; a run that crashed before its first checkpoint starts over."""
    run_dir = Path(run_dir)
    with _lock:
        summary = summarize(run_dir)
        if summary.alive:
            return Outcome(False, f"'{run_dir.name}' is still running; nothing to resume.", run_dir)
        if summary.status == "finished":
            return Outcome(False, f"'{run_dir.name}' finished all its steps; launch a new run to train longer.", run_dir)
        yaml_path = run_dir / LAUNCH_RECIPE
        if not yaml_path.is_file():
            yaml_path = run_dir / "recipe.yaml"
        if not yaml_path.is_file():
            return Outcome(False, f"{run_dir}: no launch_recipe.yaml or recipe.yaml to resume from.", run_dir)
        previous = read_record(run_dir)
        nproc = previous.nproc if previous else 1  # --resume needs the process count that wrote the checkpoint
        slot, why = free_slot(list(roots) + [run_dir.parent], nproc)
        if slot is None:
            return Outcome(False, why, run_dir)
        cwd = previous.cwd if previous and Path(previous.cwd).is_dir() else os.getcwd()
        last = latest_checkpoint(run_dir)
        if last is None:
            events = run_dir / "events.jsonl"
            if events.exists():  # keep the failed attempt's events for reading, start a clean stream
                events.rename(run_dir / f"events.failed-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        record = start_training(run_dir, yaml_path, resume=last is not None, cwd=cwd, slot=slot, nproc=nproc)
    if last is None:
        return Outcome(True, f"No checkpoint yet: restarted '{run_dir.name}' from step 0 (pid {record.pid}).", run_dir)
    return Outcome(True, f"Resuming '{run_dir.name}' from {last.name} (pid {record.pid}).", run_dir)


def stop(run_dir: str | Path, now: bool = False) -> Outcome:
    run_dir = Path(run_dir)
    return Outcome(True, request_stop(run_dir, now=now), run_dir)
