"""The LR schedule by hand, exact resume under a warmup + cosine schedule, and refusing to overwrite a run.

The resume test stops a real in-process run with a real SIGTERM after step k (the `GracefulStop`
handler finishes the step, checkpoints and returns), resumes it, and compares every checkpoint with an
uninterrupted run: adapter, every AdamW tensor, scheduler state and the torch / numpy / python RNGs,
bitwise.
"""
from __future__ import annotations

import math
import random
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_same, tiny_recipe
from lite_srpo.config import OptimConfig, config_from_dict
from lite_srpo.errors import LiteSrpoError
from lite_srpo.rewards import builtin as rewards
from lite_srpo.rl import train as train_mod
from lite_srpo.rl.optim import build_scheduler, lr_multiplier
from lite_srpo.run.checkpoint import checkpoint_dirs, latest_checkpoint, load_trainer_state, rng_state
from lite_srpo.run.events import read_events

# ------------------------------------------------------------------------------------------ LR multiplier


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_warmup_is_linear_from_1_over_warmup_to_1(schedule):
    # warmup 4: steps 0..3 give 1/4, 2/4, 3/4, 4/4, whatever comes after
    assert [lr_multiplier(s, 4, 10, schedule) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_decay_after_warmup_by_hand():
    # warmup 4, total 10: progress = (step - 4) / 6
    assert [lr_multiplier(s, 4, 10, "constant") for s in (4, 5, 7, 10, 12)] == [1.0] * 5
    linear = [lr_multiplier(s, 4, 10, "linear") for s in (4, 5, 7, 10, 12)]
    assert linear == pytest.approx([1.0, 5 / 6, 0.5, 0.0, 0.0], abs=1e-12)
    cosine = [lr_multiplier(s, 4, 10, "cosine") for s in (4, 5, 7, 10, 12)]
    # 0.5 (1 + cos(pi p)): p = 0, 1/6, 1/2, 1, 1 (clamped past the end)
    assert cosine == pytest.approx([1.0, 0.5 * (1 + math.sqrt(3) / 2), 0.5, 0.0, 0.0], abs=1e-12)
    # no warmup: the decay starts at step 0
    assert lr_multiplier(0, 0, 10, "cosine") == 1.0
    assert lr_multiplier(5, 0, 10, "linear") == pytest.approx(0.5)
    assert lr_multiplier(5, 0, 10, "cosine") == pytest.approx(0.5)
    # warmup as long as the run: only warmup values, no division by zero
    assert [lr_multiplier(s, 3, 3, "linear") for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_scheduler_applies_the_multiplier_to_the_optimizer():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = build_scheduler(opt, OptimConfig(lr=1e-3, warmup_steps=2, schedule="cosine"), total_steps=6)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(6):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    c = math.cos(math.pi / 4)
    expected = [0.5, 1.0, 1.0, 0.5 * (1 + c), 0.5, 0.5 * (1 - c), 0.0]  # warmup 1/2, 2/2, then p = 0, 1/4 ... 1
    assert lrs == pytest.approx([1e-3 * m for m in expected], abs=1e-15)


# ------------------------------------------------------------------------------------------ exact resume




@pytest.mark.parametrize("optimizer", ["adamw", "paged_adamw8bit"])  # paged 8-bit: the CUDA default
def test_resume_under_warmup_and_cosine_is_bitwise_exact(tiny_qwen, tmp_path, monkeypatch, optimizer):
    steps, stop_after = 5, 3  # warmup 2, so the stop falls in the cosine part

    def noisy(response, sample, fmt):
        """A reward that draws from the numpy and python global RNGs (as a user's reward may), so their
        states matter for the rest of the run."""
        return 0.01 * float(np.random.rand()) + 0.01 * random.random()

    monkeypatch.setitem(rewards.REWARD_FUNCTIONS, "test_noisy", noisy)

    def cfg(root):
        return config_from_dict(tiny_recipe(tiny_qwen, root, train__steps=steps, train__save_every=1,
                                            train__keep_last=steps, rollout__max_new_tokens=6,
                                            optim__schedule="cosine", optim__warmup_steps=2, optim__optimizer=optimizer,
                                            reward__weights={"format": 0.1, "test_length": 1.0, "test_noisy": 1.0}))

    straight = cfg(tmp_path / "straight")
    train_mod.train(straight, quiet=True)
    rng_after_straight = rng_state()

    interrupted = cfg(tmp_path / "interrupted")
    real_step = train_mod.rl_step

    def step_then_sigterm(run, step):
        metrics = real_step(run, step)
        if step == stop_after:
            signal.raise_signal(signal.SIGTERM)  # a real signal, handled by train's GracefulStop
        return metrics

    monkeypatch.setattr(train_mod, "rl_step", step_then_sigterm)
    run = train_mod.train(interrupted, quiet=True)
    status = [e for e in read_events(interrupted.run_dir / "events.jsonl") if e["type"] == "status"][-1]
    assert status["status"] == "stopped" and status["step"] == stop_after
    assert latest_checkpoint(interrupted.run_dir).name == f"step_{stop_after:06d}"
    del run
    # scramble every RNG in between: the resumed run must restore them from the checkpoint
    torch.manual_seed(12345)
    np.random.seed(12345)
    random.seed(12345)
    train_mod.train(interrupted, resume=True, quiet=True)
    rng_after_resumed = rng_state()

    a_dirs, b_dirs = checkpoint_dirs(straight.run_dir), checkpoint_dirs(interrupted.run_dir)
    assert [d.name for d in a_dirs] == [d.name for d in b_dirs] == [f"step_{s:06d}" for s in range(1, steps + 1)]
    lrs = set()
    for a, b in zip(a_dirs, b_dirs):
        assert_same(load_file(str(a / "adapter" / "adapter_model.safetensors")),
                    load_file(str(b / "adapter" / "adapter_model.safetensors")), f"{a.name} adapter")
        sa, sb = load_trainer_state(a), load_trainer_state(b)
        assert sa["optimizer"]["state"], "AdamW moments are saved"
        for key in ("optimizer", "scheduler", "rng", "step"):
            assert_same(sa[key], sb[key], f"{a.name} {key}")
        assert {"torch", "numpy", "python"} <= set(sa["rng"])
        lrs.add(sa["scheduler"]["_last_lr"][0])
    assert len(lrs) >= 4  # warmup and cosine both moved the LR, so resuming the schedule is tested
    assert_same(rng_after_straight, rng_after_resumed, "rng after the run")
    ma = [e for e in read_events(straight.run_dir / "events.jsonl") if e["type"] == "metrics"]
    mb = [e for e in read_events(interrupted.run_dir / "events.jsonl") if e["type"] == "metrics"]
    assert [m["step"] for m in mb] == list(range(1, steps + 1))
    for x, y in zip(ma, mb):
        for key in ("reward/mean", "loss/total", "optim/lr", "completion/len_mean"):
            assert x[key] == y[key], (x["step"], key)


# ------------------------------------------------------------------------------------------ overwrite guard


def test_setup_refuses_to_overwrite_a_run_with_checkpoints(tiny_qwen, tmp_path):
    cfg = config_from_dict(tiny_recipe(tiny_qwen, tmp_path, train__steps=1, rollout__max_new_tokens=4))
    train_mod.train(cfg, quiet=True)
    ckpt = latest_checkpoint(cfg.run_dir)
    assert ckpt is not None
    events_before = (cfg.run_dir / "events.jsonl").read_bytes()

    with pytest.raises(LiteSrpoError) as err:
        train_mod.setup(cfg)
    msg = str(err.value)
    assert "--resume" in msg and ckpt.name in msg and str(cfg.run_dir) in msg
    assert latest_checkpoint(cfg.run_dir) == ckpt  # nothing was removed
    assert (cfg.run_dir / "events.jsonl").read_bytes() == events_before

    resumed = train_mod.setup(cfg, resume=True)  # continuing is allowed
    assert resumed.start_step == 1
    del resumed
    fresh = train_mod.setup(cfg, overwrite=True)  # so is starting over, which clears the old run
    assert fresh.start_step == 0 and latest_checkpoint(cfg.run_dir) is None
    assert not [e for e in read_events(cfg.run_dir / "events.jsonl") if e["type"] == "metrics"]
