"""End to end on a tiny 4-bit model: events, checkpoints, resume, every algorithm, CLI errors."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_recipe
from lite_srpo.config import ALGORITHMS, config_from_dict
from lite_srpo.rl.train import train
from lite_srpo.run.checkpoint import checkpoint_dirs, latest_checkpoint
from lite_srpo.run.events import read_events

ROOT = Path(__file__).resolve().parents[2]


def adapter_of(ckpt: Path) -> dict:
    return load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))


def test_three_steps_write_events_and_checkpoint_then_resume(tiny_qwen, tmp_path):
    cfg = config_from_dict(tiny_recipe(tiny_qwen, tmp_path, train__steps=2))
    run = train(cfg, quiet=True)
    events = read_events(run.run_dir / "events.jsonl")
    kinds = [e["type"] for e in events]
    assert kinds.count("metrics") == 2 and "tokens" in kinds and kinds[-1] == "status"
    assert events[-1]["status"] == "finished"
    metrics = [e for e in events if e["type"] == "metrics"]
    for key in ("reward/mean", "accuracy", "format_rate", "loss/total", "time/step", "mem/peak_gb",
                "perf/gen_tokens_per_s", "completion/len_mean"):
        assert key in metrics[0], key
    tokens = next(e for e in events if e["type"] == "tokens")["samples"][0]
    assert tokens["tokens"] and {"t", "role", "score", "weight", "adv"} <= set(tokens["tokens"][0])
    first = latest_checkpoint(run.run_dir)
    assert first.name == "step_000002"
    before = adapter_of(first)

    cfg3 = config_from_dict(tiny_recipe(tiny_qwen, tmp_path, train__steps=3))
    run3 = train(cfg3, resume=True, quiet=True)
    assert latest_checkpoint(run3.run_dir).name == "step_000003"
    after = adapter_of(latest_checkpoint(run3.run_dir))
    assert any(not torch.equal(before[k], after[k]) for k in before), "resumed step did not update the adapter"
    steps = [e["step"] for e in read_events(run3.run_dir / "events.jsonl") if e["type"] == "metrics"]
    assert steps == [1, 2, 3]


def test_resume_is_exact(tiny_qwen, tmp_path):
    """Stopped after step 2 and resumed == uninterrupted, bitwise on CPU (adapter and metrics)."""
    straight = config_from_dict(tiny_recipe(tiny_qwen, tmp_path / "a", train__steps=3, train__save_every=1))
    train(straight, quiet=True)
    first = config_from_dict(tiny_recipe(tiny_qwen, tmp_path / "b", train__steps=2, train__save_every=1))
    train(first, quiet=True)
    resumed = config_from_dict(tiny_recipe(tiny_qwen, tmp_path / "b", train__steps=3, train__save_every=1))
    train(resumed, resume=True, quiet=True)
    a = adapter_of(latest_checkpoint(straight.run_dir))
    b = adapter_of(latest_checkpoint(resumed.run_dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = [e for e in read_events(straight.run_dir / "events.jsonl") if e["type"] == "metrics"]
    mb = [e for e in read_events(resumed.run_dir / "events.jsonl") if e["type"] == "metrics"]
    assert [e["step"] for e in mb] == [1, 2, 3]
    for key in ("reward/mean", "loss/total", "completion/len_mean"):
        assert ma[2][key] == mb[2][key], key


RATIO_TOL_BF16 = 1e-2
"""bf16 keeps 8 bits of mantissa: a log-prob of -5 carries an error near 0.02, and the update's forward (grad
on, checkpointed) need not round as the no-grad pass did."""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("algorithm", [a for a in ALGORITHMS])
def test_every_algorithm_runs_a_step(tiny_qwen, tmp_path, algorithm, dtype):
    """fp32, and bf16 as `dtype: auto` gives on CUDA (4-bit base computing in bf16, fp32 LoRA)."""
    recipe = tiny_recipe(tiny_qwen, tmp_path, train__steps=1, algorithm__name=algorithm,
                         algorithm__dynamic_sampling=False, model__dtype=dtype)
    if algorithm == "grpo":
        recipe["algorithm"]["beta"] = 0.01  # exercises the reference pass (adapter disabled)
    run = train(config_from_dict(recipe), quiet=True)
    metrics = next(e for e in read_events(run.run_dir / "events.jsonl") if e["type"] == "metrics")
    assert math.isfinite(metrics["loss/total"]) and abs(metrics["loss/total"]) < 10
    # one rollout, one update: the update runs on-policy, so every ratio is 1 and nothing is clipped
    assert metrics["ratio/mean"] == pytest.approx(1.0, abs=1e-5 if dtype == "float32" else RATIO_TOL_BF16)
    assert metrics["clip/frac"] == 0.0
    if algorithm in ("srpo", "papo", "vppo"):
        assert metrics["time/extra_passes"] > 0
    checks = {
        # the reference is the adapter switched off, and LoRA's B starts at 0: KL is exactly 0 at step 1
        "grpo": lambda m: 0.0 <= m["kl/k3"] <= 1e-6,
        "dapo": lambda m: m["clip/frac_high"] == 0.0 and "kl/k3" not in m,  # β = 0: no reference pass
        "dr_grpo": lambda m: "kl/k3" not in m and math.isfinite(m["loss/pg"]),
        "srpo": lambda m: m["srpo/weight_other"] == 1.0 and 0.5 < m["srpo/weight_perception"] < 1.5
        and 0.5 < m["srpo/weight_reasoning"] < 1.5 and m["srpo/weight_min"] > 0 and "format_violations" in m,
        "papo": lambda m: m["papo/kl_prcp"] >= 0.0 and m["papo/entropy_ori"] >= 0.0 and m["papo/entropy_aug"] >= 0.0,
        "vppo": lambda m: 0.0 < m["vppo/kept_frac"] <= 1.0 and m["vppo/alpha_min"] <= m["vppo/alpha_max"],
        "vgpo": lambda m: 0.0 < m["vgpo/token_factor_min"] <= m["vgpo/token_factor_mean"] <= m["vgpo/token_factor_max"]
        and m["vgpo/traj_factor_mean"] > 0.0,
    }
    assert checks[algorithm](metrics), {k: v for k, v in metrics.items() if "/" in k}


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lite_srpo", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("override,needle", [
    ("rollout.group_size=1", "rollout.group_size"),
    ("optim.lr=-1", "optim.lr"),
    ("rollout.bogus=3", "rollout.bogus"),
    ("algorithm.name=nope", "grpo, dapo"),
])
def test_cli_bad_recipe_values_give_one_clear_line(tiny_qwen, tmp_path, override, needle):
    path = tmp_path / "r.yaml"
    recipe = tiny_recipe(tiny_qwen, tmp_path)
    recipe.pop("reward")
    path.write_text(yaml.safe_dump(recipe))
    res = run_cli("train", str(path), override)
    assert res.returncode == 2
    assert needle in res.stderr and "Traceback" not in res.stderr


def test_cli_missing_image_names_file_and_row(tiny_qwen, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"image": "missing.png", "question": "q?", "answer": "1"}) + "\n")
    recipe = tiny_recipe(tiny_qwen, tmp_path)
    recipe["data"] = {"train_file": str(data)}
    recipe.pop("reward")  # the subprocess does not have the test-only reward
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = run_cli("train", str(path))
    assert res.returncode == 2 and "d.jsonl" in res.stderr and "missing.png" in res.stderr
    assert "Traceback" not in res.stderr


def test_eval_on_start_gives_the_curve_a_step_0_baseline_once(tiny_qwen, tmp_path):
    """train.eval_on_start: an eval event at step 0 before any update, then every eval_every steps;
    resuming does not evaluate step 0 again."""
    from lite_srpo.config import config_from_dict
    from lite_srpo.rl.train import train
    from lite_srpo.run.events import read_events

    recipe = tiny_recipe(tiny_qwen, tmp_path, train__steps=2, train__save_every=1, train__eval_every=2,
                         train__eval_samples=2, train__eval_on_start=True)
    train(config_from_dict(recipe), quiet=True)
    events = read_events(tmp_path / "t" / "events.jsonl")
    evals = [e["step"] for e in events if e["type"] == "eval"]
    first_metrics = next(i for i, e in enumerate(events) if e["type"] == "metrics")
    assert evals == [0, 2]
    assert [e["type"] for e in events[:first_metrics]].count("eval") == 1  # before the first update
    recipe["train"]["steps"] = 4
    train(config_from_dict(recipe), resume=True, quiet=True)
    evals = [e["step"] for e in read_events(tmp_path / "t" / "events.jsonl") if e["type"] == "eval"]
    assert evals == [0, 2, 4]


def test_deterministic_recipe_turns_on_the_gpu_determinism_settings_and_trains(tiny_qwen, tmp_path):
    """train.deterministic: the settings are global torch state, so the test puts the defaults back."""
    import os

    recipe = tiny_recipe(tiny_qwen, tmp_path, train__steps=1, train__deterministic=True, train__save_every=0)
    try:
        run = train(config_from_dict(recipe), quiet=True)
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and not torch.backends.cuda.matmul.allow_tf32
        metrics = next(e for e in read_events(run.run_dir / "events.jsonl") if e["type"] == "metrics")
        assert math.isfinite(metrics["loss/total"])
        train(config_from_dict(tiny_recipe(tiny_qwen, tmp_path / "off", train__steps=1, train__save_every=0)),
              quiet=True)
        assert not torch.are_deterministic_algorithms_enabled()  # the next recipe's own setting wins
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
