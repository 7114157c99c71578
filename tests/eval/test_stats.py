"""The statistics behind README's tables, on cases small enough to work out by hand."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from lite_srpo.eval.stats import (detectable_effect, paired_seeds_items, seeds_items_ci, seeds_t_interval,
                             student_t_quantile, variance_components)


def exact_two_level(d: list[list[float]]) -> np.ndarray:
    """Every equally likely outcome of the two-level bootstrap: seeds drawn with replacement, then items
    drawn with replacement (the same item draw for every drawn seed), and the mean of that table."""
    x = np.asarray(d, dtype=np.float64)
    k, n = x.shape
    return np.array([x[list(s)][:, list(i)].mean()
                     for s in itertools.product(range(k), repeat=k)
                     for i in itertools.product(range(n), repeat=n)])


def test_paired_seeds_items_mean_and_per_seed_by_hand():
    a = [[1, 1, 0], [1, 0, 0]]
    b = [[0, 1, 0], [1, 1, 0]]
    # a − b = [[1, 0, 0], [0, −1, 0]]: seed 0 gains 1/3, seed 1 loses 1/3, the mean is 0
    out = paired_seeds_items(a, b, n_boot=20000)
    assert out["mean"] == pytest.approx(0.0)
    assert out["per_seed"] == pytest.approx([1 / 3, -1 / 3])
    # 4 seed draws × 27 item draws = 108 equally likely means; the bootstrap's percentiles sit on them
    exact = exact_two_level([[1, 0, 0], [0, -1, 0]])
    assert exact.size == 108
    lo, hi = out["ci95"]
    assert np.quantile(exact, 0.01) <= lo <= np.quantile(exact, 0.04)
    assert np.quantile(exact, 0.96) <= hi <= np.quantile(exact, 0.99)
    # by hand: seed 1 drawn twice and its item 1 drawn three times gives −1; seed 0 and item 0 give +1
    assert exact.min() == pytest.approx(-1.0) and exact.max() == pytest.approx(1.0)


def test_paired_seeds_items_is_a_minus_b_not_b_minus_a():
    a, b = [[1, 1], [1, 0]], [[0, 0], [0, 0]]
    assert paired_seeds_items(a, b)["mean"] == pytest.approx(0.75)
    assert paired_seeds_items(b, a)["mean"] == pytest.approx(-0.75)


def test_paired_seeds_items_refuses_unpaired_shapes():
    with pytest.raises(ValueError, match="same seeds and items"):
        paired_seeds_items([[1, 0]], [[1, 0, 1]])


def test_seeds_items_ci_constant_table_has_a_point_interval():
    out = seeds_items_ci([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    assert out["mean"] == pytest.approx(0.5)
    assert out["ci95"] == pytest.approx([0.5, 0.5])


def test_seeds_items_ci_one_seed_is_the_item_bootstrap():
    # K = 1: seed resampling is trivial, so the interval is the plain item bootstrap of [1, 0, 0, 0]:
    # the mean of 4 draws from {1, 0, 0, 0} is j/4 with j ~ Binomial(4, 1/4); P(j = 0) = 0.316, P(j >= 3) = 0.051
    out = seeds_items_ci([[1, 0, 0, 0]], n_boot=20000)
    assert out["mean"] == pytest.approx(0.25)
    assert out["ci95"][0] == pytest.approx(0.0)
    assert out["ci95"][1] in (pytest.approx(0.5), pytest.approx(0.75))


def test_seeds_items_ci_carries_seed_spread():
    # items agree within each seed but the seeds disagree: an item-only interval would be a point
    out = seeds_items_ci([[1, 1, 1], [0, 0, 0]], n_boot=20000)
    assert out["mean"] == pytest.approx(0.5)
    assert out["ci95"] == pytest.approx([0.0, 1.0])  # both seeds drawn twice: 1/4 of the draws each


@pytest.mark.parametrize("p, df, expected", [(0.975, 1, 12.706205), (0.975, 3, 3.182446), (0.975, 10, 2.228139),
                                             (0.99375, 3, 5.391949), (0.95, 30, 1.697261), (0.025, 3, -3.182446)])
def test_student_t_quantile_matches_tables(p, df, expected):
    assert student_t_quantile(p, df) == pytest.approx(expected, abs=1e-5)


def test_seeds_t_interval_by_hand():
    # mean 2.5, sd (ddof 1) = sqrt(5/3), half-width t_{3, 0.975} · sd / 2
    half = 3.182446 * math.sqrt(5 / 3) / 2
    assert seeds_t_interval([1, 2, 3, 4]) == pytest.approx([2.5 - half, 2.5 + half], abs=1e-5)
    assert all(math.isnan(v) for v in seeds_t_interval([1.0]))


def test_variance_components_recover_a_built_table():
    # d[k, i] = seed effect + item effect, no residual: the components are their population-style spreads
    seed = np.array([-1.0, 1.0])           # mean square between seeds = n · 2 / 1
    item = np.array([-2.0, 0.0, 2.0])       # mean square between items = k · 8 / 2
    d = seed[:, None] + item[None, :]
    c = variance_components(d.tolist())
    assert c["residual"] == pytest.approx(0.0, abs=1e-12)
    assert c["seed"] == pytest.approx(math.sqrt(2.0))   # (3 · 2 / 1 − 0) / 3
    assert c["item"] == pytest.approx(2.0)              # (2 · 8 / 2 − 0) / 2


def test_detectable_effect_by_hand():
    c = {"seed": 2.0, "item": 10.0, "residual": 20.0}
    out = detectable_effect(c, seeds=4, items=100)
    se = math.sqrt(4 / 4 + 100 / 100 + 400 / 400)
    assert out["se"] == pytest.approx(se)
    assert out["ci_half_width"] == pytest.approx(1.959964 * se, rel=1e-6)
    assert out["detectable"] == pytest.approx((1.959964 + 0.841621) * se, rel=1e-6)
