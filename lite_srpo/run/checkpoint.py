"""Atomic checkpoints and exact resume: adapter, optimizer, scheduler, every RNG, step.

A save writes `checkpoints/.tmp-step_<N>-<pid>/`, fsyncs every file, then renames it to
`step_<N>`; a kill at any moment leaves either the old set or the new one, never a half-written
`step_<N>`. Old checkpoints are first renamed to `.del-…` and only then deleted, so a half-deleted
one is never listed. Model weights are safetensors; trainer state loads with `weights_only=True`.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LiteSrpoError

STATE_FILE = "trainer_state.pt"
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
WARMUP_DIR = "warmup_model"  # in the run directory: the SFT warm-up's model, RL starts from it
STEP_KEY, OPTIMIZER_KEY, SCHEDULER_KEY, RNG_KEY, EXTRA_KEY = "step", "optimizer", "scheduler", "rng", "extra"

# `step_000012`, or `.old-step_000012-<pid>`: the previous copy of a step being re-saved (see `_publish`).
_NAME = re.compile(r"^(?P<old>\.old-)?step_(?P<step>\d+)(?(old)-\d+)$")


def rng_state() -> dict[str, Any]:
    """Torch (also drives sampling in `generate`), CUDA, numpy and python RNGs, as tensors and plain types."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and (path / ADAPTER_DIR / ADAPTER_WEIGHTS).is_file()


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. A step whose re-save was interrupted mid-swap is listed under
    its `.old-` name, so it is never lost."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    by_step: dict[int, Path] = {}
    for p in root.iterdir():
        match = _NAME.match(p.name)
        if not match or not p.is_dir() or not _is_complete(p):
            continue
        step = int(match.group("step"))
        if step not in by_step or not match.group("old"):  # the published name wins over a leftover copy
            by_step[step] = p
    return [by_step[s] for s in sorted(by_step)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, recipe_yaml: str, metrics: dict | None = None, extra: dict | None = None,
                    keep_last: int = 3) -> Path:
    """Write `checkpoints/step_<step>` atomically and prune to the last `keep_last`.

    A failed write (disk full, permissions) removes the partial copy and raises a LiteSrpoError; the
    checkpoints already on disk are untouched.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _recover_swaps(root)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        _write_adapter(model, tmp)
        _write_state(tmp / STATE_FILE, {
            STEP_KEY: step, OPTIMIZER_KEY: optimizer.state_dict(),
            SCHEDULER_KEY: scheduler.state_dict() if scheduler is not None else None,
            RNG_KEY: rng_state(), EXTRA_KEY: extra or {}})
        (tmp / RECIPE_FILE).write_text(recipe_yaml, encoding="utf-8")
        (tmp / METRICS_FILE).write_text(json.dumps(metrics or {}, indent=1, default=float), encoding="utf-8")
        _fsync_tree(tmp)
        _publish(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LiteSrpoError(_save_error(exc, step, root)) from exc
    _prune(root, keep_last)
    return final


def _write_adapter(model: torch.nn.Module, directory: Path) -> None:
    model.save_pretrained(str(directory / ADAPTER_DIR), safe_serialization=True)


def _write_state(path: Path, state: dict[str, Any]) -> None:
    torch.save(state, path)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [*[p for p in path.rglob("*") if p.is_dir()], path]:
        _fsync_dir(d)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished copy into place. Re-saving an existing step needs two renames (a directory
    cannot be replaced in one); between them the old copy is `.old-step_<N>-<pid>`, still listed."""
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        _discard(old)
    else:
        os.rename(tmp, final)
        _fsync_dir(final.parent)


def _recover_swaps(root: Path) -> None:
    """Finish a re-save that a kill interrupted between its two renames."""
    for old in root.glob(".old-step_*"):
        match = _NAME.match(old.name)
        final = root / f"step_{int(match.group('step')):06d}" if match else None
        if final is not None and not _is_complete(final) and _is_complete(old):
            if final.exists():
                _discard(final)
            os.rename(old, final)
        else:
            _discard(old)


def _discard(path: Path) -> None:
    """Rename out of the listing first (atomic), then delete: a kill mid-delete leaves only a `.del-` dir."""
    doomed = path.with_name(f".del-{path.name.lstrip('.')}-{os.getpid()}")
    try:
        os.rename(path, doomed)
    except OSError:
        return
    _remove_tree(doomed)


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _prune(root: Path, keep_last: int) -> None:
    """Drop all but the newest `keep_last` checkpoints, and leftovers of interrupted saves and deletes."""
    for stale in checkpoint_dirs(root.parent)[:-keep_last]:
        _discard(stale)
    for leftover in [*root.glob(".tmp-step_*"), *root.glob(".del-*")]:
        _remove_tree(leftover)


def _save_error(exc: OSError, step: int, root: Path) -> str:
    code = errno.errorcode.get(exc.errno or 0, "")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space on that disk, lower train.keep_last, or set output_dir to a bigger disk"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make {root} writable or set output_dir to a writable directory"
    else:
        fix = "check the disk and output_dir"
    latest = latest_checkpoint(root.parent) if root.is_dir() else None
    kept = f"the last good checkpoint is {latest}" if latest else "no earlier checkpoint exists"
    return (f"cannot write checkpoint step {step} under {root}: {exc.strerror or exc} ({code or 'OSError'}); "
            f"{fix}. The partial copy was removed; {kept}.")


def load_adapter_weights(model: torch.nn.Module, ckpt: Path) -> None:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = ckpt / ADAPTER_DIR / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise LiteSrpoError(f"{ckpt}: no adapter weights ({weights.name} missing)")
    result = set_peft_model_state_dict(model, load_file(str(weights)))
    if getattr(result, "unexpected_keys", None):
        raise LiteSrpoError(f"{ckpt}: adapter does not match the model (unexpected keys such as "
                            f"{result.unexpected_keys[0]})")


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """Optimizer/scheduler/RNG state; `weights_only=True` so a checkpoint cannot run code."""
    path = Path(ckpt) / STATE_FILE
    if not path.is_file():
        raise LiteSrpoError(f"{ckpt}: not a checkpoint ({STATE_FILE} missing)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise LiteSrpoError(f"{path}: refused to load: it holds Python objects other than tensors and plain "
                            f"data, which could run code ({str(exc).splitlines()[0]}). Only load checkpoints "
                            "written by lite-srpo from a source you trust.") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise LiteSrpoError(f"{path}: unreadable or truncated ({str(exc).splitlines()[0]}); resume from an "
                            "earlier checkpoint") from None
    if not isinstance(state, dict) or STEP_KEY not in state:
        raise LiteSrpoError(f"{path}: not a lite-srpo trainer state (no {STEP_KEY!r} key)")
    return state


def restore(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    state = load_trainer_state(ckpt)  # first: a refused or broken state must not leave half-restored weights
    load_adapter_weights(model, ckpt)
    optimizer.load_state_dict(state[OPTIMIZER_KEY])
    if scheduler is not None and state[SCHEDULER_KEY] is not None:
        scheduler.load_state_dict(state[SCHEDULER_KEY])
    set_rng_state(state[RNG_KEY])
    return state
