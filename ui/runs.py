"""Run discovery and one-line summaries: what the Runs table, the run selector and the status line show."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lite_srpo.run.checkpoint import checkpoint_dirs

from .monitor import ACTIVE, events_of, log_tail, run_state
from .process import LAUNCH_RECIPE, LOG_FILE, PROCESS_FILE, exit_code, is_alive, read_record

MARKERS = ("events.jsonl", LAUNCH_RECIPE, PROCESS_FILE, "recipe.yaml")
# A run started outside the UI (CLI) counts as running while its event file keeps changing.
EXTERNAL_STALE_S = 300.0
FINAL = ("finished", "stopped", "crashed")


@dataclass
class RunSummary:
    path: Path
    name: str
    status: str
    message: str = ""
    step: int = 0
    total_steps: int | None = None
    eta_s: float | None = None
    phase: str = "rl"
    sft_step: int = 0
    sft_total: int | None = None
    algorithm: str | None = None
    model: str | None = None
    last_metrics: dict = field(default_factory=dict)
    checkpoints: list[Path] = field(default_factory=list)
    alive: bool = False
    pid: int | None = None
    slot: str | None = None
    error: str = ""
    updated: float = 0.0
    recipe: dict = field(default_factory=dict)

    @property
    def resumable(self) -> bool:
        return not self.alive and self.status in ("stopped", "crashed", "interrupted")


def _is_run(d: Path) -> bool:
    return any((d / m).exists() for m in MARKERS)


def find_runs(roots: list[str | Path]) -> list[Path]:
    """Run directories under each root, newest first; one level deeper too (`runs/compare/compare_srpo`)."""
    found: dict[Path, float] = {}
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for d in root.iterdir():
            if not d.is_dir():
                continue
            candidates = [d] if _is_run(d) else [c for c in d.iterdir() if c.is_dir() and _is_run(c)]
            for c in candidates:
                found[c.resolve()] = max((c / m).stat().st_mtime for m in MARKERS if (c / m).exists())
    return sorted(found, key=lambda p: -found[p])


def recipe_of(run_dir: Path) -> dict:
    for name in (LAUNCH_RECIPE, "recipe.yaml"):
        path = run_dir / name
        if path.is_file():
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8"))
                if isinstance(data, dict):
                    return data
            except yaml.YAMLError:
                continue
    return {}


def summarize(run_dir: str | Path, now: float | None = None) -> RunSummary:
    """Events + process record → status. A process that died without a final status is a crash."""
    run_dir = Path(run_dir)
    now = time.time() if now is None else now
    events = events_of(run_dir)
    st = run_state(events)
    record = read_record(run_dir)
    alive = is_alive(record)
    events_path = run_dir / "events.jsonl"
    updated = events_path.stat().st_mtime if events_path.exists() else (run_dir.stat().st_mtime if run_dir.exists() else 0)
    recipe = recipe_of(run_dir)
    s = RunSummary(path=run_dir, name=run_dir.name, status=st["status"], message=st["message"], step=st["step"],
                   total_steps=st["total_steps"] or (recipe.get("train") or {}).get("steps"), eta_s=st["eta_s"],
                   phase=st["phase"], sft_step=st["sft_step"], sft_total=st["sft_total"],
                   algorithm=st["algorithm"] or (recipe.get("algorithm") or {}).get("name"),
                   model=st["model"] or (recipe.get("model") or {}).get("path"), last_metrics=st["last_metrics"],
                   checkpoints=checkpoint_dirs(run_dir), alive=alive, pid=record.pid if record else None,
                   slot=record.slot if record else None, updated=updated, recipe=recipe)
    if alive:
        assert record is not None
        since_launch = (st["status_time"] or 0) >= record.started - 1.0  # this process wrote the last status
        in_sft = (st["sft_time"] or 0) >= max(record.started - 1.0, st["status_time"] or 0)
        if record.stop_requests and not (s.status in FINAL and since_launch):
            s.status = "stopping"
        elif in_sft:
            s.status, s.message = "running", f"SFT warm-up step {st['sft_step']}/{st['sft_total']}"
        elif not since_launch:
            s.status, s.message = "starting", "loading data and model"
        return s
    if record is None and s.status in ACTIVE and now - updated < EXTERNAL_STALE_S:
        s.status, s.message = "running", "running outside the UI (started from the command line: stop it there with Ctrl-C)"
        s.alive = True
        return s
    if s.status in ACTIVE or (record is not None and s.status == "created"):
        code = exit_code(record)
        s.status = "crashed"
        s.message = (f"the training process exited (code {code}) without a final status" if code is not None
                     else "the training process is gone without a final status (killed or crashed)")
    if s.status == "crashed":
        s.error = crash_text(run_dir, s.message)
    return s


def crash_text(run_dir: Path, message: str) -> str:
    """The crash message plus the end of the training log (the traceback, if there is one)."""
    tail = log_tail(run_dir / LOG_FILE, 3000).strip()
    return f"{message}\n\n--- end of {LOG_FILE} ---\n{tail}" if tail else message


def recipe_brief(recipe: dict) -> str:
    """'G=8 x 4 prompts, 128 tok, lr 1e-05, LoRA r16, 4-bit' from a recipe dict (missing keys left out)."""
    r, o, lo, m = (recipe.get(k) or {} for k in ("rollout", "optim", "lora", "model"))
    parts = []
    if "group_size" in r:
        parts.append(f"G={r['group_size']}" + (f" x {r['prompts_per_step']} prompts" if "prompts_per_step" in r else ""))
    if "max_new_tokens" in r:
        parts.append(f"{r['max_new_tokens']} tok")
    if "lr" in o:
        parts.append(f"lr {o['lr']:g}" if isinstance(o["lr"], (int, float)) else f"lr {o['lr']}")
    if "r" in lo:
        parts.append(f"LoRA r{lo['r']}")
    if "load_in_4bit" in m:
        parts.append("4-bit" if m["load_in_4bit"] else "16/32-bit")
    return ", ".join(parts)


def metric_text(metrics: dict, key: str) -> str:
    v = metrics.get(key)
    return f"{v:.3f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else ""


def runs_table(summaries: list[RunSummary]) -> list[list]:
    """Rows for the Runs tab's table."""
    rows = []
    for s in summaries:
        total = s.total_steps if s.total_steps is not None else "?"
        rows.append([s.name, s.status, f"{s.step}/{total}", s.algorithm or "", s.model or "", recipe_brief(s.recipe),
                     metric_text(s.last_metrics, "reward/mean"), metric_text(s.last_metrics, "accuracy"),
                     metric_text(s.last_metrics, "loss/total"), len(s.checkpoints),
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(s.updated)) if s.updated else "", str(s.path)])
    return rows


RUNS_COLUMNS = ["run", "status", "step", "algorithm", "model", "recipe", "reward", "accuracy", "loss", "checkpoints",
                "updated", "path"]
