"""Checks before training starts, so a run does not die at its first checkpoint hours in.

`check_output_dir` (before the model loads): the run directory can be created and written.
`check_disk_space` (once the adapter size is known): the disk holds `keep_last` checkpoints plus the
one being written. What cannot be foreseen (the disk filling up during the run) is handled by
`save_checkpoint`, which leaves the earlier checkpoints intact.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from ..errors import LiteSrpoError
from .checkpoint import checkpoint_dirs

_FIXED_BYTES = 1 << 20  # recipe, metrics, adapter config, RNG states, file-format overhead


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(run_dir: str | Path) -> None:
    """Create `run_dir` and prove a file can be written and fsynced there; errors name the path and the fix."""
    run_dir = Path(run_dir)
    base = _existing_ancestor(run_dir)
    if not base.is_dir():
        raise LiteSrpoError(f"output_dir: cannot create {run_dir}: {base} is a file, not a directory; "
                            "set output_dir (or name) to a directory path")
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            with open(probe, "wb") as f:
                f.write(b"lite-srpo")
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as exc:
        why = exc.strerror or str(exc)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = "free space on that disk or set output_dir to another disk"
        else:
            fix = "make it writable (permissions, read-only mount) or set output_dir to a writable directory"
        raise LiteSrpoError(f"output_dir: cannot write to {run_dir}: {why}; {fix}") from None


def checkpoint_bytes(trainable_params: int, optimizer: object = "adamw") -> int:
    """Upper estimate of one checkpoint: fp32 adapter (4 B/param) + optimizer state + fixed files.

    `optimizer` is a recipe name or the optimizer itself; AdamW keeps two fp32 moments (8 B/param),
    the bitsandbytes 8-bit ones two bytes.
    """
    name = optimizer if isinstance(optimizer, str) else type(optimizer).__name__
    state = 2 if "8bit" in name.lower() else 8
    return trainable_params * (4 + state) + _FIXED_BYTES


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def check_disk_space(run_dir: str | Path, per_checkpoint: int, keep_last: int) -> int:
    """Raise unless the disk under `run_dir` has room for the checkpoints still to come: at the peak
    `keep_last + 1` exist (the newest is written before the oldest is pruned), and those already on
    disk (a resumed run) count towards them. Returns the bytes needed."""
    existing = len(checkpoint_dirs(run_dir))
    need = per_checkpoint * max(1, keep_last + 1 - existing)
    free = shutil.disk_usage(_existing_ancestor(Path(run_dir))).free
    if free < need:
        raise LiteSrpoError(
            f"output_dir: {run_dir} has {_human(free)} free, but checkpoints need about {_human(need)} more "
            f"(train.keep_last={keep_last} kept + 1 being written, {existing} already there; "
            f"~{_human(per_checkpoint)} each: adapter + optimizer state). "
            "Free space, lower train.keep_last, or set output_dir to a bigger disk.")
    return need


def preflight(run_dir: str | Path, trainable_params: int, keep_last: int, optimizer: object = "adamw") -> int:
    """Both checks, for callers that know the adapter size; returns the estimated bytes needed."""
    check_output_dir(run_dir)
    return check_disk_space(run_dir, checkpoint_bytes(trainable_params, optimizer), keep_last)
