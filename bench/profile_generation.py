"""Where one rollout's time goes: prefill vs decode, the model forward vs generate's own per-step work,
the lm_head over the full vocabulary, 4-bit linears, the vision tower, sampling.

Runs `lite_srpo.rl.rollout.generate` (HF generate, as a training step does) on the bench model with
`min_new_tokens = R` (every response full length, as bench/vs_trl.py), G responses for one prompt, one
torch thread. Timings come from forward hooks on the real modules (wall clock, CPU); a second, shorter
rollout runs under `torch.profiler` for the op-level table. Writes bench/results/<name>.json.

    python -m bench.profile_generation --group-size 8 --length 512
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

from bench.common import QUICK_DIMS, bench_recipe, build_bench_model, write_result


class Timers:
    """Wall-clock seconds spent inside hooked modules, per label, and the per-call trace of the model."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.forwards: list[tuple[float, float, int]] = []  # (start, end, input length) of each model forward
        self._start: dict[int, float] = {}
        self.handles: list = []

    def hook(self, module, label: str, trace: bool = False) -> None:
        def pre(mod, args, kwargs):
            self._start[id(mod)] = time.perf_counter()

        def post(mod, args, kwargs, out):
            t1 = time.perf_counter()
            t0 = self._start.pop(id(mod))
            self.seconds[label] += t1 - t0
            self.calls[label] += 1
            if trace:
                ids = kwargs.get("input_ids", args[0] if args else None)
                self.forwards.append((t0, t1, int(ids.shape[1]) if ids is not None else -1))

        self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self.handles.append(module.register_forward_hook(post, with_kwargs=True))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def load(model_path: str, group: int, length: int):
    """The policy as a training run loads it (4-bit, LoRA r=16, fp32 compute on CPU) and one encoded prompt."""
    import tempfile

    from lite_srpo.config import config_from_dict
    from lite_srpo.data.prompts import ResponseFormat
    from lite_srpo.data.tasks import make_task
    from lite_srpo.model.policy import load_policy
    from lite_srpo.rl.rollout import encode_prompt

    cfg = config_from_dict(bench_recipe(model_path, tempfile.gettempdir(),
                                        rollout={"group_size": group, "max_new_tokens": length}))
    policy = load_policy(cfg.model, cfg.lora)
    policy.hf.generation_config.min_new_tokens = length  # every response full length (bench/vs_trl.py)
    sample = make_task("count_shapes", "train", 1, 0, image_size=cfg.data.image_size)[0]
    return policy, encode_prompt(policy, sample, "structured", ResponseFormat())


def timed_rollout(policy, prompt, group: int, length: int, sampler: bool | None = None) -> dict:
    """One rollout with module hooks: prefill / decode split and what each decode step spends.
    `sampler=False`: HF's multinomial sampler instead of lite-srpo's inverse-CDF one (rollout.generate)."""
    import bitsandbytes as bnb
    import torch

    from lite_srpo.rl.rollout import generate

    t = Timers()
    t.hook(policy.hf, "model forward (whole)", trace=True)
    t.hook(policy.hf.get_output_embeddings(), "lm_head")
    t.hook(policy.hf.model.visual, "vision tower")
    for m in policy.hf.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            t.hook(m, "4-bit linears (dequant + matmul)")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    batch = generate(policy, [prompt], group, length, sampler=sampler)
    total = time.perf_counter() - t0
    t.close()
    fw = t.forwards
    prefill = fw[0][1] - fw[0][0]
    decode_forward = sum(e - s for s, e, _ in fw[1:])
    gaps = [fw[i + 1][0] - fw[i][1] for i in range(len(fw) - 1)]
    steps = len(fw) - 1
    per = lambda x: x / max(steps, 1)  # noqa: E731
    lm_head_decode = t.seconds["lm_head"] * steps / max(t.calls["lm_head"], 1)
    return {
        "generate_s": total, "responses": batch.size, "new_tokens_per_row": int(batch.response_mask.sum(1).max()),
        "prompt_tokens": prompt.length, "model_forwards": len(fw),
        "prefill_s": prefill, "prefill_share": prefill / total,
        "decode_steps": steps, "decode_forward_s": decode_forward, "decode_forward_ms_per_step": 1e3 * per(decode_forward),
        "between_forwards_s": sum(gaps), "between_forwards_ms_per_step": 1e3 * per(sum(gaps)),
        "between_forwards_share": sum(gaps) / total,
        "outside_forwards_s": total - prefill - decode_forward - sum(gaps),
        "lm_head_s": t.seconds["lm_head"], "lm_head_calls": t.calls["lm_head"],
        "lm_head_ms_per_decode_step": 1e3 * per(lm_head_decode), "lm_head_share": t.seconds["lm_head"] / total,
        "linear4bit_s": t.seconds["4-bit linears (dequant + matmul)"],
        "linear4bit_share": t.seconds["4-bit linears (dequant + matmul)"] / total,
        "linear4bit_calls": t.calls["4-bit linears (dequant + matmul)"],
        "vision_s": t.seconds["vision tower"], "vision_calls": t.calls["vision tower"],
    }


def alternating_sampler_ab(policy, prompt, group: int, length: int, repeats: int) -> dict:
    """Plain wall time of whole rollouts, alternating HF's sampler and the inverse-CDF one, so that load
    from other processes hits both alike; the ratio of the sums is the sampler's own effect."""
    from lite_srpo.rl.rollout import generate

    policy.hf.generation_config.min_new_tokens = length
    runs = []
    for r in range(repeats):
        for name, sampler in (("hf", False), ("inverse_cdf", None)):
            t0 = time.perf_counter()
            generate(policy, [prompt], group, length, sampler=sampler)
            runs.append({"repeat": r, "sampler": name, "generate_s": time.perf_counter() - t0})
    hf = sum(x["generate_s"] for x in runs if x["sampler"] == "hf")
    inv = sum(x["generate_s"] for x in runs if x["sampler"] == "inverse_cdf")
    out = {"R": length, "runs": runs, "ratio_inverse_cdf_over_hf": inv / hf if hf else None}
    if runs:
        each = ", ".join(f"{x['sampler']} {x['generate_s']:.1f} s" for x in runs)
        print(f"alternating rollouts (R={length}): inverse-CDF / HF = {out['ratio_inverse_cdf_over_hf']:.3f} ({each})")
    return out


def dequant_cost(policy, rows: int) -> dict:
    """One decode-sized input through the largest 4-bit linear, against the same weight dequantized once
    to fp32: the gap is what dequantizing on every call costs."""
    import bitsandbytes as bnb
    import torch

    layer = max((m for m in policy.hf.modules() if isinstance(m, bnb.nn.Linear4bit)),
                key=lambda m: m.in_features * m.out_features)
    x = torch.randn(rows, 1, layer.in_features)
    w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    reps = 200
    with torch.no_grad():
        base_out = layer.base_layer(x) if hasattr(layer, "base_layer") else layer(x)
        t0 = time.perf_counter()
        for _ in range(reps):
            layer(x)
        t4 = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            x @ w.T
        tf = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        td = (time.perf_counter() - t0) / reps
    del base_out
    return {"layer_shape": [layer.out_features, layer.in_features], "rows": rows, "linear4bit_ms": 1e3 * t4,
            "fp32_matmul_ms": 1e3 * tf, "dequantize_only_ms": 1e3 * td}


def profiled_rollout(policy, prompt, group: int, length: int, top: int = 15, sampler: bool | None = None) -> list[dict]:
    """A short rollout under torch.profiler: the ops that take the most CPU time (self time)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lite_srpo.rl.rollout import generate

    policy.hf.generation_config.min_new_tokens = length
    torch.manual_seed(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(policy, [prompt], group, length, sampler=sampler)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6,
             "self_share": e.self_cpu_time_total / total} for e in events[:top]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_generation", description=__doc__.splitlines()[0])
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--profile-length", type=int, default=64, help="response length of the torch.profiler rollout")
    ap.add_argument("--ab-repeats", type=int, default=3,
                    help="alternating HF-sampler / inverse-CDF rollouts (plain timing, no hooks) for the sampler ratio")
    ap.add_argument("--ab-length", type=int, default=256, help="response length of the alternating rollouts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="generation_profile")
    ap.add_argument("--results-dir", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny vocabulary and lengths (smoke test)")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    dims = dict(QUICK_DIMS) if a.quick else {}
    if a.quick:
        a.length, a.profile_length = 8, 4
    model = str(build_bench_model(**dims))
    policy, prompt = load(model, a.group_size, a.length)
    timed_hf = timed_rollout(policy, prompt, a.group_size, a.length, sampler=False)
    timed = timed_rollout(policy, prompt, a.group_size, a.length)
    ops_hf = profiled_rollout(policy, prompt, a.group_size, a.profile_length, sampler=False)
    ops = profiled_rollout(policy, prompt, a.group_size, a.profile_length)
    dq = dequant_cost(policy, a.group_size)
    ab = alternating_sampler_ab(policy, prompt, a.group_size, a.length if a.quick else a.ab_length, a.ab_repeats)
    print(f"HF multinomial sampler: generate {timed_hf['generate_s']:.1f} s, generate's own work between forwards "
          f"{timed_hf['between_forwards_ms_per_step']:.1f} ms/step; inverse-CDF sampler (default): "
          f"{timed['generate_s']:.1f} s ({timed['generate_s'] / timed_hf['generate_s']:.2f}x)")
    print(f"generate {timed['generate_s']:.1f} s for {timed['responses']} x {timed['new_tokens_per_row']} tokens; "
          f"prefill {timed['prefill_s']:.2f} s ({100 * timed['prefill_share']:.1f} %); decode forward "
          f"{timed['decode_forward_ms_per_step']:.1f} ms/step, generate's own work between forwards "
          f"{timed['between_forwards_ms_per_step']:.1f} ms/step ({100 * timed['between_forwards_share']:.1f} %); "
          f"lm_head {timed['lm_head_ms_per_decode_step']:.1f} ms/step ({100 * timed['lm_head_share']:.1f} %); "
          f"4-bit linears {100 * timed['linear4bit_share']:.1f} %")
    for row in ops:
        print(f"  {row['op']:<40} {row['calls']:>7} calls {row['self_s']:8.3f} s {100 * row['self_share']:5.1f} %")
    path = write_result(a.name, {"settings": {"model": model, "G": a.group_size, "R": a.length,
                                              "profile_R": a.profile_length, "threads": a.threads,
                                              "min_new_tokens": a.length, "load_in_4bit": True, "lora_r": 16},
                                 "timed_rollout": timed, "profiler_top_ops": ops,
                                 "timed_rollout_hf_sampler": timed_hf, "profiler_top_ops_hf_sampler": ops_hf,
                                 "sampler_speedup": timed_hf["generate_s"] / timed["generate_s"],
                                 "sampler_ab": ab,
                                 "dequant_microbench": dq},
                        a.results_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
