"""The 24 GB recipes' step traced at the real shapes of Qwen2.5-VL-7B/3B-Instruct, against `lite-srpo plan`.

Each recipe's step runs on `meta` tensors (`lite_srpo/rl/trace_step.py`): the real transformers model
from the published config.json, real bitsandbytes 4-bit layers, peft LoRA, checkpointing and the
trainer's own passes, loss and optimizer, with every allocation counted. The result is compared with
the plan phase by phase (target: within 15 %). Traced, not measured: no kernels' workspaces, no
allocator fragmentation, no GPU.

    python -m bench.trace_7b              # the 7B and 3B SRPO recipes, plus the long-response settings
    python -m bench.trace_7b --quick      # the 3B SRPO recipe only

Writes bench/results/trace_7b.json (and trace_3b.json): `phases.<phase>.traced_gib` / `planned_gib`.
"""
from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from bench.common import ROOT, table, write_result
from lite_srpo.config import load_config
from lite_srpo.model.memory.plan import plan
from lite_srpo.rl.trace_report import compare, model_config
from lite_srpo.rl.trace_step import trace_step

CASES = {
    "trace_7b": ("recipes/qwen2_5_vl_7b_srpo_24gb.yaml", [
        ("recipe", []),
        ("offload+recompute_chunk", ["train.offload_activations=true", "train.recompute_chunk=1024"]),
        ("grpo_kl", ["algorithm.name=grpo", "algorithm.beta=0.04"]),
        ("8k_responses_rows8", ["rollout.max_new_tokens=8192", "rollout.generation_rows=8",
                                "train.offload_activations=true", "train.recompute_chunk=1024",
                                "train.micro_batch_size=1"]),
    ]),
    "trace_3b": ("recipes/qwen2_5_vl_3b_srpo_24gb.yaml", [("recipe", [])]),
}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_case(recipe: str, overrides: list[str]) -> dict:
    cfg = load_config(ROOT / recipe, overrides)
    config, source = model_config(cfg.model.path)
    planned = plan(cfg, 24.0, model_dims=config, device="cuda")
    report = compare(trace_step(cfg, config), planned)
    report.update(recipe=recipe, overrides=overrides, model_config=source)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the 3B recipe only")
    a = ap.parse_args(argv)
    names = ["trace_3b"] if a.quick else list(CASES)
    for name in names:
        recipe, variants = CASES[name]
        cases = {label: run_case(recipe, overrides) for label, overrides in (variants[:1] if a.quick else variants)}
        first = next(iter(cases.values()))
        rows = [{"case": label, "phase": phase, "traced_gib": row["traced_gib"], "planned_gib": row["planned_gib"],
                 "traced/planned": row["traced_over_planned"]}
                for label, case in cases.items() for phase, row in case["phases"].items()]
        print(f"{name} ({recipe})\n" + table(rows, ["case", "phase", "traced_gib", "planned_gib", "traced/planned"]))
        path = write_result(name, {"commit": git_commit(), "recipe": recipe, "phases": first["phases"],
                                   "fixed": first["fixed"], "host": first["host"], "caveat": first["caveat"],
                                   "cases": cases})
        print(f"wrote {Path(path).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
