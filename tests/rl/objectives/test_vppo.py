"""VPPO token dependency, top-k token mask, trajectory scale and entropy penalty."""

import math

import pytest
import torch

from lite_srpo.rl.objectives import grpo, vppo

F64 = torch.float64


def test_token_dependency_by_hand():
    o = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -1.0]], dtype=F64)
    a = torch.tensor([[-1.0, -2.0, 0.0, 4.0, -51.0]], dtype=F64)
    S = vppo.token_dependency(o, a)
    # δ = a - o:   0 -> 0
    #             -1 -> e^-1 + 1 - 1 = 0.367879
    #              1 -> e - 2 = 0.718282
    #              5 -> e^5 - 6 = 142.4 -> clamp 10
    #            -50 -> clamp -20 -> e^-20 + 19 ≈ 19 -> clamp 10
    expected = torch.tensor([[0.0, math.exp(-1.0), math.e - 2.0, 10.0, 10.0]], dtype=F64)
    assert torch.allclose(S, expected, atol=1e-12)


def test_top_k_mask_lengths_5_and_3():
    S = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.2],
                      [0.7, 0.2, 0.6, 9.0, 9.0],   # last two are padding with large junk
                      [0.5, 0.5, 0.5, 0.0, 0.0],   # ties
                      [3.0, 3.0, 3.0, 3.0, 3.0]])  # empty response
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    m = vppo.top_k_mask(S, mask, k=0.4)
    # |o| = 5: k = ceil(0.4·5) = ceil(2.0) = 2 -> 0.9 (t=3) and 0.5 (t=1)
    # |o| = 3: k = ceil(0.4·3) = ceil(1.2) = 2 -> 0.7 (t=0) and 0.6 (t=2); padding 9.0 never picked
    # ties 0.5, 0.5, 0.5 with k = 2: the stable sort keeps the two earliest (t=0, t=1)
    # |o| = 0: k = 0 -> nothing
    expected = torch.tensor([[0, 1, 0, 1, 0], [1, 0, 1, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]],
                            dtype=S.dtype)
    assert torch.equal(m, expected)


def test_top_k_mask_rejects_bad_k():
    with pytest.raises(ValueError, match="k"):
        vppo.top_k_mask(torch.zeros(1, 3), torch.ones(1, 3), k=0.0)


def test_trajectory_scale_by_hand():
    S = torch.tensor([[0.2, 0.0], [0.3, 7.0], [0.5, 0.5], [1.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]])
    alpha = vppo.trajectory_scale(S, mask, beta_min=0.9)
    # S̄ = [0.1, 0.3 (padding 7.0 ignored), 0.5, 0.5]; mn = 0.1, mx = 0.5
    # n = [0, 0.5, 1, 1]; μ = 2.5/4 = 0.625; β_max = 0.9 + 0.1/0.625 = 1.06
    # α = 0.9 + n·0.16 = [0.9, 0.98, 1.06, 1.06]; mean = 4.0/4 = 1
    assert torch.allclose(alpha, torch.tensor([0.9, 0.98, 1.06, 1.06], dtype=F64), atol=1e-7)
    assert float(alpha.mean()) == pytest.approx(1.0, abs=1e-6)


def test_trajectory_scale_all_equal_and_degenerate():
    mask = torch.ones(3, 4)
    assert torch.equal(vppo.trajectory_scale(torch.full((3, 4), 0.3), mask), torch.ones(3))
    # a single response: nothing to compare against
    assert torch.equal(vppo.trajectory_scale(torch.rand(1, 4), torch.ones(1, 4)), torch.ones(1))
    # an empty response keeps α = 1 and is left out of mn/mx/μ
    S = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]], dtype=F64)
    alpha = vppo.trajectory_scale(S, torch.tensor([[1, 1], [1, 1], [0, 0]]), beta_min=0.8)
    # S̄ = [0, 1] -> n = [0, 1], μ = 0.5, β_max = 0.8 + 0.2/0.5 = 1.2 -> α = [0.8, 1.2], third = 1
    assert torch.allclose(alpha, torch.tensor([0.8, 1.2, 1.0], dtype=F64), atol=1e-7)


def test_trajectory_scale_mean_is_one_on_random_batches():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n, t = int(torch.randint(2, 17, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g))
        S = torch.rand(n, t, generator=g) * 3
        lengths = torch.randint(1, t + 1, (n,), generator=g)
        mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
        alpha = vppo.trajectory_scale(S, mask, beta_min=0.9)
        assert float(alpha.mean()) == pytest.approx(1.0, abs=1e-6)
        assert float(alpha.min()) >= 0.9 - 1e-6


def test_entropy_penalty_by_hand():
    logp = torch.tensor([[-1.0, -2.0], [-3.0, float("nan")]], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0]])
    # Σ -l = 1 + 2 + 3 = 6 over 3 tokens -> 0.06·2 = 0.12; with denominator 6 -> 0.06·1 = 0.06
    assert float(vppo.entropy_penalty(logp, mask)) == pytest.approx(0.12)
    assert float(vppo.entropy_penalty(logp, mask, coef=0.06, denominator=6)) == pytest.approx(0.06)


def test_token_mask_keeps_the_all_token_denominator():
    zeros = torch.zeros(2, 3, dtype=F64)
    adv = torch.tensor([1.0, -2.0], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=F64)
    m = torch.tensor([[1, 0, 0], [1, 1, 0]], dtype=F64)
    loss, _ = grpo.policy_loss(zeros, zeros, adv, mask, agg="token", token_mask=m)
    # ratio = 1 -> per-token loss = -Â: row 0 -1, row 1 +2 (dual clip min(2, 3·2) keeps 2)
    # selected: -1 + 2 + 2 = 3; divided by ALL 5 valid tokens = 0.6 (not 3/3 = 1.0)
    assert float(loss) == pytest.approx(0.6)
