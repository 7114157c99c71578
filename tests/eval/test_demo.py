"""`lite-srpo demo` with overrides, on a tiny budget: it builds its model where `model.path` points, and
`demo_result.json` keeps its original greedy shape plus both protocols with CIs and the paired change."""
from __future__ import annotations

import json

import pytest

from lite_srpo.eval.demo import format_table, run_demo
from lite_srpo.eval.stats import bootstrap_ci, paired_difference, seeds_items_ci


@pytest.mark.slow
def test_demo_overrides_and_result_shape(tmp_path, capsys):
    model = tmp_path / "models" / "tiny"
    overrides = [f"model.path={model}", f"output_dir={tmp_path / 'out'}", "name=d", "train.seed=3",
                 "sft.steps=2", "sft.batch_size=4", "train.steps=1", "train.save_every=0", "data.n_train=16",
                 "data.n_test=4", "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=8",
                 "train.micro_batch_size=4", "train.logprob_chunk=64"]
    result = run_demo(None, overrides)
    assert (model / "config.json").is_file()  # built where model.path points
    saved = json.loads((tmp_path / "out" / "d" / "demo_result.json").read_text())
    assert saved["seed"] == 3 and saved["rl_steps"] == 1 and saved["n_test"] == 4
    for when in ("before", "after"):
        entry = saved[when]
        assert 0 <= entry["accuracy"] <= 1 and entry["accuracy"] == entry["greedy"]["accuracy"]  # original shape
        for key in ("greedy", "avg@8"):
            lo, hi = entry[key]["ci95"]
            assert lo <= entry[key]["accuracy"] <= hi
            assert len(entry[key]["items"]) == 4
    assert saved["after"]["avg@8"]["n_responses"] == 4 * 8
    for key in ("greedy", "avg@8"):
        diff = saved["change"][key]["mean"]
        assert diff == pytest.approx(saved["after"][key]["accuracy"] - saved["before"][key]["accuracy"])
    assert (tmp_path / "out" / "d" / "curves.png").is_file() and saved["curves"].endswith("curves.png")
    # the RL run's log keeps the warm-up's SFT loss (curves.png's SFT panel) and starts its eval at step 0
    from lite_srpo.run.events import read_events
    from lite_srpo.run.plot import panel_notes
    events = read_events(tmp_path / "out" / "d" / "events.jsonl")
    assert [e["step"] for e in events if e["type"] == "sft"] == [1, 2]
    assert [e["step"] for e in events if e["type"] == "eval"][:1] == [0]
    assert "sft" not in panel_notes(events) and "eval" not in panel_notes(events)
    table = format_table(result)
    assert "avg@8" in table and "greedy" in table and "curves:" in table


def test_bootstrap_intervals_by_hand():
    assert bootstrap_ci([1.0] * 10) == (1.0, 1.0)
    lo, hi = bootstrap_ci([0.0] * 50 + [1.0] * 50)
    assert 0.38 < lo < 0.45 and 0.55 < hi < 0.62  # mean 0.5, se = 0.05 -> about ±0.098
    d = paired_difference([1, 1, 0, 1], [0, 1, 0, 0])
    assert d["mean"] == pytest.approx(0.5) and d["ci95"][0] >= 0.0
    s = seeds_items_ci([[1, 0, 1, 0], [1, 1, 1, 1]])
    assert s["mean"] == pytest.approx(0.75) and s["ci95"][0] < 0.75 < s["ci95"][1]
    with pytest.raises(ValueError, match="same items"):
        paired_difference([1, 0], [1])
