"""PAPO perception KL, loss terms and γ schedule against hand-computed values."""

import math

import pytest
import torch

from lite_srpo.rl.objectives import papo

F64 = torch.float64
NAN = float("nan")


def test_perception_kl_by_hand():
    l = torch.tensor([[-1.0, -2.0, -0.5, -1.0, -31.0, NAN]], dtype=F64)
    a = torch.tensor([[-1.0, -1.0, -2.5, -31.0, -1.0, NAN]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    kl = papo.perception_kl(l, a, mask)
    # d = a - l:  0 -> e^0 - 0 - 1 = 0
    #             1 -> e - 1 - 1 = 0.718282
    #            -2 -> e^-2 + 2 - 1 = 1.135335
    #           -30 -> clamp -20 -> e^-20 + 20 - 1 = 19.0 -> clamp 10
    #            30 -> clamp 20 -> e^20 - 21 ≈ 4.9e8 -> clamp 10
    #       padding -> 0 (even though it holds nan)
    expected = torch.tensor([[0.0, math.e - 2.0, math.exp(-2.0) + 1.0, 10.0, 10.0, 0.0]], dtype=F64)
    assert torch.allclose(kl, expected, atol=1e-12)


def _batch():
    l = torch.tensor([[-1.0, -2.0], [-0.5, NAN]], dtype=F64)
    a = torch.tensor([[-1.0, -1.0], [-2.5, NAN]], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0]])
    return l, a, mask


def test_loss_terms_by_hand_with_double_entropy():
    l, a, mask = _batch()
    extra, m = papo.papo_loss_terms(l, a, mask, gamma=0.02, eta_ori=0.05, eta_aug=0.03)
    # KL_prcp tokens 0, 0.718282, 1.135335 -> mean 1.853617/3 = 0.617872
    # H_ori = mean(-l) = (1 + 2 + 0.5)/3 = 1.166667;  H_aug = mean(-a) = (1 + 1 + 2.5)/3 = 1.5
    # extra = -0.02·0.617872 + 0.03·1.5 + 0.05·1.166667 = -0.012357 + 0.045 + 0.058333 = 0.090976
    kl_mean = (0.0 + (math.e - 2.0) + (math.exp(-2.0) + 1.0)) / 3
    assert m["papo/kl_prcp"] == pytest.approx(kl_mean, abs=1e-12)
    assert m["papo/kl_prcp"] == pytest.approx(0.617872, abs=1e-6)
    assert m["papo/entropy_ori"] == pytest.approx(3.5 / 3)
    assert m["papo/entropy_aug"] == pytest.approx(1.5)
    assert float(extra) == pytest.approx(-0.02 * kl_mean + 0.03 * 1.5 + 0.05 * 3.5 / 3, abs=1e-12)
    assert float(extra) == pytest.approx(0.090976, abs=1e-6)


def test_loss_terms_global_denominator():
    l, a, mask = _batch()
    extra, m = papo.papo_loss_terms(l, a, mask, gamma=0.02, eta_ori=0.05, eta_aug=0.03,
                                    agg_denominator=6)
    # sums: KL 1.853617, H_aug 4.5, H_ori 3.5 -> (-0.037072 + 0.135 + 0.175)/6 = 0.045488
    assert float(extra) == pytest.approx(0.045488, abs=1e-6)
    assert m["papo/entropy_aug"] == pytest.approx(1.5)  # metrics stay local token means


def test_kl_term_pushes_logp_away_from_masked_view():
    l = torch.tensor([[-1.0, -2.0]], dtype=F64, requires_grad=True)
    a = torch.tensor([[-2.0, -1.0]], dtype=F64)
    extra, _ = papo.papo_loss_terms(l, a, torch.ones(1, 2), gamma=0.02)
    extra.backward()
    # k3 = e^d - d - 1 with d = a - l -> dk3/dl = 1 - e^(a-l); loss = -γ·Σk3/2
    # token 0 (l > a): d = -1 -> dloss/dl = -0.02·(1 - e^-1)/2 = -0.006321 < 0: descent raises l
    # token 1 (l < a): d = +1 -> dloss/dl = -0.02·(1 - e)/2   = +0.017183 > 0: descent lowers l
    expected = torch.tensor([[-0.01 * (1 - math.exp(-1.0)), -0.01 * (1 - math.e)]], dtype=F64)
    assert torch.allclose(l.grad, expected, atol=1e-12)
    assert l.grad[0, 0] < 0 < l.grad[0, 1]


def test_aug_entropy_term_has_no_gradient_and_padding_is_safe():
    l, a, mask = _batch()
    grads = []
    for eta_aug in (0.0, 0.5):
        lg = l.clone().requires_grad_(True)
        extra, _ = papo.papo_loss_terms(lg, a, mask, gamma=0.0, eta_ori=0.05, eta_aug=eta_aug)
        extra.backward()
        grads.append(lg.grad)
    # only η_ori·mean(-l) depends on l: d/dl = -0.05/3 on each valid token, 0 on padding (nan there)
    expected = torch.tensor([[-0.05 / 3, -0.05 / 3], [-0.05 / 3, 0.0]], dtype=F64)
    assert torch.allclose(grads[0], expected, atol=1e-15)
    assert torch.equal(grads[0], grads[1])  # η_aug changes the value, never the gradient


def test_bfloat16_inputs_are_upcast():
    l, a, mask = _batch()
    kl = papo.perception_kl(l.nan_to_num().bfloat16(), a.nan_to_num().bfloat16(), mask)
    assert kl.dtype == torch.float32


def test_gamma_schedule():
    assert papo.gamma_schedule(0, 100) == 0.02
    assert papo.gamma_schedule(77, 100, mode="fixed", start=0.01) == 0.01
    # annealing over int(100·0.5) = 50 steps from 0.01 to 0: step 25 -> 0.01·(1 - 25/50) = 0.005
    kw = dict(total_steps=100, mode="annealing", start=0.01, end=0.0, ratio=0.5)
    assert papo.gamma_schedule(0, **kw) == pytest.approx(0.01)
    assert papo.gamma_schedule(25, **kw) == pytest.approx(0.005)
    assert papo.gamma_schedule(50, **kw) == pytest.approx(0.0)
    assert papo.gamma_schedule(90, **kw) == pytest.approx(0.0)
    # a tiny run still anneals: max(1, int(3·0.1)) = 1 step
    assert papo.gamma_schedule(1, 3, mode="annealing", start=0.02, ratio=0.1) == 0.0
    with pytest.raises(ValueError, match="mode"):
        papo.gamma_schedule(0, 10, mode="cosine")
