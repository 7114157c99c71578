"""Peak memory of one GRPO and one SRPO step versus response length and group size.

The model has two small decoder layers but Qwen's real 151,936-token vocabulary, so the logits term
is the real one: a `[tokens × vocab]` fp32 logits tensor would cost 594 KiB per response token. With
lite-srpo's streamed lm_head the logits cost `chunk × V` floats whatever the length, so the peak must
grow only by the small per-token terms (activations, KV cache). Each point runs in a fresh process
(peak RSS on CPU, `torch.cuda.max_memory_allocated` on CUDA), reset after loading the model.

    python -m bench.memory_scaling                      # full sweep (CPU: 40-80 minutes)
    python -m bench.memory_scaling --quick              # smoke test (seconds)
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

from bench.common import (GIB, RESULTS_DIR, build_bench_model, lite_step_job, measure_in_subprocess, table, worker_main,
                          write_result)

FULL_LOGITS_BYTES_PER_TOKEN = 4  # one fp32 logit per vocabulary entry per token (before log-softmax/grad copies)
COLUMNS = ["algo", "G", "R", "prompt", "peak_setup_gib", "peak_step_gib", "planned_gib", "planned_logits_gib",
           "full_logits_gib", "step_s"]


def sweep_points(lengths: list[int], groups: list[int], base_g: int, base_len: int) -> list[tuple[int, int]]:
    """(G, R) points: every length at G=base_g, then every group size at R=base_len (no duplicates)."""
    points = [(base_g, r) for r in lengths]
    points += [(g, base_len) for g in groups if (g, base_len) not in points]
    return points


def plan_for(job: dict, prompt_tokens: int) -> dict:
    """The planner's prediction for the same step (CPU RSS or CUDA allocated)."""
    import tempfile

    import torch

    from bench.common import step_recipe
    from lite_srpo.config import config_from_dict
    from lite_srpo.model.memory.plan import plan

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_dict(step_recipe(job, tmp))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return plan(cfg, device=device, prompt_tokens=prompt_tokens)


def summarise(res: dict, vocab: int) -> dict:
    job = res["job"]
    peak_key = "peak_allocated_gib" if "peak_allocated_gib" in res["peak_step"] else "peak_rss_gib"
    row = {"algo": job["algo"], "G": job["G"], "R": job["R"], "prompt": res["prompt_tokens"], "job": job,
           "peak_step_gib": res["peak_step"][peak_key], "peak_setup_gib": res["peak_setup"][peak_key],
           "step_s": res["steps"][0]["time/step"],
           # what one [N*R, V] fp32 logits tensor alone would add (before log-softmax and grad copies)
           "full_logits_gib": job["G"] * job["R"] * vocab * FULL_LOGITS_BYTES_PER_TOKEN / GIB}
    return add_plan(row)


def add_plan(row: dict) -> dict:
    """Add the planner's prediction for the row's job (also used by --replan on a saved result)."""
    row.pop("plan_error", None)
    try:
        p = plan_for(row["job"], row["prompt"])
        row["planned_gib"] = p["peak_gib"]
        row["planned_logits_gib"] = p["logits_gib"]
    except Exception as exc:  # noqa: BLE001 - the planner is optional here; the measurement stands alone
        row["plan_error"] = str(exc)
    return row


def slopes(rows: list[dict], algo: str, base_g: int) -> dict:
    """Peak growth per response token from the shortest to the longest length, vs a full-logits tensor."""
    pts = sorted((r["R"], r["peak_step_gib"]) for r in rows if r["algo"] == algo and r["G"] == base_g)
    if len(pts) < 2:
        return {}
    (r0, m0), (r1, m1) = pts[0], pts[-1]
    per_token_kib = (m1 - m0) * GIB / 1024 / ((r1 - r0) * base_g)
    return {"algo": algo, "from_R": r0, "to_R": r1, "peak_growth_gib": m1 - m0,
            "growth_kib_per_response_token": per_token_kib}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if worker_main(argv, lite_step_job):
        return 0
    ap = argparse.ArgumentParser(prog="python -m bench.memory_scaling", description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    ap.add_argument("--groups", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--base-group", type=int, default=2, help="G of the length sweep")
    ap.add_argument("--base-length", type=int, default=256, help="response length of the group sweep")
    ap.add_argument("--algos", nargs="+", default=["grpo", "srpo"])
    ap.add_argument("--chunk", type=int, default=256, help="train.logprob_chunk")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (0 = torch default)")
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--model-dir", default=None, help="use this model instead of building the bench model")
    ap.add_argument("--name", default="memory_scaling", help="result file name (bench/results/NAME.json)")
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sweep for smoke tests")
    ap.add_argument("--replan", action="store_true",
                    help="recompute the planner columns of the saved result with the current planner; no measuring")
    a = ap.parse_args(argv)
    if a.replan:
        path = Path(a.results_dir or RESULTS_DIR) / f"{a.name}.json"
        data = json.loads(path.read_text())
        data["rows"] = [add_plan(r) for r in data["rows"]]
        data["replanned"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(table(data["rows"], COLUMNS))
        print(f"rewrote {path}")
        return 0
    if a.quick:
        a.lengths, a.groups, a.base_length, a.vocab, a.hidden = [8, 16], [2, 4], 8, 4096, 64
    model = a.model_dir or str(build_bench_model(vocab=a.vocab, hidden=a.hidden, intermediate=4 * a.hidden,
                                                 layers=a.layers))
    from lite_srpo.model.dims import load_model_dims

    dims = load_model_dims(model)  # the model actually measured (--model-dir may differ from the flags)
    a.vocab, a.hidden, a.layers = dims.vocab, dims.hidden, dims.layers
    rows, errors = [], []
    for g, r in sweep_points(a.lengths, a.groups, a.base_group, a.base_length):
        for algo in a.algos:
            job = {"model": model, "algo": algo, "G": g, "R": r, "B": 1, "micro_batch": min(a.micro_batch, g),
                   "chunk": a.chunk, "threads": a.threads}
            res = measure_in_subprocess("bench.memory_scaling", job)
            if "error" in res:
                errors.append(res)
                print(f"  {algo} G={g} R={r}: FAILED {res['error'][-300:]}", file=sys.stderr)
                continue
            rows.append(summarise(res, a.vocab))
            print(f"  {algo} G={g} R={r}: peak {rows[-1]['peak_step_gib']:.3f} GiB, {rows[-1]['step_s']:.1f} s",
                  flush=True)
    growth = [s for s in (slopes(rows, algo, a.base_group) for algo in a.algos) if s]
    print(table(rows, COLUMNS))
    if growth:
        print()
        print(table(growth, ["algo", "from_R", "to_R", "peak_growth_gib", "growth_kib_per_response_token"]))
        print(f"(a full fp32 logits row is {a.vocab * 4 / 1024:.0f} KiB per response token)")
    path = write_result(a.name, {
        "model": {"path": model, "vocab": a.vocab, "hidden": a.hidden, "layers": a.layers},
        "settings": {"chunk": a.chunk, "micro_batch": a.micro_batch, "threads": a.threads, "prompts_per_step": 1,
                     "load_in_4bit": True, "lora_r": 16, "beta": 0.0, "min_new_tokens": "= max_new_tokens"},
        "rows": rows, "growth": growth, "errors": errors,
        "full_logits_kib_per_token": a.vocab * 4 / 1024,
        "notes": ["peak_step_gib: peak during one RL step (generation, scoring passes, update) after the "
                  "high-water mark was reset post-load; peak_setup_gib: peak of loading the model",
                  "CPU figures are process RSS (VmHWM); CUDA figures are torch.cuda.max_memory_allocated"],
    }, a.results_dir)
    print(f"wrote {path}")
    return 1 if errors and not rows else 0


if __name__ == "__main__":
    raise SystemExit(main())
