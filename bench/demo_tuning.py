"""Choose the demo's RL hyper-parameters on a VALIDATION split carved from train — never on test.

    python -m bench.demo_tuning --seed 0 --config "optim.lr=1e-3 train.steps=80" --config "optim.lr=5e-4"

Each `--config` is a set of overrides on `recipes/demo_cpu.yaml` (plus `data.n_val`). The warm-up is
built once per seed and shared; every config runs RL from it and is scored on the validation items
under greedy and avg@8 (T = 1), with 95 % bootstrap CIs. One JSON line per config is appended to
`bench/results/demo_tuning.jsonl` with its command, seed and wall time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

from lite_srpo.config import load_config
from lite_srpo.data.splits import load_all_splits
from lite_srpo.eval.demo import DEMO_RECIPE, both_protocols, ensure_model, srpo_role_weights
from lite_srpo.eval.stats import paired_difference
from lite_srpo.model.policy import load_policy
from lite_srpo.rl.pipeline import ensure_warmup
from lite_srpo.rl.train import train
from lite_srpo.run.events import read_events

OUT = Path(__file__).resolve().parent / "results" / "demo_tuning.jsonl"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--root", default="runs/tuning")
    ap.add_argument("--config", action="append", default=[], help="space-separated key=value overrides")
    ap.add_argument("--base", default="", help="overrides shared by every config (e.g. sft.steps=300)")
    a = ap.parse_args(argv)
    shared = [f"train.seed={a.seed}", f"data.n_val={a.n_val}", f"output_dir={a.root}", f"name=seed{a.seed}",
              f"model.path={a.root}/seed{a.seed}/tiny_model", *shlex.split(a.base)]
    cfg = load_config(DEMO_RECIPE, shared)
    ensure_model(cfg)
    warm = ensure_warmup(cfg)
    _, val, _ = load_all_splits(cfg.data, seed=cfg.train.seed)
    eval_seed = a.seed + 4321
    cache = cfg.run_dir / "warmup_val.json"
    if cache.is_file():
        before = json.loads(cache.read_text())
    else:
        policy = load_policy(warm.model, warm.lora)
        before = both_protocols(policy, warm, val, eval_seed)
        del policy
        cache.write_text(json.dumps(before))
    print(f"[tuning] seed {a.seed} warm-up on {len(val)} val items: greedy {before['greedy']['accuracy']:.3f} "
          f"avg@8 {before['avg@8']['accuracy']:.3f}", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    for index, text in enumerate(a.config):
        overrides = shlex.split(text)
        arm = load_config(DEMO_RECIPE, shared + overrides)
        arm_cfg = ensure_warmup(arm)
        arm_cfg = dataclasses.replace(arm_cfg, name=f"seed{a.seed}_rl{index}_{os.getpid()}")
        t0 = time.perf_counter()
        run = train(arm_cfg, overwrite=True, quiet=True)
        t_rl = time.perf_counter() - t0
        after = both_protocols(run.policy, arm_cfg, val, eval_seed)
        steps_run = max((e["step"] for e in read_events(run.run_dir / "events.jsonl") if e["type"] == "metrics"),
                        default=0)  # a stopped run (SIGINT/SIGTERM finish the step and return) is labelled as such
        row = {"seed": a.seed, "overrides": overrides, "base": a.base, "n_val": len(val), "rl_seconds": t_rl,
               "steps_run": steps_run,
               "before": {k: {kk: vv for kk, vv in v.items() if kk != "items"} for k, v in before.items()},
               "after": {k: {kk: vv for kk, vv in v.items() if kk != "items"} for k, v in after.items()},
               "change": {k: paired_difference(after[k]["items"], before[k]["items"]) for k in before},
               "srpo_role_weights": srpo_role_weights(run.run_dir),
               "command": "python -m bench.demo_tuning " + " ".join(shlex.quote(x) for x in sys.argv[1:])}
        with open(OUT, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        c = row["change"]
        print(f"[tuning] {text}: greedy {after['greedy']['accuracy']:.3f} ({100 * c['greedy']['mean']:+.1f}), "
              f"avg@8 {after['avg@8']['accuracy']:.3f} ({100 * c['avg@8']['mean']:+.1f}), "
              f"trunc {after['avg@8']['truncated_frac']:.2f}, {t_rl:.0f} s", flush=True)
        del run
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
