"""Out-of-memory retries in `train.step_with_oom_retry`, on the real loop (tiny 4-bit Qwen2.5-VL, LoRA).

There is no GPU here, so the out-of-memory error is injected: `torch.OutOfMemoryError` (what CUDA raises)
from the update's log-prob forward (`train.rows_logprobs`) whenever a micro-batch has more rows than a
pretend memory limit allows. Everything else is the real code path.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from conftest import assert_same, tiny_recipe
from lite_srpo.rewards import builtin as rewards
from lite_srpo.config import config_from_dict
from lite_srpo.rl import train as train_mod
from lite_srpo.run.events import read_events


def oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected: no GPU here)")


def adapter(run) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in run.policy.model.named_parameters() if p.requires_grad}


def adam_steps(run) -> set[float]:
    return {float(s["step"]) for s in run.optimizer.state_dict()["state"].values()}


def test_micro_batch_halves_8_to_4_to_2(tiny_qwen, tmp_path, monkeypatch):
    """A memory limit of 2 rows per micro-batch: 8 fails, 4 fails, 2 fits; one update is applied."""
    cfg = config_from_dict(tiny_recipe(tiny_qwen, tmp_path, train__steps=1, train__micro_batch_size=8,
                                       rollout__prompts_per_step=4, rollout__max_new_tokens=6))
    run = train_mod.setup(cfg)
    assert run.micro_batch == 8
    real = train_mod.rows_logprobs
    sizes: list[int] = []

    def limited(policy, batch, rows, *args, **kwargs):
        sizes.append(len(rows))
        if len(rows) > 2:
            raise oom()
        return real(policy, batch, rows, *args, **kwargs)

    monkeypatch.setattr(train_mod, "rows_logprobs", limited)
    metrics = train_mod.step_with_oom_retry(run, 1)
    assert sizes == [8, 4, 2, 2, 2, 2]  # 8 rows: one try at 8, one at 4, then four micro-batches of 2
    assert run.micro_batch == 2
    warnings = [e["message"] for e in read_events(cfg.run_dir / "events.jsonl") if e["type"] == "warning"]
    assert warnings == ["out of memory: retrying with train.micro_batch_size -> 4",
                        "out of memory: retrying with train.micro_batch_size -> 2"]
    assert metrics["update/skipped_nonfinite"] == 0.0
    assert adam_steps(run) == {1.0}  # the failed tries applied nothing


def noisy_reward(response, sample, fmt) -> float:
    """Draws from the python, numpy and torch global RNGs, as a user's reward may: the retried step sees
    the same draws only if the retry restored all three (the sampler itself is seeded per step)."""
    return 0.01 * (random.random() + float(np.random.rand()) + float(torch.rand(())))


@pytest.mark.parametrize("optimizer", ["adamw", "paged_adamw8bit"])
def test_retry_after_a_partial_step_does_not_apply_an_update_twice(tiny_qwen, tmp_path, monkeypatch, optimizer):
    """mini_batches=2: the first mini-batch's optimizer step has been taken when the second one runs out
    of memory. The retried step must start from the state before the step (adapter, optimizer, RNG), so
    the run ends equal to one that never hit the fault (which ran at micro-batch 2 from the start).
    `paged_adamw8bit` is the CUDA default; bitsandbytes' 8-bit optimizers also run on CPU, so its state
    restore is tested here for real (only the paging to host memory needs a GPU)."""
    monkeypatch.setitem(rewards.REWARD_FUNCTIONS, "test_noisy", noisy_reward)

    def setup(root, micro):
        cfg = config_from_dict(tiny_recipe(tiny_qwen, root, train__steps=2, train__micro_batch_size=micro,
                                           train__mini_batches=2, rollout__prompts_per_step=4,
                                           rollout__max_new_tokens=6, optim__optimizer=optimizer,
                                           reward__weights={"format": 0.1, "test_length": 1.0, "test_noisy": 1.0}))
        return train_mod.setup(cfg)

    def reseed():  # both runs start their steps from the same global RNG state
        random.seed(7)
        np.random.seed(7)
        torch.manual_seed(7)

    clean = setup(tmp_path / "clean", 2)
    reseed()
    for step in (1, 2):
        train_mod.step_with_oom_retry(clean, step)

    faulty = setup(tmp_path / "faulty", 4)
    real = train_mod.rows_logprobs
    calls = {"n": 0}

    def second_mini_batch_ooms(policy, batch, rows, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # micro-batch 4 = one call per mini-batch: the second mini-batch
            raise oom()
        return real(policy, batch, rows, *args, **kwargs)

    monkeypatch.setattr(train_mod, "rows_logprobs", second_mini_batch_ooms)
    steps_seen = []
    reseed()
    hook = faulty.optimizer.register_step_post_hook(lambda opt, a, k: steps_seen.append(calls["n"]))
    for step in (1, 2):
        train_mod.step_with_oom_retry(faulty, step)
    hook.remove()
    assert faulty.micro_batch == 2
    assert steps_seen[0] == 1  # the first mini-batch was applied before the fault
    assert adam_steps(clean) == {4.0}
    assert adam_steps(faulty) == {4.0}, "an optimizer step of the failed try was kept: an update applied twice"
    a, b = adapter(clean), adapter(faulty)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert type(clean.optimizer).__name__ == type(faulty.optimizer).__name__ == \
        {"adamw": "AdamW", "paged_adamw8bit": "PagedAdamW8bit"}[optimizer]
    assert_same(clean.optimizer.state_dict()["state"], faulty.optimizer.state_dict()["state"], "optimizer state")
    assert clean.scheduler.state_dict() == faulty.scheduler.state_dict()
