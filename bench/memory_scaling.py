"""Peak memory of one GRPO and one SRPO step versus response length and group size.

The model has two small decoder layers but Qwen's real 151,936-token vocabulary, so the logits term
is the real one: a `[tokens × vocab]` fp32 logits tensor would cost 594 KiB per response token. With
lite-srpo's streamed lm_head the logits cost `chunk × V` floats whatever the length, so the peak must
grow only by the small per-token terms (activations, KV cache). Each point runs in a fresh process
(peak RSS on CPU, `torch.cuda.max_memory_allocated` on CUDA), reset after loading the model.

    python -m bench.memory_scaling                      # full sweep (CPU: 40-80 minutes)
    python -m bench.memory_scaling --quick              # smoke test (seconds)
    python -m bench.memory_scaling --features --lengths 4096 16384   # the long-response features (below)

`--features` measures the policy update alone (one teacher-forced forward and backward of one response
of R tokens, no generation) with `train.offload_activations` and `train.recompute_chunk` off and on:
peak memory and step time of each (one process per length, the feature sets switched on one model). On CPU the host is the device, so offloading cannot lower RSS there;
its device bytes are the hooks' own count (`offload_kept_mib` vs `offload_moved_mib`).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

from bench.common import (GIB, RESULTS_DIR, allocated_peak_gib, bench_samples, build_bench_model, lite_step_job,
                          measure_in_subprocess, current_gib, peak_gib, reset_peak, set_threads, table, worker_main, write_result)

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


# (offload, chunk on); the last chunks the attention projections too (a bench variant, not a recipe setting)
FEATURES = {"off": (False, 0), "offload": (True, 0), "recompute_chunk": (False, 1024), "both": (True, 1024),
            "recompute_chunk_attn": (False, 1024)}
FEATURE_COLUMNS = ["R", "features", "start_gib", "peak_update_gib", "planned_update_gib", "plan_error",
                   "allocated_gib", "planned_allocated_gib", "alloc_error", "update_s", "slowdown", "offload_kept_mib"]


def planned_update(job: dict, features: str, prompt_tokens: int) -> tuple[float, float]:
    """The planner's figures for the `--features` job (one row of `prompt_tokens` + R tokens, micro-batch
    1, the feature set's keys switched on): the update-phase peak (fixed memory + update terms, CPU RSS),
    and the update terms alone without glibc's kept heap (what the update allocates: the counterpart of
    the measured allocation peak, and of the card's terms)."""
    import tempfile

    from bench.common import step_recipe
    from lite_srpo.config import config_from_dict
    from lite_srpo.model.memory.plan import phase_gib, plan
    from lite_srpo.model.memory.terms import Term

    offload, chunk = FEATURES[features]
    step = {"model": job["model"], "algo": "grpo", "G": 2, "R": job["R"], "B": 1, "micro_batch": 1,
            "chunk": job["chunk"]}
    with tempfile.TemporaryDirectory() as tmp:
        data = step_recipe(step, tmp)
        data["train"].update(offload_activations=offload, recompute_chunk=job["recompute_chunk"] if chunk else 0)
        cfg = config_from_dict(data)
    p = plan(cfg, device="cpu", prompt_tokens=prompt_tokens)
    live = [Term(**t) for t in p["terms"] if not t["name"].startswith("freed heap")]  # glibc's, not allocated
    return p["phases"]["update"], phase_gib(live, "update", live=True)


def replan_features(row: dict) -> dict:
    """A `--features` row's planner columns and errors, recomputed with the current planner."""
    if row["features"] in FEATURES and row["features"] != "recompute_chunk_attn":
        row["planned_update_gib"], row["planned_allocated_gib"] = planned_update(row["job"], row["features"],
                                                                                 row["prompt"])
        row["plan_error"] = row["peak_update_gib"] / row["planned_update_gib"] - 1
        row["alloc_error"] = row["allocated_gib"] / row["planned_allocated_gib"] - 1
    return row


def _release_heap() -> None:
    """Give freed heap back to the OS (glibc malloc_trim) so one point's leftovers do not hide the next's peak."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _set_features(policy, name: str, recompute_chunk: int):
    """Switch the loaded policy to one feature set; returns the hooks whose byte counts are reported."""
    from lite_srpo.model.activation_memory import ActivationOffload, install_chunked_mlp, install_offload

    offload, chunk = FEATURES[name]
    hooks = ActivationOffload(policy.device, move=offload)  # move=False only counts what stays on the device
    install_offload(policy.hf, hooks)
    # a chunk longer than any input = off
    install_chunked_mlp(policy.hf, recompute_chunk if chunk else 2**62, attention=name == "recompute_chunk_attn")
    return hooks


def update_job(job: dict) -> dict:
    """One update forward + backward over one prompt + R random response tokens, for each feature set.

    One process per length: the model loads once (loading dominates on a busy CPU) and the feature sets
    are switched on the same policy, with a warm-up update first and the heap trimmed between points."""
    import time

    import torch

    from lite_srpo.config import LoraConfig, ModelConfig
    from lite_srpo.data.prompts import ResponseFormat
    from lite_srpo.model.policy import load_policy
    from lite_srpo.model.streaming import token_logprobs
    from lite_srpo.model.vision_cache import VisionFeatureCache
    from lite_srpo.rl.passes import response_hidden
    from lite_srpo.rl.rollout import collate, encode_prompt, pad_token_id

    set_threads(job)
    policy = load_policy(ModelConfig(path=job["model"], load_in_4bit=True, dtype="auto"), LoraConfig(r=16, alpha=32))
    policy.causal_trailing = True  # as with either feature on (no padding here, so no mask either way)
    prompt = encode_prompt(policy, bench_samples(policy.processor, 1, 56)[0], "structured", ResponseFormat())
    cache = VisionFeatureCache(policy)
    weight, bias = policy.lm_head()

    # response ids never include a vision special token (with a small vocabulary, random ids hit them):
    # the model would look for image features that are not there
    special = torch.tensor([t for t in (getattr(policy.config, k, None) for k in (
        "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")) if t is not None])

    def update(r: int) -> float:
        responses = torch.randint(0, policy.config.text_config.vocab_size, (1, r),
                                  generator=torch.Generator().manual_seed(0))
        responses[torch.isin(responses, special)] = 0
        inputs, plen = collate([prompt], pad_token_id(policy), responses, torch.ones_like(responses), None,
                               policy.device)
        inputs = cache.apply(inputs, [prompt.visual])
        t0 = time.perf_counter()
        hidden = policy.hidden_states(inputs)
        logp = token_logprobs(response_hidden(hidden, plen, r), weight, responses.to(policy.device),
                              chunk=job["chunk"], lm_head_bias=bias)
        (-logp.mean()).backward()
        if policy.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        policy.model.zero_grad(set_to_none=True)
        return seconds

    _set_features(policy, "both", job["recompute_chunk"])
    update(64)  # warm-up: one-time allocations and kernels, every code path once
    out = {"job": job, "prompt_tokens": prompt.length, "points": []}
    for name in job["feature_sets"]:
        hooks = _set_features(policy, name, job["recompute_chunk"])
        _release_heap()
        reset_peak()
        start = current_gib()
        times = [update(job["R"]) for _ in range(job.get("reps", 1))]
        stats = hooks.stats
        peak = peak_gib()
        # a second, profiled update: the peak of live tensor bytes (CUDA's max_memory_allocated on CPU)
        hooks.stats = type(stats)()
        allocated, _ = allocated_peak_gib(lambda: update(job["R"]))
        out["points"].append({"features": name, "peak": peak, "start_gib": start, "update_s": min(times),
                              "allocated_gib": allocated,
                              "times": times,
                              "offload_kept_mib": (stats.kept_bytes / len(times) + stats.peak_resident_bytes) / 2**20,
                              "offload_moved_mib": stats.moved_bytes / len(times) / 2**20})
    return out


def worker(job: dict) -> dict:
    return update_job(job) if job.get("kind") == "update" else lite_step_job(job)


def feature_sweep(a, model: str) -> list[dict]:
    """Every length (one fresh process each) with each feature set; slowdown against `off`."""
    rows = []
    for r in a.lengths:
        job = {"kind": "update", "model": model, "R": r, "feature_sets": a.feature_sets,
               "recompute_chunk": a.recompute_chunk, "chunk": a.chunk, "threads": a.threads, "reps": a.reps}
        res = measure_in_subprocess("bench.memory_scaling", job)
        if "error" in res:
            print(f"  R={r}: FAILED {res['error'][-300:]}", file=sys.stderr)
            continue
        base = None
        for pt in res["points"]:
            peak_key = "peak_allocated_gib" if "peak_allocated_gib" in pt["peak"] else "peak_rss_gib"
            row = {"R": r, "features": pt["features"], "prompt": res["prompt_tokens"], "job": job,
                   "start_gib": pt["start_gib"], "peak_update_gib": pt["peak"][peak_key],
                   **{k: pt[k] for k in ("update_s", "times", "allocated_gib", "offload_kept_mib",
                                         "offload_moved_mib")}}
            replan_features(row)  # the planner's figures beside the measurement (none for recompute_chunk_attn)
            base = row if row["features"] == "off" else base
            row["slowdown"] = row["update_s"] / base["update_s"] if base else None
            rows.append(row)
            planned = (f", planned {row['planned_update_gib']:.3f} GiB ({100 * row['plan_error']:+.1f} %); "
                       f"allocated {row['allocated_gib']:.3f}, planned {row['planned_allocated_gib']:.3f} "
                       f"({100 * row['alloc_error']:+.1f} %)" if "plan_error" in row else "")
            print(f"  R={r} {row['features']}: peak {row['peak_update_gib']:.3f} GiB{planned}, "
                  f"{row['update_s']:.1f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if worker_main(argv, worker):
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
    ap.add_argument("--features", action="store_true",
                    help="measure the update alone with train.offload_activations / train.recompute_chunk off and on")
    ap.add_argument("--feature-sets", nargs="+", default=list(FEATURES), choices=list(FEATURES))
    ap.add_argument("--recompute-chunk", type=int, default=1024, help="train.recompute_chunk when on")
    ap.add_argument("--reps", type=int, default=1, help="updates per point (--features); the fastest is reported")
    ap.add_argument("--replan", action="store_true",
                    help="recompute the planner columns of the saved result with the current planner; no measuring")
    a = ap.parse_args(argv)
    if a.replan:
        path = Path(a.results_dir or RESULTS_DIR) / f"{a.name}.json"
        data = json.loads(path.read_text())
        data["rows"] = [replan_features(r) if "features" in r else add_plan(r) for r in data["rows"]]
        data["replanned"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        path.write_text(json.dumps(data, indent=2) + "\n")
        print(table(data["rows"], FEATURE_COLUMNS if data["rows"] and "features" in data["rows"][0] else COLUMNS))
        print(f"rewrote {path}")
        return 0
    if a.quick:
        a.lengths, a.groups, a.base_length, a.vocab, a.hidden = [8, 16], [2, 4], 8, 4096, 64
    model = a.model_dir or str(build_bench_model(vocab=a.vocab, hidden=a.hidden, intermediate=4 * a.hidden,
                                                 layers=a.layers))
    from lite_srpo.model.dims import load_model_dims

    dims = load_model_dims(model)  # the model actually measured (--model-dir may differ from the flags)
    a.vocab, a.hidden, a.layers = dims.vocab, dims.hidden, dims.layers
    if a.features:
        rows = feature_sweep(a, model)
        print(table(rows, FEATURE_COLUMNS))
        path = write_result(a.name, {
            "model": {"path": model, "vocab": a.vocab, "hidden": a.hidden, "layers": a.layers},
            "settings": {"chunk": a.chunk, "recompute_chunk": a.recompute_chunk, "threads": a.threads,
                         "reps": a.reps, "rows": 1, "load_in_4bit": True, "lora_r": 16},
            "rows": rows,
            "notes": ["peak_update_gib: peak of one update forward + backward after loading (RSS on CPU, "
                      "max_memory_allocated on CUDA); update_s: its time (fastest of reps)",
                      "offload_kept_mib: checkpointed-layer input bytes the saved-tensor hooks leave on the device "
                      "(with offload: the most brought back at once in backward); offload_moved_mib: bytes copied "
                      "to host. On CPU the host is the device, so offload cannot lower RSS"]}, a.results_dir)
        print(f"wrote {path}")
        return 0 if rows else 1
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
