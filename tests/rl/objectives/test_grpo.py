"""GRPO-family math by hand: group advantages, the clipped policy loss and its aggregations, k3 KL."""
from __future__ import annotations

import math

import pytest
import torch

from lite_srpo.rl.objectives import grpo

F64 = torch.float64
EPS = 1e-6


# ---- advantages --------------------------------------------------------------------------------------

def test_group_advantages_group_scale_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    # group 2: [1, 0] and [0, 1]; mean 0.5; unbiased std = sqrt((0.25 + 0.25) / 1) = 0.70711
    #          adv = ±0.5 / 0.70711 = ±0.70711
    a2 = grpo.group_advantages(r, 2, scale="group")
    s2 = 0.5 / (math.sqrt(0.5) + EPS)
    assert torch.allclose(a2, torch.tensor([s2, -s2, -s2, s2]), atol=1e-6)
    # group 4: mean 0.5; unbiased std = sqrt(4 · 0.25 / 3) = 0.57735; adv = ±0.5 / 0.57735 = ±0.86603
    a4 = grpo.group_advantages(r, 4, scale="group")
    s4 = 0.5 / (math.sqrt(1 / 3) + EPS)
    assert torch.allclose(a4, torch.tensor([s4, -s4, -s4, s4]), atol=1e-6)


def test_group_advantages_batch_and_none_by_hand():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    # group means: 0.5 and 1.0 -> centred [0.5, -0.5, 0, 0]
    assert torch.allclose(grpo.group_advantages(r, 2, scale="none"), torch.tensor([0.5, -0.5, 0.0, 0.0]))
    # batch std: mean 0.75, squares 0.0625 + 0.5625 + 0.0625 + 0.0625 = 0.75, / 3 = 0.25 -> std 0.5
    #            adv = [0.5, -0.5, 0, 0] / 0.5 = [1, -1, 0, 0]
    b = grpo.group_advantages(r, 2, scale="batch")
    assert torch.allclose(b, torch.tensor([1.0, -1.0, 0.0, 0.0]) * 0.5 / (0.5 + EPS), atol=1e-6)
    # group std: group 1 as above -> ±0.70711; group 2 has std 0 -> 0 / eps = 0, not NaN
    g = grpo.group_advantages(r, 2, scale="group")
    s = 0.5 / (math.sqrt(0.5) + EPS)
    assert torch.allclose(g, torch.tensor([s, -s, 0.0, 0.0]), atol=1e-6)


def test_zero_std_groups_give_zero_not_nan():
    r = torch.tensor([0.3, 0.3, 0.3, 1.0, 1.0, 1.0])
    for scale in ("group", "batch", "none"):
        adv = grpo.group_advantages(r, 3, scale=scale)
        assert torch.isfinite(adv).all() and torch.equal(adv, torch.zeros(6)), scale
    same = grpo.group_advantages(torch.full((4,), 0.7), 4, scale="batch")  # batch std 0 too
    assert torch.equal(same, torch.zeros(4))


def test_advantage_input_validation():
    with pytest.raises(ValueError, match=r"N=4.*group_size=3"):
        grpo.group_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match=r"N=4.*group_size=1"):
        grpo.group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="scale"):
        grpo.group_advantages(torch.zeros(4), 2, scale="std")
    with pytest.raises(ValueError, match="1-D"):
        grpo.group_advantages(torch.zeros(2, 2), 2)


def test_dynamic_sampling_keep():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.2, 0.9, 0.5, 0.5 + 1e-7])
    # groups of 2: [1,1] all equal; [0,1] differs; [0,0] equal; [0.2,0.9] differs; [0.5, 0.5+1e-7] within eps
    assert grpo.dynamic_sampling_keep(r, 2).tolist() == [False, True, False, True, False]
    with pytest.raises(ValueError, match="group_size"):
        grpo.dynamic_sampling_keep(r, 3)


# ---- policy loss -------------------------------------------------------------------------------------
# Two responses, T = 4, old_logp = 0 so logp = log(ratio). clip_low 0.2 -> floor 0.8, clip_high 0.28 -> cap 1.28.
# row 0, Â = +1, ratios [1.5, 0.5, 1.0, 0.9], all valid:
#   1.5 -> max(-1.5, -1.28) = -1.28 (clipped high); 0.5 -> max(-0.5, -0.8) = -0.5; 1.0 -> -1; 0.9 -> -0.9
#   sum = -3.68 over 4 tokens
# row 1, Â = -1, ratios [0.5, 1.5, 4.0, 100 (padding)], 3 valid:
#   0.5 -> max(0.5, 0.8) = 0.8 (clipped low); 1.5 -> max(1.5, 1.28) = 1.5; 4.0 -> max(4, 1.28) = 4
#   with dual clip c = 3: 4 -> min(4, 3) = 3
#   sum = 6.3 (dual: 5.3) over 3 tokens

RATIOS = [[1.5, 0.5, 1.0, 0.9], [0.5, 1.5, 4.0, 100.0]]
MASK = [[1, 1, 1, 1], [1, 1, 1, 0]]


def example():
    logp = torch.log(torch.tensor(RATIOS, dtype=F64))
    return logp, torch.zeros(2, 4, dtype=F64), torch.tensor([1.0, -1.0], dtype=F64), torch.tensor(MASK, dtype=F64)


@pytest.mark.parametrize("agg,dual,expected", [
    ("token", None, (-3.68 + 6.3) / 7),                # 2.62 / 7 = 0.374286
    ("token", 3.0, (-3.68 + 5.3) / 7),                 # 1.62 / 7 = 0.231429
    ("seq", None, (-3.68 / 4 + 6.3 / 3) / 2),          # (-0.92 + 2.1) / 2 = 0.59
    ("seq", 3.0, (-3.68 / 4 + 5.3 / 3) / 2),           # (-0.92 + 1.766667) / 2 = 0.423333
    ("dr_grpo", None, (-3.68 + 6.3) / (2 * 4)),        # max_len defaults to T = 4: 2.62 / 8 = 0.3275
    ("dr_grpo", 3.0, (-3.68 + 5.3) / (2 * 4)),         # 1.62 / 8 = 0.2025
])
def test_policy_loss_by_hand(agg, dual, expected):
    logp, old, adv, mask = example()
    loss, m = grpo.policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=dual, agg=agg)
    assert float(loss) == pytest.approx(expected, abs=1e-12)
    assert m["loss/pg"] == pytest.approx(expected, abs=1e-12)
    assert m["clip/frac_high"] == pytest.approx(1 / 7)  # row 0 token 0
    assert m["clip/frac_low"] == pytest.approx(1 / 7)  # row 1 token 0
    assert m["clip/frac"] == pytest.approx(2 / 7)
    assert m["ratio/mean"] == pytest.approx((1.5 + 0.5 + 1.0 + 0.9 + 0.5 + 1.5 + 4.0) / 7)  # 9.9 / 7
    assert all(isinstance(v, float) for v in m.values())
    if dual is None:
        assert "dual_clip/frac" not in m
    else:
        assert m["dual_clip/frac"] == pytest.approx(1 / 7)  # row 1 token 2


def test_policy_loss_max_len_and_denominator():
    logp, old, adv, mask = example()
    loss, _ = grpo.policy_loss(logp, old, adv, mask, agg="dr_grpo", max_len=10)
    assert float(loss) == pytest.approx(2.62 / 20)  # N · max_len = 2 · 10
    loss, _ = grpo.policy_loss(logp, old, adv, mask, agg="token", denominator=14.0)
    assert float(loss) == pytest.approx(2.62 / 14)  # e.g. 14 valid tokens in the whole mini-batch
    loss, _ = grpo.policy_loss(logp, old, adv, mask, agg="dr_grpo", max_len=10, denominator=40.0)
    assert float(loss) == pytest.approx(2.62 / 40)


def test_policy_loss_gradient_is_zero_where_clipped():
    logp, old, adv, mask = example()
    logp.requires_grad_()
    loss, _ = grpo.policy_loss(logp, old, adv, mask, dual_clip=3.0, agg="token")
    loss.backward()
    # unclipped: dL/dlogp = -Â·ρ / 7; clipped (low/high/dual) and padding: 0
    expected = torch.tensor([[0.0, -0.5, -1.0, -0.9], [0.0, 1.5, 0.0, 0.0]], dtype=F64) / 7
    assert torch.allclose(logp.grad, expected, atol=1e-12)


def test_token_mask_keeps_all_valid_tokens_in_denominator():
    logp, old, adv, mask = example()
    token_mask = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]], dtype=F64)
    loss, _ = grpo.policy_loss(logp, old, adv, mask, agg="token", token_mask=token_mask)
    # kept: row 0 -1.28 - 1 - 0.9 = -3.18; row 1 0.8 + 1.5 = 2.3; sum -0.88 over all 7 valid tokens (not 5)
    assert float(loss) == pytest.approx(-0.88 / 7)
    loss_seq, _ = grpo.policy_loss(logp, old, adv, mask, agg="seq", token_mask=token_mask)
    assert float(loss_seq) == pytest.approx((-3.18 / 4 + 2.3 / 3) / 2)


def test_token_level_advantages_equal_broadcast_sequence_advantages():
    logp, old, adv, mask = example()
    a, _ = grpo.policy_loss(logp, old, adv, mask, agg="seq")
    b, _ = grpo.policy_loss(logp, old, adv.unsqueeze(1).expand(2, 4), mask, agg="seq")
    assert float(a) == pytest.approx(float(b))
    w = torch.tensor([[2.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]], dtype=F64)  # token 0 of row 0 weighted ×2
    c, _ = grpo.policy_loss(logp, old, adv.unsqueeze(1) * w, mask, agg="token")
    assert float(c) == pytest.approx((-3.68 - 1.28 + 6.3) / 7)  # Â = 2 there: max(-3, -2.56) = -2.56


def test_extreme_log_ratio_is_clamped():
    logp = torch.tensor([[30.0, -30.0]], dtype=F64)
    old = torch.zeros(1, 2, dtype=F64)
    mask = torch.ones(1, 2, dtype=F64)
    loss, m = grpo.policy_loss(logp, old, torch.tensor([-1.0], dtype=F64), mask, agg="token")
    # Â = -1: ρ = e^20 (clamped from e^30) -> L = e^20; ρ = e^-20 -> clipped to 0.8 -> L = 0.8
    assert float(loss) == pytest.approx((math.exp(20) + 0.8) / 2)
    assert m["clip/frac_low"] == pytest.approx(0.5) and m["clip/frac_high"] == 0.0


def test_policy_loss_empty_mask_and_bad_inputs():
    z = torch.zeros(2, 3)
    loss, m = grpo.policy_loss(z, z, torch.ones(2), z, agg="token")
    assert float(loss) == 0.0 and m["clip/frac"] == 0.0 and m["ratio/mean"] == 0.0
    with pytest.raises(ValueError, match="agg"):
        grpo.policy_loss(z, z, torch.ones(2), torch.ones(2, 3), agg="sum")
    with pytest.raises(ValueError, match="adv"):
        grpo.policy_loss(z, z, torch.ones(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="logp"):
        grpo.policy_loss(z, torch.zeros(2, 4), torch.ones(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="dual_clip"):
        grpo.policy_loss(z, z, torch.ones(2), torch.ones(2, 3), dual_clip=0.5)


# ---- aggregation helpers, k3 KL ----------------------------------------------------------------------

def test_aggregate_and_masked_mean():
    values = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 6.0, 8.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])  # NaN padding, empty row 2
    # token: (1 + 2 + 4 + 6 + 8) / 5 = 21 / 5 = 4.2
    assert float(grpo.aggregate(values, mask, "token")) == pytest.approx(4.2)
    # seq: (1.5 + 6 + 0) / 3 = 2.5 (an empty response counts as 0)
    assert float(grpo.aggregate(values, mask, "seq")) == pytest.approx(2.5)
    # dr_grpo: 21 / (3 · 3) = 2.333…; with max_len 7: 21 / 21 = 1
    assert float(grpo.aggregate(values, mask, "dr_grpo")) == pytest.approx(21 / 9)
    assert float(grpo.aggregate(values, mask, "dr_grpo", max_len=7)) == pytest.approx(1.0)
    assert float(grpo.aggregate(values, mask, "token", denominator=10.0)) == pytest.approx(2.1)
    assert float(grpo.masked_mean(values, mask)) == pytest.approx(4.2)
    assert torch.allclose(grpo.masked_mean(values, mask, dim=1), torch.tensor([1.5, 6.0, 0.0]))
    assert torch.allclose(grpo.masked_mean(values, mask, dim=0), torch.tensor([2.5, 4.0, 8.0]))


def test_kl_k3_by_hand():
    logp = torch.tensor([[0.0, -1.0, 0.0, 0.0, 0.0]], dtype=F64)
    ref = torch.tensor([[0.0, 0.0, -1.0, -30.0, 5.0]], dtype=F64)
    # kl = ref - logp:  0 -> 1 - 0 - 1 = 0
    #                   1 -> e - 1 - 1 = 0.718282
    #                  -1 -> e^-1 + 1 - 1 = 0.367879
    #                 -30 -> clamp -20 -> e^-20 + 20 - 1 ≈ 19 -> clamp 10
    #                   5 -> e^5 - 6 = 142.41 -> clamp 10
    expected = torch.tensor([[0.0, math.e - 2.0, math.exp(-1.0), 10.0, 10.0]], dtype=F64)
    assert torch.allclose(grpo.kl_k3(logp, ref), expected, atol=1e-12)


def test_overlong_penalty_hand_computed():
    """DAPO's soft overlong punishment with max 20, buffer 0.2 (4 tokens): 0 up to 16 tokens, then a linear
    ramp −(L − 16)/4, and the full −1 (× penalty) for a truncated response whatever its counted length."""
    from lite_srpo.rl.objectives.grpo import overlong_penalty

    lengths = torch.tensor([10, 16, 17, 18, 20, 20])
    truncated = torch.tensor([False, False, False, False, False, True])
    out = overlong_penalty(lengths, truncated, max_len=20, buffer_frac=0.2, penalty=1.0)
    assert torch.allclose(out, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    half = overlong_penalty(lengths, truncated, max_len=20, buffer_frac=0.2, penalty=0.5)
    assert torch.allclose(half, 0.5 * out)
    only_truncation = overlong_penalty(lengths, truncated, max_len=20, buffer_frac=0.0)
    assert torch.equal(only_truncation, torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, -1.0]))


# ---- GSPO (sequence-level ratio) and CISPO, on the same example --------------------------------------
# GSPO: one ratio per response, exp(mean valid log-ratio).
#   row 0: mean log(1.5, 0.5, 1.0, 0.9) = log(0.675) / 4 -> ρ = 0.675^(1/4) = 0.906413 (inside [0.8, 1.28]);
#          Â = +1: L = -0.906413 per token, 4 tokens
#   row 1: mean log(0.5, 1.5, 4.0) = log(3.0) / 3 -> ρ = 3^(1/3) = 1.442250 (> 1.28); Â = -1:
#          max(1.442250, 1.28) = 1.442250 per token, 3 tokens (a negative advantage is not clipped above)
GSPO_ROWS = (-(0.675 ** 0.25), 3.0 ** (1 / 3))


def test_gspo_sequence_level_ratio_by_hand():
    logp, old, adv, mask = example()
    loss, m = grpo.policy_loss(logp, old, adv, mask, agg="token", level="sequence")
    assert float(loss) == pytest.approx((4 * GSPO_ROWS[0] + 3 * GSPO_ROWS[1]) / 7, abs=1e-12)
    seq, _ = grpo.policy_loss(logp, old, adv, mask, agg="seq", level="sequence")
    assert float(seq) == pytest.approx((GSPO_ROWS[0] + GSPO_ROWS[1]) / 2, abs=1e-12)  # GSPO's per-sequence mean
    assert m["ratio/mean"] == pytest.approx((4 * 0.675 ** 0.25 + 3 * 3.0 ** (1 / 3)) / 7)
    assert m["clip/frac"] == 0.0
    # clipped as a whole: row 0 with Â = +1 and ρ = 1.442 (> 1.28) would be clipped on every token
    flipped, mf = grpo.policy_loss(logp, old, -adv, mask, agg="seq", level="sequence")
    assert float(flipped) == pytest.approx((0.675 ** 0.25 + -1.28) / 2, abs=1e-12)
    assert mf["clip/frac_high"] == pytest.approx(3 / 7)


# CISPO: L = -min(ρ, cap)·Â·log π, weight detached. log π = log ρ here (old log-probs are 0).
#   row 0, Â = +1, cap 5: -(1.5 log 1.5 + 0.5 log 0.5 + 1.0 log 1.0 + 0.9 log 0.9)
#   row 1, Â = -1: +(0.5 log 0.5 + 1.5 log 1.5 + 4.0 log 4.0); with cap 2: 4.0 -> 2 · log 4
def _cispo_rows(cap: float) -> tuple[float, float]:
    r0 = [1.5, 0.5, 1.0, 0.9]
    r1 = [0.5, 1.5, 4.0]
    return (-sum(min(r, cap) * math.log(r) for r in r0), sum(min(r, cap) * math.log(r) for r in r1))


@pytest.mark.parametrize("cap", [5.0, 2.0])
def test_cispo_by_hand(cap):
    logp, old, adv, mask = example()
    logp.requires_grad_()
    loss, m = grpo.policy_loss(logp, old, adv, mask, agg="token", loss="cispo", cispo_max=cap)
    r0, r1 = _cispo_rows(cap)
    assert float(loss) == pytest.approx((r0 + r1) / 7, abs=1e-12)
    loss.backward()
    # every valid token keeps a gradient, -sg(w)·Â / 7, even where the PPO clip would have zeroed it
    w = [[1.5, 0.5, 1.0, 0.9], [0.5, 1.5, min(4.0, cap), 0.0]]
    expected = torch.tensor([[-x for x in w[0]], w[1]], dtype=F64) / 7
    assert torch.allclose(logp.grad, expected, atol=1e-12)
    assert m["clip/frac_high"] == 0.0  # the only capped token (4.0 at cap 2) has Â < 0
    with pytest.raises(ValueError, match="CISPO has none"):
        grpo.policy_loss(logp, old, adv, mask, loss="cispo", dual_clip=3.0)
