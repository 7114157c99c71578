"""`make demo`: tiny model → SFT warm-up → held-out eval → RL → held-out eval, as one table."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .config import load_config
from .data import load_splits
from .evaluate import evaluate
from .modeling import load_policy
from .pipeline import ensure_warmup
from .tiny import make_tiny
from .train import response_format, train

DEMO_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "demo_cpu.yaml"


def held_out(policy, cfg, test_set) -> dict:
    return evaluate(policy, test_set, cfg.data.template, response_format(cfg),
                    max_new_tokens=cfg.rollout.max_new_tokens, answer_fallback=cfg.reward.answer_fallback)


def run_demo(recipe: str | None = None, overrides: list[str] | None = None) -> dict:
    t_start = time.perf_counter()
    cfg = load_config(recipe or DEMO_RECIPE, overrides or [])
    model_dir = Path(cfg.model.path)
    if not (model_dir / "config.json").is_file():
        print(f"[demo] building a tiny random Qwen2.5-VL in {model_dir}")
        make_tiny("qwen2_5_vl", model_dir, size="demo", seed=cfg.train.seed)
    t0 = time.perf_counter()
    print(f"[demo] SFT warm-up: {cfg.sft.steps} steps on reference traces of '{cfg.data.task}'")
    rl_cfg = ensure_warmup(cfg)
    t_sft = time.perf_counter() - t0
    _, test_set = load_splits(cfg.data, seed=cfg.train.seed)

    before_policy = load_policy(rl_cfg.model, rl_cfg.lora)
    before = held_out(before_policy, rl_cfg, test_set)
    del before_policy
    print(f"[demo] warm-up checkpoint: held-out accuracy {before['accuracy']:.3f}, format {before['format_rate']:.3f}")

    t0 = time.perf_counter()
    print(f"[demo] RL: {rl_cfg.algorithm.name}, {rl_cfg.train.steps} steps, G={rl_cfg.rollout.group_size}")
    run = train(rl_cfg, overwrite=True)
    t_rl = time.perf_counter() - t0
    after = held_out(run.policy, rl_cfg, test_set)

    result = {"task": cfg.data.task, "algorithm": rl_cfg.algorithm.name, "protocol": after["protocol"],
              "n_test": len(test_set), "before": before, "after": after, "sft_seconds": t_sft, "rl_seconds": t_rl,
              "rl_steps": rl_cfg.train.steps, "total_seconds": time.perf_counter() - t_start}
    (cfg.run_dir / "demo_result.json").write_text(json.dumps(result, indent=1))
    print(format_table(result))
    return result


def format_table(r: dict) -> str:
    rows = [
        ("held-out accuracy", f"{r['before']['accuracy']:.3f}", f"{r['after']['accuracy']:.3f}",
         f"{100 * (r['after']['accuracy'] - r['before']['accuracy']):+.1f} pts"),
        ("format rate", f"{r['before']['format_rate']:.3f}", f"{r['after']['format_rate']:.3f}", ""),
        ("mean response tokens", f"{r['before']['mean_length']:.1f}", f"{r['after']['mean_length']:.1f}", ""),
    ]
    lines = [f"\n{r['task']} — {r['n_test']} held-out samples, {r['protocol']} decoding, "
             f"{r['algorithm']} ({r['rl_steps']} steps)",
             f"{'':24}{'after SFT warm-up':>18}{'after RL':>12}{'change':>12}"]
    lines += [f"{a:24}{b:>18}{c:>12}{d:>12}" for a, b, c, d in rows]
    lines.append(f"wall time: SFT {r['sft_seconds']:.0f} s, RL {r['rl_seconds']:.0f} s, total {r['total_seconds']:.0f} s")
    return "\n".join(lines)
