"""`lite-srpo plan RECIPE --trace`: run the step at the real shapes on `meta` and set it beside the plan.

Needs only the model's `config.json` (`--config`, a local `model.path`, or a published copy lite-srpo
carries for Qwen2.5-VL-3B/7B-Instruct), so a user can check the fit before downloading 15 GB of weights.
What the numbers are: allocations at real shapes, op by op (`trace_step.py`); not kernels' workspaces,
allocator fragmentation or the CUDA context, which the fit adds as the plan does; not GPU-measured.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..config import load_config
from ..errors import LiteSrpoError, ModelError
from ..model.memory.plan import CUDA_ALLOCATOR_SLACK, CUDA_CONTEXT_GIB, plan
from ..model.memory.report import parse_memory, plan_main
from ..model.meta_model import read_config
from ..model.tiny_hub import PUBLISHED_DIR
from .trace_step import Trace, trace_step

CAVEAT = ("traced: allocations at real shapes on meta tensors; no kernels, workspaces or allocator fragmentation; "
          "not GPU-measured")
AGREEMENT = 0.15
"""How far a traced phase may sit from the planned one before the plan's terms need fixing (issue 32)."""


def model_config(model_path: str, given: str | None = None) -> tuple[dict[str, Any], str]:
    """The checkpoint's config.json and where it came from: `given`, then `model.path` as a local
    directory, then a published copy for a hub id; otherwise an error that says how to fetch just it."""
    if given:
        return read_config(given), str(given)
    local = Path(model_path).expanduser()
    if (local / "config.json").is_file():
        return read_config(local), str(local / "config.json")
    published = PUBLISHED_DIR / model_path.replace("/", "--") / "config.json"
    if "/" in model_path and published.is_file():
        return read_config(published), f"published copy ({published.relative_to(PUBLISHED_DIR.parent.parent)})"
    raise ModelError(f"model.path {model_path!r}: no config.json to trace. Fetch only that file, e.g. "
                     f"`huggingface-cli download {model_path} config.json --local-dir cfg/`, and pass --config cfg/config.json")


def compare(result: Trace, planned: dict) -> dict[str, Any]:
    """Traced against planned, phase by phase (both include the fixed memory)."""
    phases = {}
    for name, traced in result.phases.items():
        want = planned["phases"][name]
        phases[name] = {"traced_gib": round(traced, 4), "planned_gib": round(want, 4),
                        "traced_over_planned": round(traced / want, 4),
                        "within_15pct": abs(traced / want - 1) <= AGREEMENT}
    peak = max(result.phases.values())
    needed = peak * CUDA_ALLOCATOR_SLACK + CUDA_CONTEXT_GIB
    return {"phases": phases, "fixed": {"traced_gib": round(result.fixed_gib, 4),
                                        "planned_gib": round(sum(t["gib"] for t in planned["terms"]
                                                                 if t["phase"] == "fixed"), 4)},
            "host": {"traced_gib": round(result.host_gib, 4), "planned_gib": round(planned["host_gib"], 4)},
            "traced_peak_gib": round(peak, 4), "traced_needed_gib": round(needed, 4),
            "budget_gib": planned["budget_gib"], "traced_fits": needed <= planned["budget_gib"],
            "planned_fits": planned["fits"], "shape": asdict(result.shape), "passes": result.passes_run,
            "trace_seconds": round(result.seconds, 1), "caveat": CAVEAT}


def format_trace(report: dict[str, Any], recipe: str, source: str) -> str:
    lines = [f"lite-srpo plan {recipe} --trace", f"model config: {source}",
             f"{CAVEAT}.", "", "| phase | traced GiB | planned GiB | traced / planned |", "|---|---:|---:|---:|",
             f"| fixed (weights, adapter, grads, optimizer) | {report['fixed']['traced_gib']:.3f} | "
             f"{report['fixed']['planned_gib']:.3f} | |"]
    for name, row in report["phases"].items():
        mark = "" if row["within_15pct"] else " (outside 15 %)"
        lines.append(f"| fixed + {name} | {row['traced_gib']:.3f} | {row['planned_gib']:.3f} | "
                     f"{row['traced_over_planned']:.3f}{mark} |")
    if report["host"]["traced_gib"] or report["host"]["planned_gib"]:
        lines.append(f"| pinned host (offload) | {report['host']['traced_gib']:.3f} | {report['host']['planned_gib']:.3f} | |")
    verdict = "FITS" if report["traced_fits"] else "DOES NOT FIT"
    lines += ["", f"traced peak {report['traced_peak_gib']:.2f} GiB; needed on the card {report['traced_needed_gib']:.2f} GiB "
              f"(x{CUDA_ALLOCATOR_SLACK} allocator slack + {CUDA_CONTEXT_GIB} GiB CUDA context, as the plan adds)",
              f"{verdict} in {report['budget_gib']:.1f} GiB (traced); the plan says "
              f"{'FITS' if report['planned_fits'] else 'DOES NOT FIT'}",
              f"passes traced: {', '.join(report['passes']) or 'none'}; trace took {report['trace_seconds']:.0f} s"]
    return "\n".join(lines)


def trace_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lite-srpo plan --trace",
                                 description="Trace one training step on meta tensors at the model's real shapes "
                                             "and compare it with the plan, phase by phase.")
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--config", default=None, help="the model's config.json (default: model.path's, or a published copy)")
    ap.add_argument("--gpu-mem", default="24GiB", help="the card's memory, e.g. 24GiB")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="prompt length incl. image tokens")
    ap.add_argument("--json", action="store_true", help="print the comparison as JSON")
    a = ap.parse_args(argv)
    try:
        cfg = load_config(a.recipe, a.overrides)
        config, source = model_config(cfg.model.path, a.config)
        budget = parse_memory(a.gpu_mem)
        planned = plan(cfg, budget, model_dims=config, device="cuda", prompt_tokens=a.prompt_tokens)
        result = trace_step(cfg, config, prompt_tokens=a.prompt_tokens)
    except (LiteSrpoError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = compare(result, planned)
    report["model_config"] = source
    print(json.dumps(report, indent=2) if a.json else format_trace(report, " ".join([a.recipe, *a.overrides]), source))
    return 0 if report["traced_fits"] else 1


def plan_or_trace_main(argv: list[str] | None = None) -> int:
    """`lite-srpo plan`: with `--trace`, the trace beside the plan; otherwise the plan (`report.plan_main`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--trace" in argv:
        return trace_main([x for x in argv if x != "--trace"])
    return plan_main(argv)
