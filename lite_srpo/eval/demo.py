"""`make demo`: tiny model → SFT warm-up → held-out eval → RL → held-out eval, under both protocols.

Held-out accuracy is reported the two ways the papers do: greedy decoding (VGPO) and avg@8 at T = 1.0
(PAPO, VPPO), before and after RL, each with a 95 % bootstrap interval over the test items. Greedy
accuracy cannot see the sharpening RL does first (the sampled distribution concentrating on the answers
greedy already gets right); avg@8 can.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..config import RunConfig, load_config
from ..data.prompts import response_format
from ..data.splits import load_all_splits
from ..data.tasks.base import Sample
from ..model.policy import load_policy
from ..model.tiny import make_tiny
from ..rl.evaluate import Protocol, evaluate
from ..rl.pipeline import ensure_warmup
from ..rl.train import setup, train, write_curves_quietly
from ..run.events import read_events
from .stats import paired_difference, with_ci

DEMO_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo_cpu.yaml"
PROTOCOLS = (Protocol("greedy"), Protocol("avg@k", k=8, temperature=1.0))


def protocol_key(p: Protocol) -> str:
    return "greedy" if p.name == "greedy" else f"avg@{p.k}"


def held_out(policy, cfg: RunConfig, samples: list[Sample], protocol: Protocol = Protocol("greedy")) -> dict:
    return evaluate(policy, samples, cfg.data.template, response_format(cfg.data), protocol=protocol,
                    max_new_tokens=cfg.rollout.max_new_tokens, answer_fallback=cfg.reward.answer_fallback,
                    batch_rows=cfg.rollout.generation_rows)


def both_protocols(policy, cfg: RunConfig, samples: list[Sample], seed: int) -> dict[str, dict]:
    """Greedy and avg@8 (T = 1) accuracy with 95 % CIs; sampling is seeded so reruns are comparable."""
    import torch

    out = {}
    for p in PROTOCOLS:
        torch.manual_seed(seed)
        out[protocol_key(p)] = with_ci(held_out(policy, cfg, samples, p))
    return out


def ensure_model(cfg: RunConfig) -> None:
    """The demo builds its tiny model at `model.path` when nothing is there yet."""
    model_dir = Path(cfg.model.path)
    if not (model_dir / "config.json").is_file():
        print(f"[demo] building a tiny random Qwen2.5-VL in {model_dir}")
        make_tiny("qwen2_5_vl", model_dir, size="demo", seed=cfg.train.seed)


def srpo_role_weights(run_dir: Path) -> dict[str, float]:
    """Mean SRPO weight and token share per role over the run's steps (empty for other algorithms)."""
    metrics = [e for e in read_events(run_dir / "events.jsonl") if e["type"] == "metrics"]
    keys = ("srpo/weight_perception", "srpo/weight_reasoning", "srpo/weight_other", "srpo/perception_frac",
            "srpo/reasoning_frac")
    out = {}
    for k in keys:
        values = [e[k] for e in metrics if e.get(k) is not None]
        if values:
            out[k.split("/", 1)[1]] = float(np.mean(values))
    return out


def run_demo(recipe: str | None = None, overrides: list[str] | None = None) -> dict:
    t_start = time.perf_counter()
    cfg = load_config(recipe or DEMO_RECIPE, overrides or [])
    ensure_model(cfg)
    t0 = time.perf_counter()
    print(f"[demo] SFT warm-up: {cfg.sft.steps} steps on reference traces of '{cfg.data.task}'")
    rl_cfg = ensure_warmup(cfg)
    t_sft = time.perf_counter() - t0
    _, _, test_set = load_all_splits(cfg.data, seed=cfg.train.seed)
    eval_seed = cfg.train.seed + 1234

    t0 = time.perf_counter()
    before_policy = load_policy(rl_cfg.model, rl_cfg.lora)
    before = both_protocols(before_policy, rl_cfg, test_set, eval_seed)
    del before_policy
    t_eval = time.perf_counter() - t0
    print(f"[demo] warm-up checkpoint: greedy {before['greedy']['accuracy']:.3f}, "
          f"avg@8 {before['avg@8']['accuracy']:.3f} ({t_eval:.0f} s)")

    t0 = time.perf_counter()
    print(f"[demo] RL: {rl_cfg.algorithm.name}, {rl_cfg.train.steps} steps, G={rl_cfg.rollout.group_size}, "
          f"{rl_cfg.rollout.prompts_per_step} prompts/step, lr {rl_cfg.optim.lr:g}")
    sft_events = [e for e in read_events(cfg.run_dir / "events.jsonl") if e["type"] == "sft"]
    run = setup(rl_cfg, overwrite=True)  # clears the run folder's log, warm-up included
    for e in sft_events:  # ... so the warm-up's loss goes back in: curves.png and the Monitor show it
        run.events.write("sft", e.get("step"), **{k: v for k, v in e.items() if k not in ("type", "step", "time")})
    run = train(rl_cfg, run=run)
    t_rl = time.perf_counter() - t0
    t0 = time.perf_counter()
    after = both_protocols(run.policy, rl_cfg, test_set, eval_seed)
    t_eval += time.perf_counter() - t0

    result = summarize(cfg, rl_cfg, before, after, len(test_set))
    result.update({"sft_seconds": t_sft, "rl_seconds": t_rl, "eval_seconds": t_eval,
                   "srpo_role_weights": srpo_role_weights(run.run_dir),
                   "total_seconds": time.perf_counter() - t_start})
    curves = write_curves_quietly(run.run_dir)
    if curves is not None:
        result["curves"] = str(curves)
    (cfg.run_dir / "demo_result.json").write_text(json.dumps(result, indent=1))
    print(format_table(result))
    return result


def summarize(cfg: RunConfig, rl_cfg: RunConfig, before: dict, after: dict, n_test: int) -> dict:
    """demo_result.json: the greedy summary at the top level (the file's original shape), both protocols
    with CIs under their names, and each protocol's paired change over the same test items."""
    change = {k: paired_difference(after[k]["items"], before[k]["items"]) for k in before}
    return {"task": cfg.data.task, "algorithm": rl_cfg.algorithm.name, "seed": cfg.train.seed, "n_test": n_test,
            "protocol": "greedy", "rl_steps": rl_cfg.train.steps, "lr": rl_cfg.optim.lr,
            "before": {**before["greedy"], **before}, "after": {**after["greedy"], **after}, "change": change}


def _ci(e: dict) -> str:
    lo, hi = e["ci95"]
    return f"{e['accuracy']:.3f} [{lo:.2f}, {hi:.2f}]"


def format_table(r: dict) -> str:
    b, a, c = r["before"], r["after"], r["change"]
    rows = []
    for key in ("greedy", "avg@8"):
        lo, hi = c[key]["ci95"]
        rows.append((f"accuracy, {key}", _ci(b[key]), _ci(a[key]),
                     f"{100 * c[key]['mean']:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}]"))
    for key in ("greedy", "avg@8"):
        rows.append((f"format rate, {key}", f"{b[key]['format_rate']:.3f}", f"{a[key]['format_rate']:.3f}", ""))
        rows.append((f"truncated, {key}", f"{b[key]['truncated_frac']:.3f}", f"{a[key]['truncated_frac']:.3f}", ""))
        rows.append((f"mean tokens, {key}", f"{b[key]['mean_length']:.1f}", f"{a[key]['mean_length']:.1f}", ""))
    lines = [f"\n{r['task']} — {r['n_test']} held-out samples, {r['algorithm']} ({r['rl_steps']} steps, "
             f"lr {r['lr']:g}), seed {r['seed']}; 95 % bootstrap CIs over test items",
             f"{'':22}{'after SFT warm-up':>20}{'after RL':>20}{'change (paired)':>28}"]
    lines += [f"{w:22}{x:>20}{y:>20}{z:>28}" for w, x, y, z in rows]
    w = r.get("srpo_role_weights") or {}
    if w:
        lines.append(f"SRPO mean weight: perception {w.get('weight_perception', 1):.3f}, reasoning "
                     f"{w.get('weight_reasoning', 1):.3f}, other {w.get('weight_other', 1):.3f}")
    lines.append(f"wall time: SFT {r['sft_seconds']:.0f} s, RL {r['rl_seconds']:.0f} s, eval {r['eval_seconds']:.0f} s, "
                 f"total {r['total_seconds']:.0f} s")
    if r.get("curves"):
        lines.append(f"curves: {r['curves']}")
    return "\n".join(lines)
