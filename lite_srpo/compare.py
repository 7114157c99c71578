"""`lite-srpo compare`: every objective from the same warm-up checkpoint, same seeds, same budget.

All arms share the demo task, the structured prompt, the SFT warm-up model, G, lengths, learning rate
and steps; only `algorithm.name` (and so its preset, research/algorithms.md) changes. The table reports
held-out accuracy, format rate, wall time per step and the extra no-grad passes' share of it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .config import config_from_dict, config_to_dict, load_config
from .data import load_splits
from .demo import DEMO_RECIPE, held_out
from .events import read_events
from .modeling import load_policy
from .pipeline import ensure_warmup
from .tiny import make_tiny
from .train import train

DEFAULT_ARMS = ("grpo", "dapo", "srpo", "papo", "vppo", "vgpo")


def arm_config(base: dict, algorithm: str, root: Path):
    data = dict(base)
    data["algorithm"] = {"name": algorithm}
    data["name"] = f"compare_{algorithm}"
    data["output_dir"] = str(root)
    return config_from_dict(data, source=f"compare arm {algorithm}")


def step_times(run_dir: Path) -> tuple[float, float]:
    metrics = [e for e in read_events(run_dir / "events.jsonl") if e["type"] == "metrics" and e.get("time/step")]
    steps = [e["time/step"] for e in metrics]
    extra = [e.get("time/extra_passes") or 0.0 for e in metrics]
    return float(np.mean(steps)) if steps else float("nan"), float(np.mean(extra)) if extra else 0.0


def run_compare(recipe: str | None = None, overrides: list[str] | None = None,
                arms: tuple[str, ...] = DEFAULT_ARMS, out_dir: str = "runs/compare") -> dict:
    root = Path(out_dir)
    cfg = load_config(recipe or DEMO_RECIPE, overrides or [])
    if not (Path(cfg.model.path) / "config.json").is_file():
        make_tiny("qwen2_5_vl", cfg.model.path, size="demo", seed=cfg.train.seed)
    warm = ensure_warmup(cfg)  # one shared warm-up checkpoint for every arm
    base = config_to_dict(warm)
    _, test_set = load_splits(warm.data, seed=warm.train.seed)
    policy = load_policy(warm.model, warm.lora)
    start = held_out(policy, warm, test_set)
    del policy
    rows = []
    for algorithm in arms:
        cfg_arm = arm_config(base, algorithm, root)
        t0 = time.perf_counter()
        run = train(cfg_arm, quiet=True, overwrite=True)
        wall = time.perf_counter() - t0
        result = held_out(run.policy, cfg_arm, test_set)
        per_step, extra = step_times(run.run_dir)
        rows.append({"algorithm": algorithm, "accuracy": result["accuracy"], "format_rate": result["format_rate"],
                     "seconds_per_step": per_step, "extra_pass_seconds_per_step": extra,
                     "extra_pass_share": extra / per_step if per_step == per_step and per_step > 0 else 0.0,
                     "wall_seconds": wall})
        print(f"[compare] {algorithm}: accuracy {result['accuracy']:.3f} ({per_step:.1f} s/step)", flush=True)
    out = {"task": warm.data.task, "protocol": start["protocol"], "n_test": len(test_set), "steps": warm.train.steps,
           "group_size": warm.rollout.group_size, "warmup_accuracy": start["accuracy"],
           "warmup_format_rate": start["format_rate"], "arms": rows}
    root.mkdir(parents=True, exist_ok=True)
    (root / "compare.json").write_text(json.dumps(out, indent=1))
    print(format_compare(out))
    return out


def format_compare(r: dict) -> str:
    lines = [f"{r['task']}: {r['n_test']} held-out samples, {r['protocol']}, {r['steps']} RL steps, G={r['group_size']}; "
             f"warm-up accuracy {r['warmup_accuracy']:.3f}",
             "| algorithm | held-out accuracy | format rate | s / step | extra passes s / step (share) |",
             "|---|---|---|---|---|"]
    for a in r["arms"]:
        lines.append(f"| {a['algorithm']} | {a['accuracy']:.3f} | {a['format_rate']:.3f} | {a['seconds_per_step']:.2f} | "
                     f"{a['extra_pass_seconds_per_step']:.2f} ({100 * a['extra_pass_share']:.0f}%) |")
    return "\n".join(lines)
