"""Steps that teach nothing still say why: the zero-spread share, its hint, and a dropped step's logs."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_recipe
from lite_srpo.config import config_from_dict
from lite_srpo.rl.train import train
from lite_srpo.rl.zero_signal import HINT_STEPS, ZeroSpreadWatch, zero_spread_share
from lite_srpo.run.events import read_events


def test_zero_spread_share_counts_groups_whose_rewards_are_all_equal():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.2, 0.3])
    assert zero_spread_share(rewards, 2) == 0.5  # groups (1, 1) and (.5, .5)
    assert zero_spread_share(rewards, 4) == 0.0
    assert zero_spread_share(torch.zeros(6), 3) == 1.0


def test_the_hint_comes_once_when_the_share_stays_high():
    watch = ZeroSpreadWatch()
    said = [watch.update(v) for v in [0.9] * (HINT_STEPS - 1) + [0.5] + [1.0] * (HINT_STEPS + 3) + [None]]
    assert [i for i, m in enumerate(said) if m] == [2 * HINT_STEPS - 1]  # the streak restarted after 0.5
    assert "SFT warm-up" in said[2 * HINT_STEPS - 1] and "group" in said[2 * HINT_STEPS - 1]


def test_a_step_that_drops_every_group_still_logs_its_completions_and_tokens(tiny_qwen, tmp_path):
    """A fresh tiny model never answers right: DAPO's filter (on accuracy) drops every group, no update runs,
    and still the step writes its Tokens events, the TensorBoard completions table with the prompt's image,
    and the zero-spread share."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tiny_recipe(tiny_qwen, tmp_path / "runs", algorithm__name="dapo", algorithm__dynamic_sampling=True,
                         algorithm__overlong="none",  # the reward is accuracy alone: 0 for every response
                         reward__weights={"accuracy": 1.0}, train__steps=2, train__tokens_every=1,
                         train__log_completions_every=1, train__report_to=["tensorboard"], train__save_every=0)
    run = train(config_from_dict(recipe), quiet=True)
    events = read_events(run.run_dir / "events.jsonl")
    metrics = [e for e in events if e["type"] == "metrics"]
    assert [m.get("update/skipped_no_signal") for m in metrics] == [1.0, 1.0]
    assert [m["groups/zero_spread_frac"] for m in metrics] == [1.0, 1.0]
    tokens = [e for e in events if e["type"] == "tokens"]
    assert [e["step"] for e in tokens] == [1, 2] and all(e["dropped"] for e in tokens)
    assert all(s["tokens"] and all(t["adv"] == 0.0 for t in s["tokens"]) and s["advantage"] == 0.0 and "has_roles" in s
               for e in tokens for s in e["samples"])
    assert [len(e["samples"]) for e in tokens] == [4, 4]  # tokens_samples = 8 takes every response of this step
    acc = EventAccumulator(str(run.run_dir / "tensorboard"), size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    assert any("completions" in tag for tag in acc.Tags()["tensors"]), acc.Tags()
    assert acc.Tags()["images"], "no prompt image in TensorBoard"
    assert acc.Scalars("groups/zero_spread_frac")[-1].value == pytest.approx(1.0)
