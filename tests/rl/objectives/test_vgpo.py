"""VGPO visual focus and advantage factors against hand-computed values (official-code behaviour)."""

import math

import pytest
import torch

from lite_srpo.rl.objectives import vgpo
from lite_srpo.rl.objectives.vgpo import _tail_gate

F64 = torch.float64
R2 = math.sqrt(0.5)  # cos 45°


def test_image_hidden_mean():
    h = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0], [0.0, 0.0]],
                      [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]])
    img = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    mu = vgpo.image_hidden_mean(h, img)
    # row 0: ((1,0) + (3,2))/2 = (2, 1); row 1 has no image tokens -> zero vector
    assert torch.equal(mu, torch.tensor([[2.0, 1.0], [0.0, 0.0]]))


def test_visual_focus_2d_vectors():
    mu = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    h = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]],
                      [[0.0, 1.0], [1.0, 0.0], [5.0, 5.0], [-7.0, 1.0]]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    rho = vgpo.visual_focus(h, mu, mask)
    # cos row 0: (2,0)·(1,0) -> 1; (0,3) -> 0; (-1,0) -> -1; (1,1) -> 0.707107
    # cos row 1: (0,1)·(0,1) -> 1; (1,0) -> 0; padding -> 0
    # batch min = -1, max = 1 -> ρ = (cos + 1)/2; padding reported as 0
    expected = torch.tensor([[1.0, 0.5, 0.0, (R2 + 1) / 2], [1.0, 0.5, 0.0, 0.0]], dtype=F64)
    assert torch.allclose(rho, expected, atol=1e-7)


def test_visual_focus_min_includes_padding():
    mu = torch.tensor([[1.0, 0.0]], dtype=F64)
    h = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [3.0, 4.0], [-1.0, 0.0]]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0]])
    rho = vgpo.visual_focus(h, mu, mask)
    # valid cos = 1, 0.707107, 0.6 (3/5); padding counts as cos 0 (its real -1 is ignored)
    # batch min = 0 (the padding), max = 1 -> ρ = cos. Valid-only min-max would give 1, 0.267767, 0.
    assert torch.allclose(rho, torch.tensor([[1.0, R2, 0.6, 0.0]], dtype=F64), atol=1e-7)


def _example():
    rho = torch.tensor([[0.2, 0.4, 0.6, 0.8, 0.8, 0.5],
                        [0.3, 0.1, 0.5, 0.2, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    return rho, mask


def test_advantage_factors_hand_computed():
    rho, mask = _example()
    f, g = vgpo.advantage_factors(rho, mask, group_size=2, beta=0.3, gamma=0.5, kappa=0.2)
    # Row 0 (T=6): comp = 0.3·t/5 = [0, .06, .12, .18, .24, .30]
    #   tail = index ≥ ⌊0.5·6⌋ = 3 -> t = 3, 4, 5; n_top = max(1, int(0.2·3)) = 1
    #   threshold = largest tail ρ = 0.8 -> t = 3 AND t = 4 (tie) gated
    #   w = [0.2, 0.4, 0.6, 0.8·1.18 = 0.944, 0.8·1.24 = 0.992, 0.5]
    #   ŵ = (w - 0.2)/0.792 = [0, 0.252525, 0.505051, 0.939394, 1, 0.378788]; Σ = 3.075758
    #   mean 0.512626 -> f = 1 + ŵ - mean = [0.487374, 0.739899, 0.992424, 1.426768, 1.487374, 0.866162]
    # Row 1 (T=4): comp = 0.3·t/3 = [0, .1, .2, .3]; tail t = 2, 3; n_top = max(1, int(0.4)) = 1
    #   threshold 0.5 -> t = 2 gated; w = [0.3, 0.1, 0.6, 0.2]
    #   ŵ = (w - 0.1)/0.5 = [0.4, 0, 1, 0.2]; Σ = 1.6; mean 0.4 -> f = [1.0, 0.6, 1.6, 0.8], padding 1
    # Group (rows 0, 1): s = [3.075758, 1.6] -> n = [1, 0], mean 0.5
    #   g = clamp([1.5, 0.5], 0.9, 2.0) = [1.5, 0.9]   (lower trajectory clamp hit)
    expected_f = torch.tensor([[0.487374, 0.739899, 0.992424, 1.426768, 1.487374, 0.866162],
                               [1.0, 0.6, 1.6, 0.8, 1.0, 1.0]], dtype=F64)
    assert torch.allclose(f, expected_f, atol=1e-6)
    assert torch.allclose(g, torch.tensor([1.5, 0.9], dtype=F64), atol=1e-6)


def test_tail_gate_ties_are_all_included():
    rho = torch.tensor([[0.95, 0.0, 0.0, 0.0, 0.0, 0.9, 0.7, 0.7, 0.7, 0.1, 0.0, 0.0]])
    mask = torch.tensor([[1] * 10 + [0, 0]])
    gate = _tail_gate(rho, mask.bool(), gamma=0.5, kappa=0.4)
    # T = 10: tail = index ≥ 5 -> [0.9, 0.7, 0.7, 0.7, 0.1]; n_top = int(0.4·5) = 2
    # 2nd largest tail score = 0.7 -> 0.9 and all three 0.7 pass (4 tokens), 0.95 before the tail does not
    assert gate.tolist() == [[False] * 5 + [True, True, True, True, False, False, False]]


def test_tail_gate_counts_index_among_valid_tokens():
    # Valid tokens need not be left-aligned: the tail starts at the ⌊γ·T⌋-th VALID token.
    rho = torch.tensor([[0.0, 0.9, 0.8, 0.0, 0.3, 0.6]])
    mask = torch.tensor([[0, 1, 1, 0, 1, 1]])
    gate = _tail_gate(rho, mask.bool(), gamma=0.5, kappa=0.2)
    # valid scores [0.9, 0.8, 0.3, 0.6]: tail = valid index ≥ 2 -> positions 4, 5; n_top = 1 -> 0.6
    assert gate.tolist() == [[False, False, False, False, False, True]]


def test_token_clamp_and_constant_sequences():
    # Row 0: ρ = [0, 0.5 ×10], β = 0 (no compensation) -> ŵ = [0, 1 ×10], mean 10/11 = 0.909091
    #   f[0] = 1 - 0.909091 = 0.090909 -> clamped to 0.1; others 1 + 1 - 0.909091 = 1.090909
    # Row 1: ρ constant 0.4 -> w constant -> ŵ = 0 -> f = 1 everywhere, s = 0
    rho = torch.tensor([[0.0] + [0.5] * 10, [0.4] * 11], dtype=F64)
    mask = torch.ones(2, 11)
    f, g = vgpo.advantage_factors(rho, mask, group_size=1, beta=0.0)
    assert f[0, 0] == pytest.approx(0.1)
    assert torch.allclose(f[0, 1:], torch.full((10,), 2.0 - 10 / 11, dtype=F64))
    assert torch.equal(f[1], torch.ones(11, dtype=F64))
    # groups of one row: min = max -> n = 0 -> g = 1
    assert torch.equal(g, torch.ones(2, dtype=F64))


def test_constant_group_scores_give_unit_trajectory_factor():
    rho, mask = _example()
    rho = torch.cat([rho[:1], rho[:1]])  # two identical rows -> equal s
    f, g = vgpo.advantage_factors(rho, torch.ones(2, 6), group_size=2)
    assert torch.equal(g, torch.ones(2, dtype=F64))
    assert torch.equal(f[0], f[1])


def test_empty_row_and_group_size_check():
    rho = torch.tensor([[0.3, 0.6], [0.9, 0.9]])
    f, g = vgpo.advantage_factors(rho, torch.tensor([[1, 1], [0, 0]]), group_size=2)
    # row 1 has no valid tokens: token factors 1, Σŵ = 0
    # row 0: ŵ = [0, 1], Σŵ = 1 -> n = [1, 0], mean 0.5 -> g = [1.5, 0.9]
    assert torch.equal(f[1], torch.ones(2))
    assert torch.allclose(g, torch.tensor([1.5, 0.9]))
    with pytest.raises(ValueError, match="group_size"):
        vgpo.advantage_factors(torch.zeros(3, 2), torch.ones(3, 2), group_size=2)


def test_focus_of_an_empty_batch_is_empty():
    """A rank whose groups were all dropped by dynamic sampling still runs its (empty) passes."""
    cos = vgpo.focus_cosine(torch.zeros(0, 5, 3), torch.zeros(0, 3), torch.zeros(0, 5))
    assert vgpo.minmax_focus(cos, torch.zeros(0, 5)).shape == (0, 5)
