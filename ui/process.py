"""Training and export processes started by the UI: spawn detached, record, re-attach, signal.

A training process runs in its own session (`start_new_session=True`), so closing the browser or the
UI does not kill it. Its pid and start time go to `runs/<name>/ui_process.json`; a restarted UI reads
that file and re-attaches. The start time guards against a recycled pid.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from lite_srpo import errors

PROCESS_FILE = "ui_process.json"
LOG_FILE = "train.log"
LAUNCH_RECIPE = "launch_recipe.yaml"
PACKAGE_ROOT = Path(errors.__file__).resolve().parents[1]  # the directory that holds lite_srpo/

# Processes this UI started: polled so exited children are reaped (no zombies) and their exit code kept.
_children: dict[int, subprocess.Popen] = {}


@dataclass
class ProcessRecord:
    pid: int
    create_time: float
    cmd: list[str]
    cwd: str
    started: float
    log: str
    resume: bool = False
    slot: str = "cpu"
    stop_requests: int = 0
    nproc: int = 1
    returncode: int | None = None
    extra: dict = field(default_factory=dict)


def train_command(yaml_path: str | Path, resume: bool = False, nproc: int = 1) -> list[str]:
    """`lite-srpo train YAML [--resume] [--nproc N]`; N > 1 starts N data-parallel processes via torchrun."""
    cmd = [sys.executable, "-m", "lite_srpo", "train", str(yaml_path)]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    return cmd + ["--resume"] if resume else cmd


def slot_devices(slot: str) -> list[str]:
    """A slot is 'cpu' or comma-separated GPU ids ('0' or '0,1' for a 2-process run)."""
    return [s for s in slot.split(",") if s]


def child_env(slot: str) -> dict[str, str]:
    """The UI's environment, lite_srpo importable from any cwd, and the GPU of the slot (if any)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if slot != "cpu":
        env["CUDA_VISIBLE_DEVICES"] = slot
    return env


def spawn(cmd: list[str], log_path: str | Path, cwd: str | Path, slot: str = "cpu") -> tuple[subprocess.Popen, ProcessRecord]:
    """Start `cmd` detached (own session), stdout+stderr appended to `log_path`; never through a shell."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, cwd=str(cwd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=child_env(slot), start_new_session=True)
    _children[proc.pid] = proc
    try:
        created = psutil.Process(proc.pid).create_time()
    except psutil.Error:  # already gone: keep the record; liveness checks will say so
        created = time.time()
    record = ProcessRecord(pid=proc.pid, create_time=created, cmd=list(cmd), cwd=str(cwd), started=time.time(),
                           log=str(log_path), slot=slot)
    return proc, record


def write_record(run_dir: str | Path, record: ProcessRecord) -> None:
    path = Path(run_dir) / PROCESS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(record), indent=1), encoding="utf-8")
    os.replace(tmp, path)


def read_record(run_dir: str | Path) -> ProcessRecord | None:
    path = Path(run_dir) / PROCESS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ProcessRecord(**data)
    except (OSError, ValueError, TypeError):
        return None


def start_training(run_dir: str | Path, yaml_path: str | Path, *, resume: bool = False, cwd: str | Path | None = None,
                   slot: str = "cpu", nproc: int = 1) -> ProcessRecord:
    run_dir = Path(run_dir)
    _, record = spawn(train_command(yaml_path, resume, nproc), run_dir / LOG_FILE, cwd or os.getcwd(), slot)
    record.resume = resume
    record.nproc = nproc
    write_record(run_dir, record)
    return record


def is_alive(record: ProcessRecord | None) -> bool:
    if record is None:
        return False
    child = _children.get(record.pid)
    if child is not None:  # our own child: waitpid is exact (psutil can fail on a process mid-exit)
        return child.poll() is None
    try:
        proc = psutil.Process(record.pid)
        if abs(proc.create_time() - record.create_time) > 1.0:
            return False  # the pid was recycled by another process
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def exit_code(record: ProcessRecord | None) -> int | None:
    """Exit code of a process this UI started (None if still running or started by an earlier UI)."""
    if record is None:
        return None
    child = _children.get(record.pid)
    return None if child is None else child.poll()


def request_stop(run_dir: str | Path, now: bool = False) -> str:
    """SIGINT: the run finishes its step, checkpoints and exits 0. A second SIGINT (or `now`) stops at once."""
    record = read_record(run_dir)
    if not is_alive(record):
        return "no training process is running for this run"
    assert record is not None
    signals = max(1, 2 - record.stop_requests) if now else 1
    try:
        for k in range(signals):
            if k:
                time.sleep(0.3)  # let the first signal's handler run before the second arrives
            os.kill(record.pid, signal.SIGINT)
            record.stop_requests += 1
    except ProcessLookupError:
        return "the training process has already exited"
    finally:
        write_record(run_dir, record)
    if record.stop_requests == 1:
        return "stop requested: the run finishes its current step, writes a checkpoint and exits"
    return "stopping now: the current step is abandoned; the last checkpoint is intact"


def wait_exit(record: ProcessRecord, timeout: float) -> bool:
    """True once the process has exited (used by tests and by the UI's shutdown)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not is_alive(record):
            return True
        time.sleep(0.1)
    return not is_alive(record)


def device_slots() -> list[str]:
    """One slot per visible GPU (its CUDA_VISIBLE_DEVICES id), or ['cpu'] without one."""
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 — no torch or a broken driver: plan for the CPU
        count = 0
    if count == 0:
        return ["cpu"]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else [str(i) for i in range(count)]
    return ids[:count]
