"""A whole run: optional SFT warm-up (once, saved atomically), then RL on top of it."""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from ..config import RunConfig
from ..data.splits import load_splits
from ..model.memory.fit import auto_fit
from ..run.checkpoint import WARMUP_DIR
from ..run.distributed import init_from_env, report_failure, shutdown, sync
from ..run.events import EventWriter
from .sft import sft_warmup
from .state import Run
from .train import train


def ensure_warmup(cfg: RunConfig) -> RunConfig:
    """Run the SFT warm-up if the recipe asks for it and it is not on disk yet; RL then starts from it."""
    if cfg.sft.steps <= 0:
        return cfg
    target = cfg.run_dir / WARMUP_DIR
    if not (target / "config.json").is_file():
        tmp = cfg.run_dir / f".tmp-{WARMUP_DIR}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        train_set, _ = load_splits(cfg.data, seed=cfg.train.seed)
        sft_warmup(cfg, train_set, tmp, events=EventWriter(cfg.run_dir / "events.jsonl"))
        os.replace(tmp, target)
    return with_model_path(cfg, target)


def with_model_path(cfg: RunConfig, path: str | Path) -> RunConfig:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(path)),
                               sft=dataclasses.replace(cfg.sft, steps=0))


def run_training(cfg: RunConfig, resume: bool = False, quiet: bool = False) -> Run:
    """One process, or one rank of a torchrun / accelerate job (the launcher's environment says which).

    The SFT warm-up runs on rank 0 alone; the other ranks wait for it and load the same model.
    train.auto_fit then sets the memory settings for this process's card (`model/memory/fit.py`)."""
    ctx = init_from_env()
    try:
        if ctx.is_main:
            warm = ensure_warmup(cfg)
        sync(ctx)
        if not ctx.is_main:
            warm = ensure_warmup(cfg)  # on disk by now: only the path changes
        return train(auto_fit(warm, ranks=ctx.world_size), resume=resume, quiet=quiet, ctx=ctx)
    except Exception as exc:
        failure = report_failure(ctx, exc)  # the other ranks stop too, with this rank's message
        if failure is exc:
            raise
        raise failure from exc
    finally:
        shutdown(ctx)
