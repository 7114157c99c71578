"""lite-srpo vs TRL's GRPOTrainer on the same model, data, G, lengths and LoRA: peak memory and step time.

Both sides: the bench model (Qwen2.5-VL architecture, two layers, V = 151,936) loaded in 4-bit NF4
with double quant, LoRA r=16 / alpha 32 / dropout 0 on the seven language-model linears, gradient
checkpointing, count_shapes prompts (one 56x56 image), G responses of exactly R tokens
(min_new_tokens = R), one prompt per step, micro-batch = G (one backward over the group), beta = 0,
token-level DAPO loss (TRL's default `loss_type="dapo"`; lite-srpo `agg: token`), clip 0.2/0.2, lr 1e-5.
TRL keeps its other defaults. Runs alternate (ours, TRL, ours, ...) and each is a fresh process.

    python -m bench.vs_trl                    # R=2048, G=2: lite-srpo with the recipe defaults vs TRL
    python -m bench.vs_trl --ablate           # + each change alone (chunk 1024, no vision cache, HF sampler,
                                              #   the old-logp pass) and all of them undone
                                              #   and all three together (the defaults before issue 13)
    python -m bench.vs_trl --quick            # tiny smoke test

The row `lite-srpo (defaults)` runs what a recipe gets without setting anything: `train.logprob_chunk:
auto` and vision features encoded once per image per step (lite_srpo/model/vision_cache.py).
"""
from __future__ import annotations

import argparse
import sys
import time

from bench.common import (QUICK_DIMS, apply_cap, bench_samples, build_bench_model, current_gib, lite_step_job,
                          measure_in_subprocess, peak_gib, reset_peak, set_threads, table, worker_main, write_result)

TARGET_MEMORY_RATIO = 0.5
TARGET_TIME_RATIO = 0.7  # issue 13: <= 0.5x TRL peak memory and <= 0.7x its step time at the defaults
MATCHED_ALGORITHM = {"agg": "token", "adv_scale": "group", "clip_low": 0.2, "clip_high": 0.2}


def trl_step_job(job: dict) -> dict:
    """One (or more) GRPOTrainer optimizer steps with the same settings; peak reset at each step begin."""
    import tempfile

    set_threads(job)
    apply_cap(job)
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lite_srpo.data.prompts import ResponseFormat, build_messages
    from lite_srpo.model.policy import VISION_PREFIXES, disable_cpu_4bit_repacking, lora_target_regex
    from lite_srpo.model.processors import load_processor, model_family
    from lite_srpo.rewards.builtin import compute_rewards

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    g, r, m = job["G"], job["R"], job.get("micro_batch", job["G"])
    fmt = ResponseFormat()
    processor = load_processor(job["model"])
    samples = bench_samples(processor, 8, job.get("image_size", 56), job.get("prompt_tokens"))
    data = Dataset.from_list([{"prompt": build_messages(s, "structured", fmt), "image": s.images[0], "index": i}
                              for i, s in enumerate(samples)])

    def reward(completions, index, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        values, _ = compute_rewards(texts, [samples[i] for i in index], {"accuracy": 0.9, "format": 0.1}, fmt)
        return values

    model = AutoModelForImageTextToText.from_pretrained(
        job["model"], dtype=dtype, device_map={"": 0} if cuda else {"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
                                               llm_int8_skip_modules=VISION_PREFIXES["qwen2_5_vl"] + ["lm_head"]))
    if not cuda:
        disable_cpu_4bit_repacking(model)  # bitsandbytes CPU bug (platform.md §3), same fix as lite-srpo
    family = model_family(model.config)
    lora = LoraConfig(r=job.get("lora_r", 16), lora_alpha=2 * job.get("lora_r", 16), lora_dropout=0.0, bias="none",
                      target_modules=lora_target_regex(family, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"], False))
    steps: list[dict] = []

    class Measure(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.start = current_gib()
            reset_peak()
            self.t0 = time.perf_counter()
            gen_time[0] = 0.0

        def on_step_end(self, args, state, control, **kw):
            steps.append({"time/step": time.perf_counter() - self.t0, "time/generation": gen_time[0], **peak_gib(),
                          "start_gib": self.start})

    gen_time = [0.0]
    with tempfile.TemporaryDirectory(prefix="lite-srpo-trl-") as tmp:
        args = GRPOConfig(
            output_dir=tmp, use_cpu=not cuda, bf16=cuda, per_device_train_batch_size=m,
            gradient_accumulation_steps=g // m, num_generations=g, max_completion_length=r,
            generation_kwargs={"min_new_tokens": r}, beta=0.0, loss_type="dapo", epsilon=0.2, temperature=1.0,
            learning_rate=1e-5, max_steps=job.get("steps", 1), logging_steps=1, report_to="none",
            save_strategy="no", gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
            seed=0, dataloader_num_workers=0)
        t0 = time.perf_counter()
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data,
                              processing_class=processor, peft_config=lora, callbacks=[Measure()])
        generate = trainer.model.generate

        def timed_generate(*a, **kw):
            t = time.perf_counter()
            try:
                return generate(*a, **kw)
            finally:
                gen_time[0] += time.perf_counter() - t

        trainer.model.generate = timed_generate
        setup_s = time.perf_counter() - t0
        trainer.train()
    adapter_dtypes = sorted({str(p.dtype) for n, p in trainer.model.named_parameters() if p.requires_grad})
    return {"job": job, "setup_s": setup_s, "steps": steps,
            "peak_step": {k: max(s[k] for s in steps) for k in peak_gib()}, "adapter_dtypes": adapter_dtypes}


def run_job(job: dict) -> dict:
    if job["system"] == "trl":
        return trl_step_job(job)
    from lite_srpo.model import vision_cache
    from lite_srpo.rl import algorithms, sampling, train

    vision_cache.ENABLED = job.get("vision_cache", True)
    sampling.ENABLED = job.get("sampler", "inverse_cdf") == "inverse_cdf"
    if job.get("old_pass") == "always":  # the separate no-grad old-log-prob pass, as before issue 13
        train.old_pass_needed = lambda spec, mini_batches: True
    try:
        return lite_step_job(job)
    finally:
        vision_cache.ENABLED = sampling.ENABLED = True
        train.old_pass_needed = algorithms.old_pass_needed


def lite_name(job: dict) -> str:
    """`lite-srpo (defaults)` for the recipe defaults; otherwise what differs from them."""
    parts = [] if job["chunk"] == "auto" else [f"chunk {job['chunk']}"]
    if not job.get("vision_cache", True):
        parts.append("no vision cache")
    if job.get("sampler", "inverse_cdf") != "inverse_cdf":
        parts.append("HF sampler")
    if job.get("old_pass") == "always":
        parts.append("old-logp pass")
    return "lite-srpo (defaults)" if not parts else "lite-srpo (" + ", ".join(
        (["defaults"] if job["chunk"] == "auto" else []) + parts) + ")"


def row_of(res: dict) -> dict:
    job = res["job"]
    key = "peak_allocated_gib" if "peak_allocated_gib" in res["peak_step"] else "peak_rss_gib"
    last = res["steps"][-1]
    name = "TRL GRPOTrainer" if job["system"] == "trl" else lite_name(job)
    return {"system": name, "repeat": job["repeat"], "G": job["G"], "R": job["R"], "peak_gib": res["peak_step"][key],
            "start_gib": last["start_gib"], "step_increase_gib": last[key] - last["start_gib"],
            "logprob_chunk": res.get("logprob_chunk"), "step_s": last["time/step"],
            "generation_s": last.get("time/generation"),
            "update_s": last.get("time/update"), "passes_s": last.get("time/passes"), "job": job}


def ratios(rows: list[dict]) -> list[dict]:
    """Per lite-srpo variant: mean peak, step time and its split over repeats; divided by TRL's when TRL ran."""
    trl = [r for r in rows if r["system"].startswith("TRL")]
    out = []
    names = sorted({r["system"] for r in rows if not r["system"].startswith("TRL")},
                   key=lambda n: (n != "lite-srpo (defaults)", n))
    for name in names:
        mine = [r for r in rows if r["system"] == name]
        peak = sum(r["peak_gib"] for r in mine) / len(mine)
        step = sum(r["step_s"] for r in mine) / len(mine)
        inc = sum(r["step_increase_gib"] for r in mine) / len(mine)
        split = {f"{k}_s": _mean([r.get(f"{k}_s") for r in mine]) for k in ("generation", "passes", "update")}
        row = {"system": name, "peak_gib": peak, "step_increase_gib": inc, "step_s": step, **split}
        if trl:
            t_peak = sum(r["peak_gib"] for r in trl) / len(trl)
            t_time = sum(r["step_s"] for r in trl) / len(trl)
            t_inc = sum(r["step_increase_gib"] for r in trl) / len(trl)
            row.update({"trl_peak_gib": t_peak, "memory_ratio": peak / t_peak, "trl_step_increase_gib": t_inc,
                        "increase_ratio": inc / t_inc, "memory_target_met": peak / t_peak <= TARGET_MEMORY_RATIO,
                        "trl_step_s": t_time, "time_ratio": step / t_time,
                        "time_target_met": step / t_time <= TARGET_TIME_RATIO})
        out.append(row)
    return out


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def effects(summary: list[dict]) -> list[dict]:
    """Each change's own effect: the defaults row against each ablation row (defaults / ablation)."""
    base = next((r for r in summary if r["system"] == "lite-srpo (defaults)"), None)
    if base is None:
        return []
    out = []
    for r in summary:
        if r is base:
            continue
        row = {"defaults_vs": r["system"], "peak_ratio": base["peak_gib"] / r["peak_gib"],
               "step_ratio": base["step_s"] / r["step_s"]}
        for k in ("generation_s", "passes_s", "update_s"):
            if base.get(k) and r.get(k):
                row[k.replace("_s", "_ratio")] = base[k] / r[k]
        out.append(row)
    return out


def _chunk(text: str) -> int | str:
    if text == "auto":
        return text
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: auto or a whole number >= 1")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if worker_main(argv, run_job):
        return 0
    ap = argparse.ArgumentParser(prog="python -m bench.vs_trl", description=__doc__.splitlines()[0])
    ap.add_argument("--group-size", type=int, default=2)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--chunks", type=_chunk, nargs="+", default=["auto"],
                    help="lite-srpo train.logprob_chunk values (auto = the recipe default)")
    ap.add_argument("--ablate", action="store_true",
                    help="also run each change of issue 13 alone: chunk 1024 (the old default), the defaults without "
                         "the vision-feature cache, with HF's multinomial sampler; and all three (the old defaults)")
    ap.add_argument("--no-trl", action="store_true",
                    help="lite-srpo variants only (with --ablate: each change's own effect, on one core)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="vs_trl")
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    dims = dict(QUICK_DIMS) if a.quick else {}
    if a.quick:
        a.length, a.chunks = 8, ["auto"]
    model = str(build_bench_model(**dims))
    base = {"model": model, "G": a.group_size, "R": a.length, "B": 1, "micro_batch": a.group_size,
            "threads": a.threads, "algo": "grpo", "beta": 0.0, "algorithm": MATCHED_ALGORITHM}
    rows, errors = [], []
    for repeat in range(a.repeats):
        systems = []
        variants = [{"chunk": c} for c in a.chunks]
        if a.ablate:
            variants += [{"chunk": 1024}, {"chunk": "auto", "vision_cache": False}, {"chunk": "auto", "sampler": "hf"},
                         {"chunk": "auto", "old_pass": "always"},
                         {"chunk": 1024, "vision_cache": False, "sampler": "hf", "old_pass": "always"}]
        for i, variant in enumerate(variants):
            systems.append({**base, "system": "lite", **variant, "repeat": repeat})
            if i == 0 and not a.no_trl:
                systems.append({**base, "system": "trl", "chunk": None, "repeat": repeat})
        for job in systems:
            res = measure_in_subprocess("bench.vs_trl", job)
            if "error" in res:
                errors.append(res)
                print(f"  {job['system']}: FAILED {res['error'][-400:]}", file=sys.stderr)
                continue
            rows.append(row_of(res))
            if job["system"] == "trl":
                rows[-1]["trl_adapter_dtypes"] = res.get("adapter_dtypes")
            print(f"  {rows[-1]['system']} #{repeat}: peak {rows[-1]['peak_gib']:.3f} GiB, "
                  f"step {rows[-1]['step_s']:.1f} s", flush=True)
    print(table(rows, ["system", "repeat", "G", "R", "logprob_chunk", "start_gib", "peak_gib", "step_increase_gib", "step_s",
                       "generation_s", "passes_s", "update_s"]))
    summary = ratios(rows)
    if summary:
        print()
        trl_cols = ["trl_peak_gib", "memory_ratio", "memory_target_met", "trl_step_s", "time_ratio", "time_target_met"]
        print(table(summary, ["system", "peak_gib", "step_increase_gib", "step_s", "generation_s", "passes_s",
                              "update_s"] + (trl_cols if "trl_peak_gib" in summary[0] else [])))
    effect_rows = effects(summary)
    if effect_rows:
        print()
        print(table(effect_rows, ["defaults_vs", "peak_ratio", "step_ratio", "generation_ratio", "passes_ratio",
                                  "update_ratio"]))
    path = write_result(a.name, {
        "settings": {**{k: v for k, v in base.items() if k != "model"}, "model": model, "lora": "r16 alpha32 dropout0",
                     "load_in_4bit": True, "gradient_checkpointing": True, "prompts_per_step": 1,
                     "targets": {"memory_ratio_max": TARGET_MEMORY_RATIO, "time_ratio_max": TARGET_TIME_RATIO}},
        "rows": rows, "summary": summary, "effects": effect_rows, "errors": errors,
        "notes": [
            "peak: the step's own peak (reset at the step's start, after loading); CPU = process RSS (VmHWM); "
            "start_gib: memory in use when the step starts (model, optimizer, imports: TRL's process also imports "
            "trl and datasets); step_increase_gib = peak - start",
            "TRL 1.16 computes log-probs with a fused, chunked lm_head (trl/kernels/chunked_logprob.py, tiles of "
            "4096 tokens x 32768 vocab entries): it no longer materialises [tokens x vocab] logits, unlike the "
            "TRL 1.10 snapshot studied in research/anchors.md §2",
            "TRL casts the LoRA weights of a quantized model to bf16 (its QLoRA choice); lite-srpo keeps them fp32",
            "with beta=0 and one iteration TRL reuses the update's own log-probs as the old ones; lite-srpo runs a "
            "separate no-grad old-log-prob pass (needed for mini_batches > 1 and by the SRPO/PAPO/VPPO scores)",
            "TRL scores every position of prompt + response on CPU (no Triton: its non-compact path); lite-srpo "
            "scores only response positions",
        ],
    }, a.results_dir)
    print(f"wrote {path}")
    return 1 if errors and not rows else 0


if __name__ == "__main__":
    raise SystemExit(main())
