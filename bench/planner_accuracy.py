"""How close `lite-srpo plan` comes to the measured peak of a training step (target: within 15 %).

Each configuration runs one real RL step in a fresh process; the peak is reset after the model is
loaded, so the figure compared is the step's own peak (process RSS on CPU, max allocated on CUDA).
The configurations vary the terms the planner models: the streamed lm_head chunk, response length,
group size, algorithm (extra passes), 4-bit vs unquantized weights, gradient checkpointing, and a
wider, deeper model whose activations matter.

    python -m bench.planner_accuracy            # 9 configurations (CPU: about 15 minutes)
    python -m bench.planner_accuracy --quick    # 2 small configurations (smoke test)
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import tempfile
from pathlib import Path

from bench.common import (QUICK_DIMS, RESULTS_DIR, build_bench_model, lite_step_job, measure_in_subprocess, step_recipe, table,
                          worker_main, write_result)

TARGET = 0.15
SMALL = {"hidden": 256, "intermediate": 1024, "layers": 2, "heads": 4, "kv_heads": 2}
WIDE = {"hidden": 1024, "intermediate": 4096, "layers": 6, "heads": 16, "kv_heads": 4}
CONFIGS = [
    # name, model dims, job
    ("grpo_R256_chunk256", SMALL, {"algo": "grpo", "G": 2, "R": 256, "chunk": 256}),
    ("grpo_R256_chunk1024", SMALL, {"algo": "grpo", "G": 2, "R": 256, "chunk": 1024}),
    ("grpo_G4_R1024_chunk512", SMALL, {"algo": "grpo", "G": 4, "R": 1024, "chunk": 512}),
    ("grpo_G8_R512_defaults", SMALL, {"algo": "grpo", "G": 8, "R": 512, "chunk": "auto", "micro_batch": 8}),
    ("srpo_G4_R512", SMALL, {"algo": "srpo", "G": 4, "R": 512, "chunk": 256}),
    ("vgpo_G4_R512", SMALL, {"algo": "vgpo", "G": 4, "R": 512, "chunk": 256}),
    ("grpo_fp32_base_R512", SMALL, {"algo": "grpo", "G": 2, "R": 512, "chunk": 256, "load_in_4bit": False}),
    ("wide_srpo_G4_R256_ckpt", WIDE, {"algo": "srpo", "G": 4, "R": 256, "chunk": 256, "micro_batch": 4}),
    ("wide_grpo_G4_R256_no_ckpt", WIDE, {"algo": "grpo", "G": 4, "R": 256, "chunk": 256, "micro_batch": 4,
                                         "gradient_checkpointing": False}),
]
QUICK = [
    ("quick_grpo", dict(QUICK_DIMS),
     {"algo": "grpo", "G": 2, "R": 8, "chunk": 16}),
    ("quick_srpo", dict(QUICK_DIMS),
     {"algo": "srpo", "G": 2, "R": 8, "chunk": 16}),
]


def predict(job: dict, prompt_tokens: int, device: str) -> dict:
    from lite_srpo.config import config_from_dict
    from lite_srpo.model.memory.plan import plan

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_dict(step_recipe(job, tmp))
    return plan(cfg, device=device, prompt_tokens=prompt_tokens)


def compare(name: str, res: dict) -> dict:
    key = "peak_allocated_gib" if "peak_allocated_gib" in res["peak_step"] else "peak_rss_gib"
    device = "cuda" if key == "peak_allocated_gib" else "cpu"
    p = predict(res["job"], res["prompt_tokens"], device)
    measured = res["peak_step"][key]
    return {"config": name, "algo": res["job"]["algo"], "G": res["job"]["G"], "R": res["job"]["R"],
            "prompt": res["prompt_tokens"], "chunk": res["job"]["chunk"], "measured_gib": measured,
            "predicted_gib": p["peak_gib"], "predicted_phase": p["peak_phase"],
            "error_pct": 100 * (p["peak_gib"] - measured) / measured, "setup_peak_gib": res["peak_setup"][key],
            "step_s": res["steps"][0]["time/step"], "job": res["job"]}


def replan(path: Path) -> dict:
    """Recompute the predictions of a saved result with the current planner (measurements unchanged)."""
    data = json.loads(path.read_text())
    device = "cuda" if data["machine"]["device"] != "cpu" else "cpu"
    for row in data["rows"]:
        p = predict(row["job"], row["prompt"], device)
        row["predicted_gib"], row["predicted_phase"] = p["peak_gib"], p["peak_phase"]
        row["error_pct"] = 100 * (p["peak_gib"] - row["measured_gib"]) / row["measured_gib"]
    return data


def summarise(rows: list[dict]) -> dict:
    within = [abs(r["error_pct"]) <= 100 * TARGET for r in rows]
    worst = max((abs(r["error_pct"]) for r in rows), default=float("nan"))
    print(table(rows, ["config", "algo", "G", "R", "prompt", "chunk", "measured_gib", "predicted_gib",
                       "predicted_phase", "error_pct", "setup_peak_gib", "step_s"]))
    print(f"{sum(within)}/{len(rows)} within {100 * TARGET:.0f} %; worst |error| {worst:.1f} %")
    return {"target_pct": 100 * TARGET, "within_target": sum(within), "configs": len(rows),
            "worst_abs_error_pct": worst}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if worker_main(argv, lite_step_job):
        return 0
    ap = argparse.ArgumentParser(prog="python -m bench.planner_accuracy", description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="run only these configuration names")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="planner_accuracy")
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--worker-env", nargs="*", default=[], metavar="KEY=VALUE",
                    help="environment of the measured processes, e.g. MALLOC_MMAP_THRESHOLD_=131072")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--replan", action="store_true",
                    help="recompute the predictions of the saved result with the current planner; no measuring")
    a = ap.parse_args(argv)
    if a.replan:
        path = Path(a.results_dir or RESULTS_DIR) / f"{a.name}.json"
        data = replan(path)
        data.update(summarise(data["rows"]))
        data["replanned"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(f"rewrote {path}")
        return 0
    configs = QUICK if a.quick else CONFIGS
    if a.only:
        configs = [c for c in configs if c[0] in a.only]
    env = dict(kv.split("=", 1) for kv in a.worker_env)
    rows, errors = [], []
    for name, dims, job in configs:
        model = str(build_bench_model(**dims))
        job = {"model": model, "B": 1, "micro_batch": 2, "threads": a.threads, **job}
        res = measure_in_subprocess("bench.planner_accuracy", job, env=env)
        if "error" in res:
            errors.append({"config": name, **res})
            print(f"  {name}: FAILED {res['error'][-300:]}", file=sys.stderr)
            continue
        rows.append(compare(name, res))
        r = rows[-1]
        print(f"  {name}: measured {r['measured_gib']:.3f} GiB, predicted {r['predicted_gib']:.3f} GiB "
              f"({r['error_pct']:+.1f} %)", flush=True)
    path = write_result(a.name, {
        **summarise(rows), "rows": rows, "errors": errors, "worker_env": env,
        "notes": ["measured_gib: the step's own peak (high-water mark reset after loading the model); "
                  "setup_peak_gib: peak while loading",
                  "CPU: peak RSS with fp32 compute; the planner's CPU model includes the process baseline"],
    }, a.results_dir)
    print(f"wrote {path}")
    return 1 if errors and not rows else 0


if __name__ == "__main__":
    raise SystemExit(main())
