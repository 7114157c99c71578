"""`lite-srpo compare`: every objective from the same warm-up checkpoint, K seeds each, with statistics.

All arms share the task, the structured prompt, the SFT warm-up model, G, lengths, learning rate and
steps; only the arm's overrides change (by default `algorithm.name`, and so its preset). Each arm runs
with seeds `train.seed + 0 … K−1` (the seed sets the RL prompt order and the sampling), and each run is
scored on the same held-out items under greedy and avg@8 (T = 1). The table gives each arm's mean with
a 95 % interval from a two-level bootstrap (seeds, then items), and each seed method's paired difference
against the base arm its paper builds on (`compare_report.PAIRS`; same seeds, same items).
"""
from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import numpy as np

from ..config import apply_overrides, config_from_dict, config_to_dict, load_config
from ..data.splits import load_splits
from ..model.policy import load_policy
from ..rl.pipeline import ensure_warmup
from ..rl.train import train
from ..run.events import read_events
from .compare_report import analyse, format_contrasts
from .demo import DEMO_RECIPE, PROTOCOLS, both_protocols, ensure_model, protocol_key

DEFAULT_ARMS = ("grpo", "dapo", "srpo", "papo", "vppo", "vgpo")


def parse_arm(text: str) -> tuple[str, list[str]]:
    """`srpo` → ("srpo", ["algorithm.name=srpo"]); `srpo_po=algorithm.name=srpo algorithm.srpo.consistency=…`
    → a named arm with its own overrides."""
    name, sep, rest = text.partition("=")
    if not sep:
        return name, [f"algorithm.name={name}"]
    return name, shlex.split(rest)


def arm_config(base: dict, arm_overrides: list[str], shared: list[str], name: str, root: Path, seed: int):
    """The warm-up recipe with the arm's algorithm preset applied afresh: `algorithm.*` keys come only from
    the command line's shared overrides and the arm's own, never from another arm's preset."""
    data = dict(base)
    data["algorithm"] = {}
    data = apply_overrides(data, [o for o in shared if o.startswith("algorithm.")] + arm_overrides)
    data["algorithm"].setdefault("name", base["algorithm"]["name"])
    data["name"] = f"compare_{name}_s{seed}"
    data["output_dir"] = str(root)
    data["train"] = {**data["train"], "seed": seed}
    return config_from_dict(data, source=f"compare arm {name}")


def step_times(run_dir: Path) -> tuple[float, float]:
    metrics = [e for e in read_events(run_dir / "events.jsonl") if e["type"] == "metrics" and e.get("time/step")]
    steps = [e["time/step"] for e in metrics]
    extra = [e.get("time/extra_passes") or 0.0 for e in metrics]
    return float(np.mean(steps)) if steps else float("nan"), float(np.mean(extra)) if extra else 0.0


def run_compare(recipe: str | None = None, overrides: list[str] | None = None,
                arms: tuple[str, ...] = DEFAULT_ARMS, out_dir: str = "runs/compare", seeds: int = 1,
                first_seed: int = 0) -> dict:
    """Train every arm for seeds `train.seed + first_seed … + first_seed + seeds − 1` and score each run.
    `first_seed` extends an earlier comparison by more seeds into a new folder; `compare --report` then
    merges both files seed by seed."""
    root = Path(out_dir)
    cfg = load_config(recipe or DEMO_RECIPE, overrides or [])
    ensure_model(cfg)
    warm = ensure_warmup(cfg)  # one shared warm-up checkpoint for every arm and seed
    base = config_to_dict(warm)
    _, test_set = load_splits(warm.data, seed=warm.train.seed)
    eval_seed = warm.train.seed + 1234
    policy = load_policy(warm.model, warm.lora)
    start = both_protocols(policy, warm, test_set, eval_seed)
    del policy
    root.mkdir(parents=True, exist_ok=True)
    items: dict[str, dict[str, list[list[float]]]] = {}
    rows = []
    parsed = [parse_arm(text) for text in arms]
    for name, _ in parsed:
        items[name] = {protocol_key(p): [] for p in PROTOCOLS}
    # Seeds outside, arms inside: a run stopped early leaves every arm with the same seeds, so the
    # paired contrasts of the finished seeds are complete.
    for k in range(first_seed, first_seed + seeds):
        for name, arm_overrides in parsed:
            cfg_arm = arm_config(base, arm_overrides, overrides or [], name, root, warm.train.seed + k)
            t0 = time.perf_counter()
            run = train(cfg_arm, quiet=True, overwrite=True)
            wall = time.perf_counter() - t0
            result = both_protocols(run.policy, cfg_arm, test_set, eval_seed)
            per_step, extra = step_times(run.run_dir)
            for key, r in result.items():
                items[name][key].append(r["items"])
            rows.append({"arm": name, "overrides": arm_overrides, "seed": cfg_arm.train.seed, "wall_seconds": wall,
                         "seconds_per_step": per_step, "extra_pass_seconds_per_step": extra,
                         **{key: {k2: v for k2, v in r.items() if k2 != "items"} for key, r in result.items()}})
            print(f"[compare] {name} seed {cfg_arm.train.seed}: greedy {result['greedy']['accuracy']:.3f}, "
                  f"avg@8 {result['avg@8']['accuracy']:.3f} ({per_step:.1f} s/step, {wall:.0f} s)", flush=True)
            del run
            done = {a: v for a, v in items.items() if v["greedy"]}
            out = {"task": warm.data.task, "n_test": len(test_set), "steps": warm.train.steps, "seeds": seeds,
                   "seeds_done": min(len(v["greedy"]) for v in items.values()),
                   "group_size": warm.rollout.group_size, "lr": warm.optim.lr,
                   "warmup": {k2: {k3: v for k3, v in r.items() if k3 != "items"} for k2, r in start.items()},
                   "warmup_items": {k2: r["items"] for k2, r in start.items()},
                   "runs": rows, "items": items}
            out.update(analyse({"items": done, "runs": rows}))
            (root / "compare.json").write_text(json.dumps(out, indent=1))  # after every run: partial results survive
    curves = compare_curves(root, rows)
    if curves is not None:
        out["curves"] = str(curves)
    print(format_compare(out))
    return out


def compare_curves(root: Path, rows: list[dict]) -> Path | None:
    try:
        from ..run.plot import write_curves
    except ImportError:
        return None
    dirs = [root / f"compare_{r['arm']}_s{r['seed']}" for r in rows]
    return write_curves(dirs, out=root / "curves.png", labels=[f"{r['arm']} s{r['seed']}" for r in rows])


def _fmt(e: dict) -> str:
    lo, hi = e["ci95"]
    return f"{e['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


def format_compare(r: dict) -> str:
    w = r["warmup"]
    lines = [f"{r['task']}: {r['n_test']} held-out items, {r['steps']} RL steps, G={r['group_size']}, lr {r['lr']:g}, "
             f"{r['seeds']} seed(s) per arm; warm-up greedy {w['greedy']['accuracy']:.3f}, avg@8 {w['avg@8']['accuracy']:.3f}",
             "| arm | greedy (95% CI) | avg@8, T=1 (95% CI) | s / step |", "|---|---|---|---|"]
    for arm, s in r["arms"].items():
        per_step = np.mean([x["seconds_per_step"] for x in r["runs"] if x["arm"] == arm])
        lines.append(f"| {arm} | {_fmt(s['greedy'])} | {_fmt(s['avg@8'])} | {per_step:.2f} |")
    lines += format_contrasts(r["paired"])
    if r.get("curves"):
        lines.append(f"curves: {r['curves']}")
    return "\n".join(lines)
