"""Experiment trackers (`train.report_to: [tensorboard, wandb]`): the metrics of events.jsonl, mirrored.

events.jsonl stays the source of truth (the CLI and the UI read it); a tracker gets the same per-step
metrics, held-out evals as their own `eval/...` series, and the recipe as config/hparams. Packages are
imported only when asked for, and a missing one is a config error naming what to install.
TensorBoard writes to `<run>/tensorboard` (purging steps after the resume point, so a resumed or
overwritten run has no duplicate points); wandb writes under `<run>/wandb` and honours WANDB_MODE
(offline works without an account), WANDB_PROJECT (default lite-srpo) and WANDB_ENTITY.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Protocol

from ..config import RunConfig, config_to_dict, dump_yaml
from ..config.validate import tracker_problems
from ..errors import ConfigError


def numeric(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numbers only (NaN/None are gaps, as in events.jsonl); nested dicts become `a/b` keys."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(numeric(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


def flat_config(cfg: RunConfig) -> dict[str, Any]:
    """`section.key` → scalar (lists and dicts as text), the form hparams/config panels show best."""
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict) and k != "weights" and k != "columns":
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk(config_to_dict(cfg), "")
    return out


class Backend(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class TensorBoardBackend:
    def __init__(self, cfg: RunConfig, run_dir: Path, start_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError as exc:
            raise ConfigError(f"train.report_to: tensorboard needs the tensorboard package — pip install "
                              f"tensorboard ({exc})") from None
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)
        self.writer.add_text("recipe", "    " + dump_yaml(cfg).replace("\n", "\n    "), global_step=start_step)
        for summary in hparams({k: v for k, v in flat_config(cfg).items()}, {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # live curves: TensorBoard reads while the run goes on

    def close(self) -> None:
        self.writer.close()


class WandbBackend:
    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise ConfigError(f"train.report_to: wandb needs the wandb package — pip install wandb ({exc})") from None
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lite-srpo"), name=cfg.name, dir=str(run_dir),
                              config=config_to_dict(cfg), settings=wandb.Settings(console="off", silent=True))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Fan-out to every configured backend; with none configured every call is a no-op."""

    def __init__(self, backends: list[Backend]) -> None:
        self.backends = backends

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        values = numeric(metrics)
        for backend in self.backends:
            backend.scalars(step, values)

    def log_eval(self, step: int, result: dict[str, Any]) -> None:
        values = numeric(result, "eval/")
        for backend in self.backends:
            backend.scalars(step, values)

    def close(self) -> None:
        backends, self.backends = self.backends, []
        for backend in backends:
            backend.close()


def open_trackers(cfg: RunConfig, run_dir: str | Path, start_step: int = 0) -> Trackers:
    """The trackers named in `train.report_to`, started (a missing package raises ConfigError)."""
    problems = tracker_problems(cfg.train.report_to)
    if problems:
        raise ConfigError("; ".join(problems))
    run_dir = Path(run_dir)
    backends: list[Backend] = []
    try:
        for name in cfg.train.report_to:
            backends.append(TensorBoardBackend(cfg, run_dir, start_step) if name == "tensorboard"
                            else WandbBackend(cfg, run_dir))
    except BaseException:
        Trackers(backends).close()
        raise
    return Trackers(backends)
