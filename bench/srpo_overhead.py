"""Step time of SRPO, PAPO, VPPO and VGPO relative to GRPO on the same rollouts, and where the time goes.

One process generates the rollouts once; every algorithm then runs the rest of a real `rl_step`
(rewards, roles, its no-grad scoring passes, token shaping, the policy update) on exactly those
responses, alternating over repeats. The step time of an algorithm is the shared generation time plus
its own scoring and update time. All algorithms run with beta = 0 (no reference pass) and without
dynamic sampling, so the difference is the algorithm's own passes; `grpo_beta0.01` shows what the
reference-KL pass costs. Target: SRPO <= 1.35x GRPO (two extra no-grad passes).

    python -m bench.srpo_overhead            # G=4, R=512 on the bench model, 3 repeats (CPU: about 10 minutes)
    python -m bench.srpo_overhead --quick    # smoke test
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from bench.common import (build_bench_model, measure_in_subprocess, set_threads, step_recipe, table, worker_main,
                          write_result)

TARGET = 1.35
VARIANTS: dict[str, dict] = {
    "grpo": {"name": "grpo"},
    "srpo": {"name": "srpo"},
    "srpo_consistency_corrupted": {"name": "srpo", "srpo": {"consistency": "corrupted"}},
    "papo": {"name": "papo"},
    "vppo": {"name": "vppo"},
    "vgpo": {"name": "vgpo"},
    "grpo_beta0.01": {"name": "grpo", "beta": 0.01},
}


def overhead_job(job: dict) -> dict:
    """Generate once, then time every variant's non-generation part of `rl_step` on those rollouts."""
    import tempfile

    set_threads(job)
    from lite_srpo.config import config_from_dict
    from lite_srpo.rl import train as T
    from lite_srpo.rl.algorithms import ALGORITHM_SPECS

    with tempfile.TemporaryDirectory(prefix="lite-srpo-bench-") as tmp:
        def cfg_for(variant: str):
            algo = {"beta": 0.0, "dynamic_sampling": False, **VARIANTS[variant]}
            return config_from_dict(step_recipe({**job, "algo": algo["name"], "algorithm": algo}, tmp))

        run = T.setup(cfg_for("grpo"))
        cfg = run.cfg
        run.policy.hf.generation_config.min_new_tokens = cfg.rollout.max_new_tokens
        prompts = T.encode_prompts(run, T.prompts_for_step(run.train_set, 1, cfg.rollout.prompts_per_step,
                                                            cfg.train.seed))
        t0 = time.perf_counter()
        from lite_srpo.rl.rollout import generate

        batch = generate(run.policy, prompts, cfg.rollout.group_size, cfg.rollout.max_new_tokens,
                         cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k)
        t_gen = time.perf_counter() - t0
        real_rollout = T.rollout
        T.rollout = lambda *a, **k: batch  # every variant scores and updates on the same responses
        try:
            T.rl_step(run, 1)  # warm-up: optimizer state allocation, first-call overheads (not counted)
            records = []
            for repeat in range(job.get("repeats", 2)):
                for variant in job["variants"]:
                    run.cfg = cfg_for(variant)
                    run.spec = ALGORITHM_SPECS[run.cfg.algorithm.name]
                    m = T.rl_step(run, 2 + repeat)
                    own = m["time/step"] - m["time/generation"]
                    records.append({"variant": variant, "repeat": repeat, "own_s": own, "passes_s": m["time/passes"],
                                    "extra_passes_s": m["time/extra_passes"], "update_s": m["time/update"],
                                    "other_s": own - m["time/passes"] - m["time/update"]})
        finally:
            T.rollout = real_rollout
        return {"job": job, "generation_s": t_gen, "tokens": int(batch.response_mask.sum()), "records": records}


def summarise(res: dict) -> list[dict]:
    gen = res["generation_s"]
    rows = []
    for variant in res["job"]["variants"]:
        recs = [r for r in res["records"] if r["variant"] == variant]
        # median over repeats: robust to a repeat slowed by other work on a shared machine
        med = {k: statistics.median(r[k] for r in recs) for k in ("own_s", "passes_s", "extra_passes_s", "update_s",
                                                                    "other_s")}
        rows.append({"variant": variant, "generation_s": gen, **med, "step_s": gen + med["own_s"]})
    base = next(r for r in rows if r["variant"] == "grpo")
    for r in rows:
        r["step_vs_grpo"] = r["step_s"] / base["step_s"]
        r["without_generation_vs_grpo"] = r["own_s"] / base["own_s"]
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if worker_main(argv, overhead_job):
        return 0
    ap = argparse.ArgumentParser(prog="python -m bench.srpo_overhead", description=__doc__.splitlines()[0])
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="srpo_overhead")
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    dims = {}
    if a.quick:
        dims = {"vocab": 4096, "hidden": 64, "intermediate": 256, "layers": 2, "heads": 2, "kv_heads": 1}
        a.length, a.group_size, a.micro_batch, a.chunk, a.repeats = 8, 2, 2, 16, 1
    if "grpo" not in a.variants:
        a.variants = ["grpo"] + a.variants
    job = {"model": str(build_bench_model(**dims)), "G": a.group_size, "R": a.length, "B": 1,
           "micro_batch": a.micro_batch, "chunk": a.chunk, "threads": a.threads, "repeats": a.repeats,
           "variants": a.variants}
    res = measure_in_subprocess("bench.srpo_overhead", job)
    if "error" in res:
        print(res["error"], file=sys.stderr)
        write_result(a.name, {"settings": job, "rows": [], "errors": [res]}, a.results_dir)
        return 1
    rows = summarise(res)
    print(table(rows, ["variant", "generation_s", "passes_s", "extra_passes_s", "update_s", "other_s", "step_s",
                       "step_vs_grpo", "without_generation_vs_grpo"]))
    srpo = next((r for r in rows if r["variant"] == "srpo"), None)
    verdict = None if srpo is None else srpo["step_vs_grpo"] <= TARGET
    if srpo is not None:
        print(f"SRPO step = {srpo['step_vs_grpo']:.2f}x GRPO (target <= {TARGET}); without generation "
              f"{srpo['without_generation_vs_grpo']:.2f}x")
    path = write_result(a.name, {
        "settings": {**job, "beta": 0.0, "dynamic_sampling": False, "load_in_4bit": True, "lora_r": 16},
        "target_srpo_vs_grpo": TARGET, "srpo_target_met": verdict, "rows": rows, "records": res["records"],
        "response_tokens": res["tokens"],
        "notes": ["generation is measured once and shared: every variant scores and updates the same rollouts",
                  "passes_s = all no-grad passes (old log-probs + the algorithm's extra passes); extra_passes_s "
                  "= the algorithm's extra passes only; other_s = prompts, rewards, roles, shaping",
                  "each variant uses its preset (aggregation, clips) but beta = 0 and no dynamic sampling",
                  "per-variant times are medians over the repeats (records holds every repeat)"],
    }, a.results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
