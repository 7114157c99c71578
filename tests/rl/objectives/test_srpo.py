"""SRPO role scores and weights against hand-computed values and their stated invariants."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lite_srpo.rl.objectives import srpo

F64 = torch.float64


def _t(rows, dtype=F64):
    return torch.tensor(rows, dtype=dtype)


# --------------------------------------------------------------------------- scores


def test_perception_scores_clamp_and_role_selection():
    old = _t([[-1.0, -1.0, -1.0, -0.5, -1.0]])
    cor = _t([[-3.0, -0.5, -30.0, -2.5, float("nan")]])
    roles = torch.tensor([[1, 1, 1, 2, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    d = srpo.perception_scores(old, cor, roles, mask, kappa=10.0)
    # o - c: 2.0 | -0.5 -> 0 | 29 -> κ=10 | role 2 -> 0 | padding (nan) -> 0
    assert torch.equal(d, _t([[2.0, 0.0, 10.0, 0.0, 0.0]]))


def test_reasoning_scores_both_variants():
    old = _t([[-1.0, -2.0, -1.0, -1.0]])
    other = _t([[-3.0, -1.0, -4.0, -1.5]])
    roles = torch.tensor([[1, 2, 2, 2]])
    mask = torch.ones(1, 4)
    e = srpo.reasoning_scores(old, other, roles, mask, kappa=2.5)
    # o - n on role 2: -2-(-1) = -1 -> 0 | -1-(-4) = 3 -> κ=2.5 | -1-(-1.5) = 0.5; role 1 -> 0
    assert torch.allclose(e, _t([[0.0, 0.0, 2.5, 0.5]]))
    e_c = srpo.reasoning_scores_from_corrupted(old, other, roles, mask, kappa=10.0, margin=0.25)
    # c - o + m on role 2: -1+2+0.25 = 1.25 | -4+1+0.25 = -2.75 -> 0 | -1.5+1+0.25 = -0.25 -> 0
    assert torch.allclose(e_c, _t([[0.0, 1.25, 0.0, 0.0]]))


# --------------------------------------------------------------------------- weights


def _example_2x6():
    """Row 0: roles P P R R O O, all valid. Row 1: roles P R R O + 2 padding."""
    roles = torch.tensor([[1, 1, 2, 2, 0, 0], [1, 2, 2, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    d = _t([[2.0, 0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    e = _t([[0.0, 0.0, 3.0, 2.0, 0.0, 0.0], [0.0, 1.0, 2.0, 0.0, 0.0, 0.0]])
    return d, e, roles, mask


def test_role_weights_hand_computed_2x6():
    d, e, roles, mask = _example_2x6()
    w = srpo.role_weights(d, e, roles, mask, lam=0.5, tau=1.0, renormalize=False)
    # Perception tokens d = {2, 0, 1}: μ_P = 1, σ_P = sqrt((1+1+0)/3) = 0.816497
    #   u = (2-1)/σ = 1.224745, (0-1)/σ = -1.224745, (1-1)/σ = 0
    # Reasoning tokens e = {3, 2, 1, 2}: μ_R = 2, σ_R = sqrt((1+0+1+0)/4) = 0.707107
    #   u = 1.414214, 0, -1.414214, 0
    # Row 0 role u = [1.224745, -1.224745, 1.414214, 0] -> b_0 = 1.414214/4 = 0.353553
    #   u - b = [0.871191, -1.578298, 1.060660, -0.353553]
    #   tanh  = [0.701979, -0.918336, 0.785916, -0.339523]
    #   w = 1 + 0.5·tanh = [1.350989, 0.540832, 1.392958, 0.830238], then 1, 1 on "other"
    # Row 1 role u = [0, -1.414214, 0] -> b_1 = -0.471405
    #   u - b = [0.471405, -0.942809, 0.471405]; tanh = [0.439333, -0.736510, 0.439333]
    #   w = [1.219667, 0.631745, 1.219667], 1 on "other" and on padding
    expected = _t([[1.350989, 0.540832, 1.392958, 0.830238, 1.0, 1.0],
                   [1.219667, 0.631745, 1.219667, 1.0, 1.0, 1.0]])
    assert torch.allclose(w, expected, atol=2e-6)


def test_role_weights_renormalized_2x6():
    d, e, roles, mask = _example_2x6()
    w = srpo.role_weights(d, e, roles, mask, lam=0.5, tau=1.0, renormalize=True)
    # Renormalisation is over each trajectory's ROLE tokens; tags/other tokens and padding stay exactly 1.
    # Row 0 role weights (from the unnormalised example) [1.350989, 0.540832, 1.392958, 0.830238]
    #   mean = 4.115017 / 4 = 1.028754 -> [1.313228, 0.525715, 1.354024, 0.807032]; other tokens 1, 1
    # Row 1 role weights [1.219667, 0.631745, 1.219667], mean = 3.071079 / 3 = 1.023693
    #   -> [1.191438, 0.617123, 1.191438]; its "other" token and the padding stay 1
    # (The old rule divided by the mean over ALL valid tokens: row 0 became
    #  [1.325579, 0.530660, 1.366758, 0.814622, 0.981191, 0.981191] — the tags lost mass to nothing.)
    expected = _t([[1.313228, 0.525715, 1.354024, 0.807032, 1.0, 1.0],
                   [1.191438, 0.617123, 1.191438, 1.0, 1.0, 1.0]])
    assert torch.allclose(w, expected, atol=2e-6)
    is_role = mask.bool() & (roles > 0)
    role_mean = (w * is_role).sum(1) / is_role.sum(1)
    assert torch.allclose(role_mean, torch.ones(2, dtype=F64), atol=1e-12)
    assert torch.equal(w[~is_role], torch.ones(int((~is_role).sum()), dtype=F64))


def test_renormalised_weights_do_not_move_mass_to_tags():
    """Sparse, skewed scores (most role tokens a bit below the mean, a few far above): tanh saturates on the
    few, so the raw role weights average below 1. Renormalising must lift the role tokens back to mean 1,
    and never the tags (issue: tags got 1.029 while perception/reasoning got 0.969/0.965)."""
    n_role, n_tag = 12, 4
    scores = torch.zeros(1, n_role + n_tag, dtype=F64)
    scores[0, 0] = 8.0  # one highly image-dependent token among eleven that are not
    roles = torch.tensor([[1] * n_role + [0] * n_tag])
    mask = torch.ones_like(scores)
    raw = srpo.role_weights(scores, torch.zeros_like(scores), roles, mask, renormalize=False)
    assert float(raw[0, :n_role].mean()) < 0.99  # the skew this test is about
    w = srpo.role_weights(scores, torch.zeros_like(scores), roles, mask, renormalize=True)
    assert abs(float(w[0, :n_role].mean()) - 1.0) < 1e-12
    assert torch.equal(w[0, n_role:], torch.ones(n_tag, dtype=F64))


@pytest.mark.parametrize("value", [0.0, 0.7, 3.3])
def test_equal_scores_give_weight_one_everywhere(value):
    d, e, roles, mask = _example_2x6()
    same = torch.full(d.shape, value, dtype=torch.float32)
    for renorm in (False, True):
        w = srpo.role_weights(same, same, roles, mask, renormalize=renorm)
        # σ = 0 in both roles -> u = 0 -> b = 0 -> w = 1 + λ·tanh(0) = 1. The float64 statistics
        # leave |u| < 1e-9, which rounds to exactly 1.0 in the float32 output.
        assert w.dtype == torch.float32
        assert torch.equal(w, torch.ones_like(w))


def test_trajectory_without_role_tokens_stays_exactly_one():
    d, e, roles, mask = _example_2x6()
    roles = roles.clone()
    roles[1] = 0  # row 1 is a format violation: all "other"
    w = srpo.role_weights(d, e, roles, mask, renormalize=True)
    assert torch.equal(w[1], torch.ones(6, dtype=w.dtype))
    assert not torch.equal(w[0], torch.ones(6, dtype=w.dtype))


def test_single_role_token_has_zero_deviation():
    roles = torch.tensor([[1, 0, 0]])
    w = srpo.role_weights(_t([[5.0, 0, 0]]), _t([[0.0, 0, 0]]), roles, torch.ones(1, 3),
                          renormalize=False)
    # one perception token: μ = 5, σ = 0 -> u = 0 = b -> w = 1
    assert torch.equal(w, torch.ones(1, 3, dtype=F64))


@pytest.mark.parametrize("lam", [0.0, 1.0, -0.2, 1.5])
def test_lam_outside_open_unit_interval_is_rejected(lam):
    d, e, roles, mask = _example_2x6()
    with pytest.raises(ValueError, match="lam"):
        srpo.role_weights(d, e, roles, mask, lam=lam)


def test_bfloat16_scores_are_upcast():
    d, e, roles, mask = _example_2x6()
    w = srpo.role_weights(d.bfloat16(), e.bfloat16(), roles, mask, renormalize=False)
    assert w.dtype == torch.float32
    assert torch.allclose(w.double(), srpo.role_weights(d, e, roles, mask, renormalize=False), atol=1e-6)


# --------------------------------------------------------------------------- advantages


def test_token_advantage_sign_equals_sequence_sign():
    d, e, roles, mask = _example_2x6()
    w = srpo.role_weights(d, e, roles, mask)
    adv = _t([-1.5, 0.8])
    a = srpo.token_advantages(adv, w)
    # row 0: -1.5 · w (w > 0) < 0 everywhere; row 1: 0.8 · w > 0
    assert (a[0] < 0).all() and (a[1] > 0).all()
    assert torch.allclose(a[0, 0], -1.5 * w[0, 0])
    assert torch.equal(srpo.token_advantages(torch.zeros(2, dtype=F64), w), torch.zeros_like(w))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), t=st.integers(1, 8),
       lam=st.floats(0.05, 0.95), scale=st.floats(0.01, 20.0))
def test_weight_properties_random(seed, n, t, lam, scale):
    g = torch.Generator().manual_seed(seed)
    roles = torch.randint(0, 3, (n, t), generator=g)
    lengths = torch.randint(0, t + 1, (n,), generator=g)
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    d = torch.rand(n, t, generator=g, dtype=F64) * scale
    e = torch.rand(n, t, generator=g, dtype=F64) * scale
    w = srpo.role_weights(d, e, roles, mask, lam=lam, tau=1.0, renormalize=False)
    is_role = mask & (roles > 0)
    # at most 32 tokens per role -> |u - b| < 2·sqrt(31) ≈ 11 -> tanh strictly inside (-1, 1) in float64
    assert (w[is_role] > 1 - lam).all() and (w[is_role] < 1 + lam).all()
    assert torch.equal(w[~is_role], torch.ones_like(w[~is_role]))

    wr = srpo.role_weights(d, e, roles, mask, lam=lam, tau=1.0, renormalize=True)
    assert (wr > 0).all()
    has_role = is_role.any(1)
    row_mean = (wr * mask).sum(1) / mask.sum(1).clamp(min=1)
    assert torch.allclose(row_mean[has_role], torch.ones_like(row_mean[has_role]), atol=1e-12)
    assert torch.equal(wr[~has_role], torch.ones_like(wr[~has_role]))

    adv = torch.randn(n, generator=g, dtype=F64)
    a = srpo.token_advantages(adv, wr)
    assert torch.equal(torch.sign(a), torch.sign(adv).unsqueeze(1).expand_as(a))


# --------------------------------------------------------------------------- metrics


def test_role_metrics_hand_computed():
    d, e, roles, mask = _example_2x6()
    w = srpo.role_weights(d, e, roles, mask, renormalize=False)
    m = srpo.role_metrics(w, roles, mask, d, e)
    # perception weights 1.350989, 0.540832, 1.219667 -> mean 1.037163
    assert m["srpo/weight_perception"] == pytest.approx((1.350989 + 0.540832 + 1.219667) / 3, abs=2e-6)
    # reasoning weights 1.392958, 0.830238, 0.631745, 1.219667 -> mean 1.018652
    assert m["srpo/weight_reasoning"] == pytest.approx(
        (1.392958 + 0.830238 + 0.631745 + 1.219667) / 4, abs=2e-6)
    assert m["srpo/weight_other"] == 1.0  # 3 valid "other" tokens, padding excluded
    assert m["srpo/perception_score_mean"] == pytest.approx(1.0)  # (2+0+1)/3
    assert m["srpo/reasoning_score_mean"] == pytest.approx(2.0)  # (3+2+1+2)/4
    assert m["srpo/perception_frac"] == pytest.approx(3 / 10)
    assert m["srpo/reasoning_frac"] == pytest.approx(4 / 10)
    assert m["srpo/weight_min"] == pytest.approx(0.540832, abs=2e-6)


def test_role_metrics_without_roles_are_finite():
    roles = torch.zeros(2, 3, dtype=torch.long)
    mask = torch.ones(2, 3)
    w = torch.ones(2, 3)
    m = srpo.role_metrics(w, roles, mask, torch.zeros(2, 3), torch.zeros(2, 3))
    assert all(math.isfinite(v) for v in m.values())
    assert m["srpo/weight_perception"] == 1.0 and m["srpo/perception_score_mean"] == 0.0


@pytest.mark.parametrize("weighted, fixed_role", [((srpo.PERCEPTION,), srpo.REASONING), ((srpo.REASONING,), srpo.PERCEPTION)])
def test_role_weights_for_one_role_leave_the_other_at_exactly_one(weighted, fixed_role):
    """The ablations `weighted_roles: perception|reasoning`: the unweighted role is treated as other tokens."""
    g = torch.Generator().manual_seed(3)
    roles = torch.randint(0, 3, (4, 12), generator=g)
    mask = torch.ones(4, 12)
    mask[0, 9:] = 0
    d = torch.rand(4, 12, generator=g) * 3 * (roles == srpo.PERCEPTION)
    e = torch.rand(4, 12, generator=g) * 3 * (roles == srpo.REASONING)
    w = srpo.role_weights(d, e, roles, mask, lam=0.5, weighted=weighted)
    assert torch.equal(w[(roles == fixed_role) | (roles == srpo.OTHER) | (mask == 0)],
                       torch.ones_like(w[(roles == fixed_role) | (roles == srpo.OTHER) | (mask == 0)]))
    kept = (roles == weighted[0]) & (mask == 1)
    assert not torch.allclose(w[kept], torch.ones_like(w[kept]))  # the weighted role really moves
    for i in range(4):  # renormalised over the weighted role's tokens only
        if kept[i].any():
            assert float(w[i][kept[i]].mean()) == pytest.approx(1.0, abs=1e-6)
    # weighting that role alone equals weighting both when the other role's scores are absent from the batch
    only = torch.where(roles == fixed_role, torch.full_like(roles, srpo.OTHER), roles)
    assert torch.allclose(w, srpo.role_weights(d, e, only, mask, lam=0.5))
    with pytest.raises(ValueError, match="weighted must name roles"):
        srpo.role_weights(d, e, roles, mask, weighted=())
