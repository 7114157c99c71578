"""Image corruptions: same size, seeded, never all-zero."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lite_srpo.data.corrupt import (CORRUPTIONS, blur, constant_fill, corrupt_image, corrupt_images, gaussian_noise,
                                    patch_blacken)
from lite_srpo.errors import ConfigError

PARAMS = {"patch": {"patch": 14, "prob": 0.6}, "noise": {"std": 64.0}, "blur": {"radius": 3.0}, "constant": {}}


def _random_image(w=70, h=42, seed=0, low=1) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(low, 256, size=(h, w, 3), dtype=np.uint8), mode="RGB")


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
@pytest.mark.parametrize("size", [(70, 42), (13, 5), (1, 1)])
def test_same_size_and_rgb(kind, size):
    img = _random_image(*size)
    out = corrupt_image(img, kind, seed=3, **PARAMS[kind])
    assert out.size == img.size and out.mode == "RGB"


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_other_modes_become_rgb(mode):
    img = _random_image().convert(mode)
    out = corrupt_image(img, "patch", seed=1, patch=7, prob=0.5)
    assert out.mode == "RGB" and out.size == img.size


@pytest.mark.parametrize("kind", ["patch", "noise"])
def test_seeded_kinds_reproduce_and_differ_by_seed(kind):
    img = _random_image()
    a = _arr(corrupt_image(img, kind, seed=11, **PARAMS[kind]))
    b = _arr(corrupt_image(img, kind, seed=11, **PARAMS[kind]))
    c = _arr(corrupt_image(img, kind, seed=12, **PARAMS[kind]))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, _arr(img))


def test_corrupt_images_draws_in_order_from_one_seed():
    imgs = [_random_image(seed=1), _random_image(seed=2)]
    outs = corrupt_images(imgs, "patch", seed=5, patch=14, prob=0.5)
    assert np.array_equal(_arr(outs[0]), _arr(corrupt_image(imgs[0], "patch", seed=5, patch=14, prob=0.5)))
    # the second image gets the generator's next draws: a different mask from the first
    mask0 = (_arr(outs[0]) == 0).all(axis=2)
    mask1 = (_arr(outs[1]) == 0).all(axis=2)
    assert not np.array_equal(mask0, mask1)


@pytest.mark.parametrize("kind,params", [
    ("patch", {"patch": 14, "prob": 1.0}),
    ("patch", {"patch": 3, "prob": 0.5}),
    ("noise", {"std": 50.0}),
    ("blur", {"radius": 2.0}),
    ("constant", {"value": 0}),
    ("constant", {"value": (0, 0, 0)}),
])
def test_never_all_zero_even_for_a_black_input(kind, params):
    black = Image.new("RGB", (28, 28), (0, 0, 0))
    out = _arr(corrupt_image(black, kind, seed=0, **params))
    assert out.any()
    if kind != "noise":
        assert (out == 1).all()  # the documented replacement: 1/255 grey everywhere


def test_full_blackening_of_a_normal_image_is_one_over_255_grey():
    out = _arr(patch_blacken(_random_image(), patch=14, prob=1.0, rng=np.random.default_rng(0)))
    assert (out == 1).all()


def test_prob_zero_is_the_identity():
    img = _random_image()
    assert np.array_equal(_arr(corrupt_image(img, "patch", seed=4, patch=14, prob=0.0)), _arr(img))


def test_fraction_of_blackened_patches_matches_prob():
    # 1400 x 1400 px with 14 px patches = 100 x 100 = 10,000 patches; binomial std = sqrt(0.6*0.4/1e4) ≈ 0.0049
    img = _random_image(1400, 1400, seed=9)  # no black pixel in the input (values 1..255)
    out = _arr(corrupt_image(img, "patch", seed=2, patch=14, prob=0.6))
    black = (out == 0).all(axis=2).reshape(100, 14, 100, 14)
    per_patch = black.all(axis=(1, 3))
    assert np.array_equal(per_patch, black.any(axis=(1, 3)))  # a patch is blackened whole or not at all
    assert abs(per_patch.mean() - 0.6) < 0.02  # ≈ 4 standard deviations
    untouched = ~(out == 0).all(axis=2)
    assert np.array_equal(out[untouched], _arr(img)[untouched])


def test_edge_patches_are_partial_squares():
    img = _random_image(20, 20)
    out = _arr(patch_blacken(img, patch=14, prob=0.999999, rng=np.random.default_rng(0), fill=(5, 6, 7)))
    # 2 x 2 grid: 14 + 6 px each way, every patch filled with the colour
    assert (out.reshape(-1, 3) == [5, 6, 7]).all()


def test_noise_std_and_constant_value():
    grey = Image.new("RGB", (100, 100), (128, 128, 128))
    noisy = _arr(gaussian_noise(grey, std=10.0, rng=np.random.default_rng(0))).astype(float)
    assert abs(noisy.std() - 10.0) < 0.5 and abs(noisy.mean() - 128) < 0.5
    assert (_arr(constant_fill(_random_image(), value=(10, 20, 30))).reshape(-1, 3) == [10, 20, 30]).all()
    smooth = _arr(blur(_random_image(60, 60), radius=4.0)).astype(float)
    assert smooth.std() < _arr(_random_image(60, 60)).astype(float).std() / 3


def test_errors():
    img = _random_image()
    with pytest.raises(ConfigError, match="patch, noise, blur, constant"):
        corrupt_image(img, "cutout", seed=0)
    with pytest.raises(ConfigError, match="radius"):
        corrupt_image(img, "blur", seed=0, std=3.0)
    with pytest.raises(ValueError):
        corrupt_image(img, "patch", seed=0, prob=1.5)
    with pytest.raises(ValueError):
        corrupt_image(img, "patch", seed=0, patch=0)
