"""Longest response the planner fits on a 24 GiB card at G = 8, for the 3B and 7B SRPO recipes, with each
long-context feature added in turn. Planned (arithmetic), not measured on a GPU.

    python -m bench.planner_long_context [--gpu-mem 24] [--json bench/results/planner_long_context.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lite_srpo.config import load_config
from lite_srpo.model.memory.plan import plan

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"3B": ROOT / "recipes" / "qwen2_5_vl_3b_srpo_24gb.yaml", "7B": ROOT / "recipes" / "qwen2_5_vl_7b_srpo_24gb.yaml"}
RECOMPUTE_CHUNK = 2048
# (label, overrides added to the previous step's, dense_mask: None = the code's rule, an [L, L] mask only for
# eager attention or a padded micro-batch of more than one row)
STEPS = [
    ("recipe defaults", [], None),
    ("+ generation_rows=1, generation_batch_size=1, micro-batch 1",
     ["rollout.generation_rows=1", "rollout.generation_batch_size=1", "train.micro_batch_size=1"], None),
    ("+ offload_activations", ["train.offload_activations=true"], None),
    (f"+ recompute_chunk={RECOMPUTE_CHUNK}", [f"train.recompute_chunk={RECOMPUTE_CHUNK}"], None),
]


def table(gpu_mem: float) -> list[dict]:
    rows = []
    for name, path in RECIPES.items():
        overrides: list[str] = []
        for label, extra, dense in STEPS:
            overrides = overrides + extra
            cfg = load_config(path, overrides)
            p = plan(cfg, gpu_mem, device="cuda", dense_mask=dense)
            longest = p["max_response_tokens"]
            at = plan(load_config(path, overrides + [f"rollout.max_new_tokens={longest}"]), gpu_mem, device="cuda",
                      dense_mask=dense) if longest else None
            rows.append({"model": name, "step": label, "overrides": list(overrides), "dense_mask": bool(dense),
                         "max_response_tokens": longest, "limit_phase": at["peak_phase"] if at else None,
                         "needed_gib": at["needed_gib"] if at else None, "host_gib": at["host_gib"] if at else None})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-mem", type=float, default=24.0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = table(a.gpu_mem)
    print("| model | step | longest response (tokens) | limiting phase | pinned host (GiB) |")
    print("|---|---|---:|---|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['step']} | {r['max_response_tokens']:,} | {r['limit_phase']} | "
              f"{r['host_gib']:.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"gpu_mem_gib": a.gpu_mem, "group_size": 8, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
