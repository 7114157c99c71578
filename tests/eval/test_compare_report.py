"""`compare --report`: every contrast from saved per-item scores, intervals that can fail, the figure."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lite_srpo.eval.compare_report import analyse, merge, pairs_for, report


def fake_result(arms: dict[str, float], seeds: int = 4, n: int = 60, seed: int = 0) -> dict:
    """Per-item avg@8-like scores: arm accuracy p, items drawn independently per seed."""
    rng = np.random.default_rng(seed)
    items = {arm: {key: [rng.binomial(8, p, size=n).astype(float).__truediv__(8).tolist() for _ in range(seeds)]
                   for key in ("greedy", "avg@8")} for arm, p in arms.items()}
    runs = [{"arm": a, "seed": k, "seconds_per_step": 1.0} for a in arms for k in range(seeds)]
    warm = {"greedy": {"accuracy": 0.5}, "avg@8": {"accuracy": 0.4}}
    return {"task": "count_shapes", "n_test": n, "steps": 1, "seeds": seeds, "items": items, "runs": runs,
            "warmup": warm, "warmup_items": {"greedy": [0.0] * n, "avg@8": [0.0] * n}}


def test_pairs_are_each_paper_against_its_base_and_ablations_against_srpo():
    arms = ["grpo", "dapo", "srpo", "papo", "vppo", "vgpo", "srpo_lam025"]
    assert pairs_for(arms) == [("srpo", "dapo"), ("papo", "grpo"), ("vppo", "dapo"), ("vgpo", "dapo"),
                               ("srpo_lam025", "srpo")]
    assert pairs_for(["srpo", "grpo"]) == []  # no base arm ran: no contrast is invented


def test_a_large_effect_is_established_and_a_null_one_is_not():
    r = fake_result({"dapo": 0.5, "srpo": 0.8, "vppo": 0.5}, n=200)
    out = analyse(r)["paired"]
    big, null = out["srpo-dapo"]["avg@8"], out["vppo-dapo"]["avg@8"]
    assert big["established"] and big["ci95"][0] > 0.2 and big["t95"][0] > 0.2
    assert not null["established"] and null["ci95"][0] < 0 < null["ci95"][1]
    # Bonferroni over the two contrasts is wider than the plain 95 % interval
    assert null["ci_bonferroni"][0] <= null["ci95"][0] and null["ci_bonferroni"][1] >= null["ci95"][1]
    assert len(big["per_seed"]) == big["seeds"] == 4
    # the design's own power figure: a 30-point effect is far above what 4 × 200 can resolve
    assert 0 < big["design"]["ci_half_width"] < big["design"]["detectable"] < 0.1


def test_merge_adds_ablation_arms_and_refuses_other_items():
    main = fake_result({"dapo": 0.5, "srpo": 0.6})
    abl = fake_result({"srpo": 0.6, "srpo_perception": 0.6}, seed=1)
    merged = merge([main, abl])
    assert set(merged["items"]) == {"dapo", "srpo", "srpo_perception"}
    assert merged["items"]["srpo"] == main["items"]["srpo"]  # the first file's arm is kept
    assert "srpo_perception-srpo" in analyse(merged)["paired"]
    other = fake_result({"srpo_lam025": 0.6}, n=30)
    with pytest.raises(ValueError, match="warm-up and test items"):
        merge([main, other])


def test_report_cli_writes_json_and_png(tmp_path):
    path = tmp_path / "compare.json"
    path.write_text(json.dumps(fake_result({"grpo": 0.5, "dapo": 0.5, "srpo": 0.6, "papo": 0.55})))
    proc = subprocess.run([sys.executable, "-m", "lite_srpo", "compare", "--report", str(path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "srpo − dapo" in proc.stdout and "papo − grpo" in proc.stdout
    saved = json.loads((tmp_path / "report.json").read_text())
    assert set(saved["paired"]) == {"srpo-dapo", "papo-grpo"}
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert report([str(path)], out=str(tmp_path / "again.json"))["paired"].keys() == saved["paired"].keys()
    named = tmp_path / "named" / "k4.json"
    named.parent.mkdir()
    proc = subprocess.run([sys.executable, "-m", "lite_srpo", "compare", "--report", str(path), "--report-out",
                           str(named)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(named.read_text())["paired"].keys() == saved["paired"].keys()
    assert named.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_merge_adds_later_seeds_and_pairs_contrasts_by_seed_value():
    """`compare --first-seed 3` results merged into a 3-seed comparison: each arm gets its new seeds in
    seed order, and a contrast pairs seed k with seed k even when the arms' runs finished in another
    order. Scores are constants, so every number is checkable by hand."""
    def const(arm_scores: dict[str, dict[int, float]], n: int = 5) -> dict:
        items, runs = {}, []
        for arm, per_seed in arm_scores.items():
            items[arm] = {key: [[v] * n for v in per_seed.values()] for key in ("greedy", "avg@8")}
            runs += [{"arm": arm, "seed": s, "seconds_per_step": 1.0} for s in per_seed]
        return {"task": "t", "n_test": n, "steps": 1, "seeds": 1, "items": items, "runs": runs,
                "warmup": {}, "warmup_items": {"greedy": [0.0] * n, "avg@8": [0.0] * n}}

    first = const({"dapo": {0: 0.5, 1: 0.6, 2: 0.4}, "srpo": {0: 0.6, 1: 0.6, 2: 0.5}})
    later = const({"dapo": {3: 0.3, 2: 0.9}, "srpo": {3: 0.5}})  # seed 2 of dapo again: the first file's stays
    merged = merge([first, later])
    assert merged["arm_seeds"] == {"dapo": [0, 1, 2, 3], "srpo": [0, 1, 2, 3]}
    assert [row[0] for row in merged["items"]["dapo"]["avg@8"]] == [0.5, 0.6, 0.4, 0.3]
    d = analyse(merged)["paired"]["srpo-dapo"]["avg@8"]
    assert d["seeds"] == 4 and d["seed_values"] == [0, 1, 2, 3]
    assert np.allclose(d["per_seed"], [0.1, 0.0, 0.1, 0.2])
    assert d["mean"] == pytest.approx(0.1)
    # arms that share only some seeds are compared on those alone, matched by value
    partial = const({"dapo": {2: 0.4, 0: 0.5}, "srpo": {0: 0.7, 5: 0.1}})
    p = analyse(partial)["paired"]["srpo-dapo"]["avg@8"]
    assert p["seed_values"] == [0] and np.allclose(p["per_seed"], [0.2])
