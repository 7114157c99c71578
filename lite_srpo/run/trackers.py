"""Experiment trackers (`train.report_to: [tensorboard, wandb]`): the metrics of events.jsonl, mirrored.

events.jsonl stays the source of truth (the CLI and the UI read it); a tracker gets the same per-step
metrics, held-out evals as their own `eval/...` series, and the recipe as config/hparams. Packages are
imported only when asked for, and a missing one is a config error naming what to install.
TensorBoard writes to `<run>/tensorboard` (purging steps after the resume point, so a resumed or
overwritten run has no duplicate points); wandb writes under `<run>/wandb` and honours WANDB_MODE
(offline works without an account), WANDB_PROJECT (default lite-srpo) and WANDB_ENTITY. A resumed run
(start_step > 0) continues the wandb run recorded in `<run>/wandb/lite_srpo_run.json` (id and last step
logged) with resume="allow", skipping the steps that run already has. `train.log_completions_every`
tables (rows from `rl/completions.py`) go to wandb as a `wandb.Table` and to TensorBoard as a markdown
text table plus one image per prompt.
"""
from __future__ import annotations

import json
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


def table_columns(rows: list[dict]) -> list[str]:
    """The completions table's columns: the first row's keys (every row has the same ones)."""
    return list(rows[0]) if rows else []


def _markdown_cell(value: Any) -> str:
    """A table cell that TensorBoard's markdown shows as written: HTML and markdown characters escaped."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for ch in "\\`*_[]|":
        text = text.replace(ch, "\\" + ch)
    return text.replace("\r", "").replace("\n", "<br>")


def markdown_table(rows: list[dict], image_tag: str = "completions/prompt_{}") -> str:
    """The rows as one markdown table; the image column names the TensorBoard image of its prompt."""
    columns = table_columns(rows)
    lines = ["| " + " | ".join(_markdown_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [image_tag.format(row["prompt"]) if c == "image" and row[c] is not None else row[c] for c in columns]
        lines.append("| " + " | ".join(_markdown_cell(v) for v in cells) + " |")
    return "\n".join(lines)


class Backend(Protocol):
    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def completions(self, step: int, rows: list[dict]) -> None: ...
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

    def completions(self, step: int, rows: list[dict]) -> None:
        import numpy as np

        self.writer.add_text("completions", markdown_table(rows), global_step=step)
        for row in rows:
            if row["sample"] == 0 and row.get("image") is not None:
                self.writer.add_image(f"completions/prompt_{row['prompt']}", np.asarray(row["image"].convert("RGB")),
                                      global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


WANDB_STATE = "lite_srpo_run.json"  # in <run>/wandb: the wandb run's id and the last step it has


class WandbBackend:
    def __init__(self, cfg: RunConfig, run_dir: Path, start_step: int = 0) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise ConfigError(f"train.report_to: wandb needs the wandb package — pip install wandb ({exc})") from None
        self.wandb = wandb
        self.state_path = run_dir / "wandb" / WANDB_STATE
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        previous = read_wandb_state(run_dir) if start_step > 0 else None
        resume = dict(id=previous["id"], resume="allow") if previous else {}
        # steps the previous process already sent (it may have run past its last checkpoint): exact
        # resume recomputes them identically, and wandb refuses a step lower than one it has
        self.skip_through = int(previous.get("last_step", 0)) if previous else 0
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lite-srpo"), name=cfg.name, dir=str(run_dir),
                              config=config_to_dict(cfg), settings=wandb.Settings(console="off", silent=True),
                              **resume)
        self.last_step = self.skip_through
        self._save_state()

    def _save_state(self) -> None:
        tmp = self.state_path.with_name(f".{WANDB_STATE}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"id": self.run.id, "last_step": self.last_step}), encoding="utf-8")
        os.replace(tmp, self.state_path)

    def _log(self, step: int, data: dict[str, Any]) -> None:
        if step <= self.skip_through:
            return
        self.run.log(data, step=step)
        if step > self.last_step:
            self.last_step = step
            self._save_state()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._log(step, values)

    def completions(self, step: int, rows: list[dict]) -> None:
        columns = table_columns(rows)
        data = [[self.wandb.Image(row[c]) if c == "image" and row[c] is not None else row[c] for c in columns]
                for row in rows]
        self._log(step, {"completions": self.wandb.Table(columns=columns, data=data)})

    def close(self) -> None:
        self.run.finish()


def read_wandb_state(run_dir: str | Path) -> dict | None:
    """`{"id", "last_step"}` of the wandb run a run directory logged to, or None when it has none."""
    path = Path(run_dir) / "wandb" / WANDB_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("id"), str) else None


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

    def log_completions(self, step: int, rows: list[dict]) -> None:
        """A table of sampled responses (`rl/completions.py` builds the rows)."""
        if rows:
            for backend in self.backends:
                backend.completions(step, rows)

    def close(self) -> None:
        backends, self.backends = self.backends, []
        for backend in backends:
            backend.close()


def open_trackers(cfg: RunConfig, run_dir: str | Path, start_step: int = 0) -> Trackers:
    """The trackers named in `train.report_to`, started (a missing package raises ConfigError).

    `start_step` > 0 is a resumed run: TensorBoard drops its points after that step, and wandb continues
    the run this directory logged to before."""
    problems = tracker_problems(cfg.train.report_to)
    if problems:
        raise ConfigError("; ".join(problems))
    run_dir = Path(run_dir)
    backends: list[Backend] = []
    try:
        for name in cfg.train.report_to:
            backends.append(TensorBoardBackend(cfg, run_dir, start_step) if name == "tensorboard"
                            else WandbBackend(cfg, run_dir, start_step))
    except BaseException:
        Trackers(backends).close()
        raise
    return Trackers(backends)
