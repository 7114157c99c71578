"""`algorithm.overlong` end to end on the real step: which rows are truncated is set by hand after the
rollout, so the expected filtered fraction, the rows with no gradient and the penalised rows are known."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_recipe
from lite_srpo.config import config_from_dict
from lite_srpo.rl import step_sampling  # the step's rollout calls generate from here
from lite_srpo.rl import train as train_mod
from lite_srpo.rl.objectives import grpo
from lite_srpo.run.runtime import restore_before_step, state_before_step

TRUNCATED_ROWS = (0, 3, 5)  # of 8 rows: 2 prompts x G = 4


def hand_truncated(monkeypatch) -> None:
    """Every rollout of the step reports exactly TRUNCATED_ROWS as truncated (hit the cap without EOS)."""
    real = step_sampling.generate

    def generate(*args, **kwargs):
        batch = real(*args, **kwargs)
        batch.truncated = torch.zeros(batch.size, dtype=torch.bool)
        batch.truncated[list(TRUNCATED_ROWS)] = True
        return batch

    monkeypatch.setattr(step_sampling, "generate", generate)


def make_run(tiny_qwen, root, overlong: str):
    # overlong_buffer 0: only truncation is punished (the random tiny model writes to the cap, where the soft
    # ramp would reach the full penalty too and hide which rows were penalised)
    cfg = config_from_dict(tiny_recipe(tiny_qwen, root, train__steps=1, algorithm__name="grpo", algorithm__beta=0.0,
                                       algorithm__overlong=overlong, algorithm__overlong_buffer=0.0, algorithm__dynamic_sampling=False,
                                       rollout__group_size=4, rollout__prompts_per_step=2, rollout__max_new_tokens=8))
    return train_mod.setup(cfg)


def test_filter_gives_truncated_rows_exactly_zero_gradient(tiny_qwen, tmp_path, monkeypatch):
    hand_truncated(monkeypatch)
    run = make_run(tiny_qwen, tmp_path, "filter")
    seen = {}
    real_update = train_mod.policy_update

    def capture(run_, batch, shaping, x, row_offset=0):
        seen.update(batch=batch, shaping=shaping, x=x)
        return real_update(run_, batch, shaping, x, row_offset)

    monkeypatch.setattr(train_mod, "policy_update", capture)
    params = run.policy.trainable_parameters()
    before = state_before_step(params, run.optimizer, run.scheduler)
    metrics = train_mod.rl_step(run, 1)
    assert metrics["overlong/filtered_frac"] == pytest.approx(len(TRUNCATED_ROWS) / 8)
    x, shaping, batch = seen["x"], seen["shaping"], seen["batch"]
    rows = torch.tensor(TRUNCATED_ROWS)
    assert torch.equal(x.mask[rows], torch.zeros_like(x.mask[rows]))
    kept = torch.tensor([i for i in range(8) if i not in TRUNCATED_ROWS])
    assert torch.equal(x.mask[kept], batch.response_mask[kept].float())  # the others keep every token
    after_real = [p.detach().clone() for p in params]

    # the same update with the truncated rows' advantages blown up and flipped must land on the same weights
    restore_before_step(params, run.optimizer, run.scheduler, before)
    loud = shaping.advantages.clone()
    loud[rows] = -1000.0 * loud[rows] - 1000.0
    real_update(run, batch, type(shaping)(**{**shaping.__dict__, "advantages": loud}), x)
    for a, b in zip(after_real, params):
        assert torch.equal(a, b.detach())
    # and the check can fail: a non-truncated row's advantage does move the update
    restore_before_step(params, run.optimizer, run.scheduler, before)
    loud = shaping.advantages.clone()
    loud[kept[0]] = -1000.0 * loud[kept[0]] - 1000.0
    real_update(run, batch, type(shaping)(**{**shaping.__dict__, "advantages": loud}), x)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(after_real, params))


def test_punish_puts_the_full_penalty_on_the_truncated_rows_reward(tiny_qwen, tmp_path, monkeypatch):
    hand_truncated(monkeypatch)
    run = make_run(tiny_qwen, tmp_path, "punish")
    seen = {}
    real_adv = grpo.group_advantages

    def capture(rewards, *args, **kwargs):
        seen["rewards"] = rewards.clone()
        return real_adv(rewards, *args, **kwargs)

    monkeypatch.setattr(grpo, "group_advantages", capture)
    real_compute = run.rewarder.compute

    def compute(*args, **kwargs):
        out = real_compute(*args, **kwargs)
        seen["base"] = list(out[0])
        return out

    monkeypatch.setattr(run.rewarder, "compute", compute)
    metrics = train_mod.rl_step(run, 1)
    base = torch.tensor(seen["base"])
    penalty = seen["rewards"] - base
    rows = list(TRUNCATED_ROWS)
    others = [i for i in range(8) if i not in TRUNCATED_ROWS]
    assert torch.allclose(penalty[rows], torch.full((len(rows),), -1.0))  # overlong_penalty 1.0, full on truncation
    assert torch.equal(penalty[others], torch.zeros(len(others)))  # not truncated: no penalty at all
    assert "overlong/filtered_frac" not in metrics
