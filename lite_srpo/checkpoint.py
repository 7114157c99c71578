"""Atomic checkpoints and exact resume: adapter, optimizer, scheduler, every RNG, step.

A checkpoint is written into a temporary directory, every file fsynced, then renamed to
`checkpoints/step_<N>`; a kill at any moment leaves either the old set or the new one, never a
half-written `step_<N>`. Model weights are safetensors; trainer state loads with `weights_only=True`.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import LiteSrpoError

STATE_FILE = "trainer_state.pt"
ADAPTER_DIR = "adapter"
RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.json"
STEP_KEY, OPTIMIZER_KEY, SCHEDULER_KEY, RNG_KEY, EXTRA_KEY = "step", "optimizer", "scheduler", "rng", "extra"


def rng_state() -> dict[str, Any]:
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


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [path, *[p for p in path.rglob("*") if p.is_dir()]]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / STATE_FILE).is_file()]
    return sorted(dirs, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, recipe_yaml: str, metrics: dict | None = None, extra: dict | None = None,
                    keep_last: int = 3) -> Path:
    """Write `checkpoints/step_<step>` atomically and prune to the last `keep_last`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_pretrained(str(tmp / ADAPTER_DIR), safe_serialization=True)
    torch.save({STEP_KEY: step, OPTIMIZER_KEY: optimizer.state_dict(),
                SCHEDULER_KEY: scheduler.state_dict() if scheduler is not None else None,
                RNG_KEY: rng_state(), EXTRA_KEY: extra or {}}, tmp / STATE_FILE)
    (tmp / RECIPE_FILE).write_text(recipe_yaml, encoding="utf-8")
    (tmp / METRICS_FILE).write_text(json.dumps(metrics or {}, indent=1, default=float), encoding="utf-8")
    _fsync_tree(tmp)
    if final.exists():  # re-saving the same step (e.g. a resumed run stopping at once): swap atomically
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    for stale in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    for leftover in root.glob(".tmp-step_*"):
        if leftover != tmp:
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_adapter_weights(model: torch.nn.Module, ckpt: Path) -> None:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = ckpt / ADAPTER_DIR / "adapter_model.safetensors"
    if not weights.is_file():
        raise LiteSrpoError(f"{ckpt}: no adapter weights ({weights.name} missing)")
    result = set_peft_model_state_dict(model, load_file(str(weights)))
    if getattr(result, "unexpected_keys", None):
        raise LiteSrpoError(f"{ckpt}: adapter does not match the model (unexpected keys such as "
                            f"{result.unexpected_keys[0]})")


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """Optimizer/scheduler/RNG state; `weights_only=True` so a checkpoint cannot run code."""
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)


def restore(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    load_adapter_weights(model, ckpt)
    state = load_trainer_state(ckpt)
    optimizer.load_state_dict(state[OPTIMIZER_KEY])
    if scheduler is not None and state[SCHEDULER_KEY] is not None:
        scheduler.load_state_dict(state[SCHEDULER_KEY])
    set_rng_state(state[RNG_KEY])
    return state
