"""DAPO's dynamic sampling fills the batch: re-sampled rounds, by hand and through a real run."""
from __future__ import annotations

import torch

from conftest import tiny_recipe
from lite_srpo.config import config_from_dict
from lite_srpo.rewards import builtin as rewards
from lite_srpo.rl.dynamic_fill import Scored, concat_batches, fill, kept_rows
from lite_srpo.rl.rollout import RolloutBatch
from lite_srpo.rl.train import train
from lite_srpo.run.events import read_events

G = 2


def fake_batch(n_prompts: int, width: int, tag: str) -> RolloutBatch:
    n = n_prompts * G
    return RolloutBatch(prompts=[f"{tag}{p}" for p in range(n_prompts)], prompt_of=[p for p in range(n_prompts) for _ in range(G)],
                        response_ids=torch.arange(n * width).view(n, width), response_mask=torch.ones(n, width, dtype=torch.long),
                        texts=[f"{tag}{i}" for i in range(n)], truncated=torch.zeros(n, dtype=torch.bool))


def scored(n_prompts: int, keep: list[bool], tag: str, width: int = 3) -> Scored:
    return Scored(fake_batch(n_prompts, width, tag), [float(i) for i in range(n_prompts * G)], {"a": [0.0] * n_prompts * G},
                  keep)


def test_kept_rows_and_concat():
    assert kept_rows([False, True, True, True], G, 2) == [2, 3, 4, 5]
    both = concat_batches(fake_batch(1, 3, "a"), fake_batch(2, 5, "b"), pad_id=-1)
    assert both.prompts == ["a0", "b0", "b1"] and both.prompt_of == [0, 0, 1, 1, 2, 2]
    assert both.response_ids.shape == (6, 5) and both.response_ids[0].tolist() == [0, 1, 2, -1, -1]
    assert both.response_mask[:2].sum().item() == 6 and both.texts[2] == "b0"


def test_fill_takes_the_first_passing_groups_up_to_the_first_rounds_count():
    asked = []

    def resample(round_, missing):
        asked.append((round_, missing))
        return scored(missing, [True] * missing, f"r{round_}_") if round_ == 2 else scored(missing, [False] * missing, "x")

    out = fill(scored(4, [True, False, True, False], "s"), G, max_rounds=3, pad_id=0, resample=resample)
    assert asked == [(1, 2), (2, 2)]  # round 1 found nothing, round 2 filled the two missing groups
    assert out.kept == [0, 1, 4, 5, 12, 13, 14, 15] and out.batch.size == 16 and len(out.rewards) == 16
    assert out.metrics["dynamic_sampling/resample_rounds"] == 2 and out.metrics["dynamic_sampling/extra_responses"] == 8
    assert out.metrics["dynamic_sampling/filled_frac"] == 1.0
    capped = fill(scored(2, [False, False], "s"), G, max_rounds=2, pad_id=0,
                  resample=lambda r, m: scored(m, [False] * m, "x"))
    assert capped.kept == [] and capped.metrics["dynamic_sampling/resample_rounds"] == 2
    off = fill(scored(2, [False, True], "s"), G, max_rounds=0, pad_id=0, resample=lambda r, m: 1 / 0)
    assert off.kept == [2, 3] and off.metrics == {}  # today's behaviour: the batch shrinks


def test_a_dapo_run_refills_the_groups_it_drops(tiny_qwen, tmp_path):
    """A reward that gives every response to a question about red shapes the same score: those groups are dropped,
    and re-sampled prompts refill the batch to prompts_per_step groups."""
    def half_the_questions(response, sample, fmt):
        return 0.0 if "red" in sample.question else len(response) / 50.0

    rewards.REWARD_FUNCTIONS["test_half"] = half_the_questions
    try:
        recipe = tiny_recipe(tiny_qwen, tmp_path / "runs", algorithm__name="dapo", algorithm__filter_on="reward",
                             algorithm__overlong="none", reward__weights={"test_half": 1.0},
                             rollout__prompts_per_step=4, rollout__max_resample_rounds=4, train__steps=3,
                             train__save_every=0, data__n_train=32)
        run = train(config_from_dict(recipe), quiet=True)
    finally:
        rewards.REWARD_FUNCTIONS.pop("test_half", None)
    metrics = [e for e in read_events(run.run_dir / "events.jsonl") if e["type"] == "metrics"]
    assert any(m["dynamic_sampling/resample_rounds"] > 0 for m in metrics), metrics
    for m in metrics:
        assert m["dynamic_sampling/extra_responses"] == m["dynamic_sampling/extra_responses"] // G * G
        if m["dynamic_sampling/filled_frac"] == 1.0:
            assert m["grad/norm"] > 0
    assert max(m["dynamic_sampling/filled_frac"] for m in metrics) == 1.0
