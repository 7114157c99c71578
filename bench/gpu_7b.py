"""Qwen2.5-VL-7B (and -3B) shaped SRPO on a 24 GiB memory cap: lite-srpo vs TRL, and the longest response.

Needs a CUDA GPU with bitsandbytes and trl installed (see bench/gpu_wheels.md); `--dry-run` runs every
phase on CPU with tiny shapes and no cap, to check the script itself.

The model is built from the published Qwen2.5-VL config (below) with random bf16 weights and the tiny
tokenizer/processor (so token ids stay below 1,024; the image processor keeps Qwen's pixel limits),
saved to disk, and loaded through lite-srpo's normal path: 4-bit NF4 + double quant, LoRA r=16 on the
seven language-model linears, gradient checkpointing, paged 8-bit AdamW. Each run caps the process at
24 GiB with `torch.cuda.set_per_process_memory_fraction` and runs SRPO with G=8, one 448x448 image,
1,024-token prompts and 2,048-token responses (min_new_tokens = max_new_tokens).

Phases (each run in fresh processes; one command each fits the 10-minute limit of the GPU tool):
    python -m bench.gpu_7b --phase build      --shape 7b   # write the random 7B-shaped checkpoint
    python -m bench.gpu_7b --phase ours       --shape 7b   # lite-srpo SRPO steps under the cap
    python -m bench.gpu_7b --phase trl        --shape 7b   # TRL GRPOTrainer (PEFT + 4-bit) under the cap;
                                                           # if it does not fit: largest G, then length
    python -m bench.gpu_7b --phase max-length --shape 7b   # longest response lite-srpo fits at G=8
    python -m bench.gpu_7b --phase build ours --shape 3b
    python -m bench.gpu_7b --dry-run                       # everything, tiny, on CPU
Results: bench/results/gpu_<shape>_<gpu>.json (one section per phase; `--results-dir $OUT` on the GPU tool).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

from bench.common import (GIB, RESULTS_DIR, apply_cap, bench_samples, build_model, command_line, device_name,
                          lite_step_job, machine_info, measure_in_subprocess, peak_gib, reset_peak, set_threads,
                          step_recipe, table, worker_main)

# Published config.json of Qwen/Qwen2.5-VL-7B-Instruct and -3B-Instruct (the fields that shape the model).
QWEN25_VL_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
                    "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                    "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "hidden_act": "silu"}
SHAPES = {
    "7b": {"published": "Qwen/Qwen2.5-VL-7B-Instruct", "tie": False, "vision": QWEN25_VL_VISION,
           "text": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000,
                    "rms_norm_eps": 1e-6, "hidden_act": "silu"}},
    "3b": {"published": "Qwen/Qwen2.5-VL-3B-Instruct", "tie": True, "vision": QWEN25_VL_VISION,
           "text": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                    "num_attention_heads": 16, "num_key_value_heads": 2, "max_position_embeddings": 128000,
                    "rms_norm_eps": 1e-6, "hidden_act": "silu"}},
    # --dry-run: the same code path on CPU in seconds
    "tiny": {"published": None, "tie": False, "vision": None,
             "text": {"vocab_size": 4096, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 8192}},
}
QWEN_MAX_PIXELS, QWEN_MIN_PIXELS = 12_845_056, 3136  # Qwen2.5-VL processor defaults
RUN = {"G": 8, "B": 1, "prompt_tokens": 1024, "R": 2048, "image_size": 448, "lora_r": 16, "chunk": 1024,
       "micro_batch": 2, "algo": "srpo", "steps": 2, "cap_gib": 24.0}
DRY_RUN = {**RUN, "G": 2, "prompt_tokens": 200, "R": 16, "image_size": 112, "chunk": 64, "steps": 1, "cap_gib": None}
LENGTH_LADDER = [2048, 4096, 8192, 12288, 16384, 24576, 32768, 49152, 65536]
DRY_LADDER = [16, 32, 64]
TRL_FALLBACK_G = [4, 2]
TRL_FALLBACK_R = [1024, 512, 256]
PHASES = ("build", "ours", "trl", "max-length")


def models_dir() -> Path:
    return Path(os.environ.get("LITE_SRPO_GPU_MODELS", "/tmp/lite_srpo_gpu_models"))


def gpu_tag() -> str:
    name = device_name().lower()
    return re.sub(r"[^a-z0-9]+", "_", name.replace("nvidia", "")).strip("_") or "cpu"


# --------------------------------------------------------------------------------------------------
# workers (fresh processes)


def build_job(job: dict) -> dict:
    import torch

    shape = SHAPES[job["shape"]]
    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    path = build_model(job["out"], shape["text"], shape["vision"], tie=shape["tie"],
                       max_pixels=QWEN_MAX_PIXELS, min_pixels=QWEN_MIN_PIXELS,
                       dtype="bfloat16" if cuda else "float32", device="cuda" if cuda else "cpu")
    size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    return {"path": str(path), "seconds": time.perf_counter() - t0, "checkpoint_gib": size / GIB}


def probe_job(job: dict) -> dict:
    """Longest response (SRPO step on synthetic full-length responses) that fits under the cap.

    Generation is skipped (sampling 8 x 32k tokens takes too long to search with): the responses are
    random token ids of exactly R tokens, so the scoring passes and the update - the phases whose memory
    grows with R - run for real. The generation phase at the answer is left to the planner's estimate.
    """
    import tempfile

    import torch

    set_threads(job)
    apply_cap(job)
    from lite_srpo.config import config_from_dict
    from lite_srpo.rl import train as T
    from lite_srpo.rl.rollout import RolloutBatch

    results = []
    with tempfile.TemporaryDirectory(prefix="lite-srpo-probe-") as tmp:
        base_cfg = config_from_dict(step_recipe(job, tmp))
        run = T.setup(base_cfg)
        samples = bench_samples(run.policy.processor, 1, base_cfg.data.image_size, job.get("prompt_tokens"))
        prompts = T.encode_prompts(run, samples)
        real_rollout = T.rollout  # the step's generate call
        gen = torch.Generator().manual_seed(0)

        def attempt(r: int) -> dict:
            n = job["G"]
            ids = torch.randint(10, 1000, (n, r), generator=gen)
            batch = RolloutBatch(prompts=prompts, prompt_of=[0] * n, response_ids=ids,
                                 response_mask=torch.ones_like(ids), texts=[""] * n,
                                 truncated=torch.ones(n, dtype=torch.bool))
            run.cfg = dataclasses.replace(base_cfg, rollout=dataclasses.replace(base_cfg.rollout, max_new_tokens=r))
            T.rollout = lambda *a, **k: batch
            reset_peak()
            t0 = time.perf_counter()
            try:
                T.rl_step(run, 1)
                return {"R": r, "fits": True, "seconds": time.perf_counter() - t0, **peak_gib()}
            except torch.OutOfMemoryError as exc:
                return {"R": r, "fits": False, "error": str(exc).splitlines()[0][:200], **peak_gib()}
            finally:
                T.rollout = real_rollout
                run.optimizer.zero_grad(set_to_none=True)
                T.free_memory()

        good, bad = None, None
        for r in job["ladder"]:
            res = attempt(r)
            results.append(res)
            if not res["fits"]:
                bad = r
                break
            good = r
        for _ in range(job.get("bisect", 2)):  # refine between the last fit and the first failure
            if good is None or bad is None or bad - good <= 256:
                break
            mid = (good + bad) // 2 // 256 * 256
            res = attempt(mid)
            results.append(res)
            good, bad = (mid, bad) if res["fits"] else (good, mid)
    return {"job": job, "attempts": results, "largest_fitting_R": good, "smallest_failing_R": bad,
            "prompt_tokens": prompts[0].length}


def run_job(job: dict) -> dict:
    kind = job["kind"]
    if kind == "build":
        return build_job(job)
    if kind == "ours":
        return lite_step_job(job)
    if kind == "trl":
        from bench.vs_trl import trl_step_job

        return trl_step_job(job)
    if kind == "probe":
        return probe_job(job)
    raise ValueError(f"unknown job kind {kind!r}")


# --------------------------------------------------------------------------------------------------
# phases (parent process)


def _planned(job: dict, prompt_tokens: int, device: str) -> dict:
    import tempfile

    from lite_srpo.config import config_from_dict
    from lite_srpo.model.memory.plan import plan

    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_dict(step_recipe(job, tmp))
    p = plan(cfg, job.get("cap_gib") or 24.0, device=device, prompt_tokens=prompt_tokens)
    return {k: p[k] for k in ("peak_gib", "peak_phase", "phases", "needed_gib", "fits", "max_response_tokens")}


def _step_summary(res: dict) -> dict:
    steps = res["steps"]
    last = steps[-1]
    keys = ("time/step", "time/generation", "time/passes", "time/extra_passes", "time/update",
            "perf/gen_tokens_per_s", "perf/update_tokens_per_s")
    return {**{k: last.get(k) for k in keys}, "steps": len(steps), **res["peak_step"],
            "phase_peaks": last.get("phase_peaks")}


def phase_ours(job: dict, device: str) -> dict:
    res = measure_in_subprocess("bench.gpu_7b", {**job, "kind": "ours"}, timeout=1800)
    if "error" in res:
        return {"fits": False, "error": res["error"]}
    out = {"fits": True, "prompt_tokens": res["prompt_tokens"], "setup_s": res["setup_s"], **_step_summary(res),
           "all_steps": res["steps"]}
    try:
        out["planned"] = _planned(job, res["prompt_tokens"], device)
    except Exception as exc:  # noqa: BLE001 - the measurement stands without the plan
        out["planned"] = {"error": str(exc)}
    return out


def _trl_attempt(job: dict) -> dict:
    res = measure_in_subprocess("bench.gpu_7b", {**job, "kind": "trl", "steps": 1}, timeout=1800)
    if "error" in res:
        oom = "out of memory" in res["error"].lower() or "OutOfMemoryError" in res["error"]
        return {"G": job["G"], "R": job["R"], "fits": False, "oom": oom, "error": res["error"][-500:]}
    last = res["steps"][-1]
    return {"G": job["G"], "R": job["R"], "fits": True, "time/step": last["time/step"],
            "time/generation": last["time/generation"], **res["peak_step"], "adapter_dtypes": res.get("adapter_dtypes")}


def phase_trl(job: dict) -> dict:
    """TRL at the target config; if it does not fit, the largest G at R, then the largest R at G."""
    first = _trl_attempt(job)
    out = {"target": first, "fits": first["fits"], "fallbacks": []}
    if first["fits"] or not first.get("oom"):
        return out
    g_ladder = [g for g in TRL_FALLBACK_G if g < job["G"]]
    r_ladder = [r for r in TRL_FALLBACK_R if r < job["R"]] if not job.get("dry") else [max(1, job["R"] // 2)]
    for g in g_ladder:
        res = _trl_attempt({**job, "G": g, "micro_batch": min(job["micro_batch"], g)})
        out["fallbacks"].append(res)
        if res["fits"]:
            out["largest_G_at_R"] = g
            break
    for r in r_ladder:
        res = _trl_attempt({**job, "R": r})
        out["fallbacks"].append(res)
        if res["fits"]:
            out["largest_R_at_G"] = r
            break
    return out


def phase_max_length(job: dict, device: str, dry: bool) -> dict:
    ladder = DRY_LADDER if dry else LENGTH_LADDER
    res = measure_in_subprocess("bench.gpu_7b", {**job, "kind": "probe", "ladder": ladder}, timeout=3600)
    if "error" in res:
        return {"error": res["error"]}
    out = {k: res[k] for k in ("attempts", "largest_fitting_R", "smallest_failing_R", "prompt_tokens")}
    if res["largest_fitting_R"]:
        try:
            out["planned_at_largest"] = _planned({**job, "R": res["largest_fitting_R"]}, res["prompt_tokens"], device)
        except Exception as exc:  # noqa: BLE001
            out["planned_at_largest"] = {"error": str(exc)}
    return out


def result_path(shape: str, results_dir: str | None, dry: bool) -> Path:
    name = f"gpu_{shape}_{gpu_tag()}" + ("_dryrun" if dry else "") + ".json"
    return Path(results_dir or RESULTS_DIR) / name


def save(path: Path, section: str, data: dict, settings: dict) -> None:
    """Merge one phase's section into the shape's result file (phases run in separate commands)."""
    body = json.loads(path.read_text()) if path.is_file() else {}
    body.update({"benchmark": "gpu_7b", "machine": machine_info(), "settings": settings,
                 "command_" + section: command_line()})
    body[section] = data
    if section == "ours" and data.get("fits"):
        body["peak_allocated_gib"] = data.get("peak_allocated_gib")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if worker_main(argv, run_job):
        return 0
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_7b", description=__doc__.splitlines()[0])
    ap.add_argument("--phase", nargs="+", choices=PHASES + ("all",), default=["all"])
    ap.add_argument("--shape", choices=["7b", "3b"], default="7b")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, no memory cap")
    ap.add_argument("--cap-gib", type=float, default=RUN["cap_gib"])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--results-dir", default=None)
    a = ap.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not a.dry_run:
        print("error: no CUDA GPU here; run with --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    shape = "tiny" if a.dry_run else a.shape
    phases = list(PHASES) if "all" in a.phase else a.phase
    settings = dict(DRY_RUN if a.dry_run else RUN)
    if not a.dry_run:
        settings["cap_gib"] = a.cap_gib
    if a.steps:
        settings["steps"] = a.steps
    model_path = models_dir() / f"qwen2_5_vl_{shape}_shaped"
    job = {**settings, "model": str(model_path), "dry": a.dry_run, "threads": 0 if cuda else 1}
    path = result_path(shape, a.results_dir, a.dry_run)
    meta = {**settings, "shape": shape, "published_config": SHAPES[shape]["published"], "model_path": str(model_path),
            "load_in_4bit": True, "lora": "r16 alpha32 dropout0, 7 LLM linears", "gradient_checkpointing": True,
            "min_new_tokens": "= max_new_tokens", "optimizer": "auto (paged 8-bit AdamW on CUDA)"}
    device = "cuda" if cuda else "cpu"
    if "build" in phases or not (model_path / "bench_spec.json").is_file():
        res = measure_in_subprocess("bench.gpu_7b", {"kind": "build", "shape": shape, "out": str(model_path)},
                                    timeout=3600)
        print(f"build: {res}")
        save(path, "build", res, meta)
        if "error" in res:
            return 1
    if "ours" in phases:
        res = phase_ours(job, device)
        print(f"ours: {json.dumps({k: v for k, v in res.items() if k not in ('all_steps', 'phase_peaks')})}")
        save(path, "ours", res, meta)
    if "trl" in phases:
        res = phase_trl(job)
        print(f"trl: {json.dumps(res)}")
        save(path, "trl", res, meta)
    if "max-length" in phases:
        res = phase_max_length(job, device, a.dry_run)
        if "attempts" in res:
            peaks = [k for k in res["attempts"][0] if k.startswith("peak")]
            print(table(res["attempts"], ["R", "fits", "seconds"] + peaks))
        print(f"max-length: largest fitting R = {res.get('largest_fitting_R')}")
        save(path, "max_length", res, meta)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
