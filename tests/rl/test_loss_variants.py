"""GSPO (sequence-level ratio) and CISPO through a real RL step, and their config errors."""
from __future__ import annotations

import math

import pytest

from conftest import tiny_recipe
from lite_srpo.config import config_from_dict
from lite_srpo.errors import ConfigError
from lite_srpo.rl.train import train
from lite_srpo.run.events import read_events


@pytest.mark.parametrize("algo,knobs", [
    ("srpo", {"algorithm__importance_sampling_level": "sequence", "algorithm__clip_low": 3e-4,
              "algorithm__clip_high": 4e-4}),  # GSPO's clip range, with SRPO's token weights
    ("dapo", {"algorithm__policy_loss": "cispo", "algorithm__dynamic_sampling": False}),
    # VPPO's preset has a dual clip, which CISPO refuses (test below): the recipe sets it null
    ("vppo", {"algorithm__policy_loss": "cispo", "algorithm__importance_sampling_level": "sequence",
              "algorithm__dual_clip": None}),
])
def test_a_step_runs_with_each_loss_variant(tiny_qwen, tmp_path, algo, knobs):
    recipe = tiny_recipe(tiny_qwen, tmp_path / "runs", algorithm__name=algo, train__steps=1, train__save_every=0,
                         reward__weights={"format": 1.0, "test_length": 1.0}, **knobs)
    run = train(config_from_dict(recipe), quiet=True)
    metrics = [e for e in read_events(run.run_dir / "events.jsonl") if e["type"] == "metrics"]
    assert len(metrics) == 1 and math.isfinite(metrics[0]["loss/total"]) and metrics[0]["grad/norm"] > 0


def test_bad_loss_settings_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"algorithm.policy_loss.*clip, cispo"):
        config_from_dict(tiny_recipe("m", tmp_path, algorithm__policy_loss="gspo"))
    with pytest.raises(ConfigError, match=r"algorithm.importance_sampling_level.*token, sequence"):
        config_from_dict(tiny_recipe("m", tmp_path, algorithm__importance_sampling_level="seq"))
    with pytest.raises(ConfigError, match="algorithm.dual_clip.*cispo"):
        config_from_dict(tiny_recipe("m", tmp_path, algorithm__policy_loss="cispo", algorithm__dual_clip=3.0))
    with pytest.raises(ConfigError, match="algorithm.dual_clip: 3.0 with algorithm.policy_loss: cispo"):
        config_from_dict(tiny_recipe("m", tmp_path, algorithm__name="vppo", algorithm__policy_loss="cispo"))
