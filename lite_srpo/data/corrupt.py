"""Seeded image corruptions for the corrupted-image pass (SRPO, PAPO, VPPO; research/algorithms.md §6.1).

Every corruption keeps the image size, so the number of image tokens and the position ids of the
teacher-forced pass stay valid. No output is ever all-zero: some processors (Idefics3) drop an all-zero
image as padding and then crash. When a result would be all zero (a black input, `prob=1` with a black
fill, a zero constant), every pixel is set to 1/255 grey instead — the darkest image that is not zero.
Inputs in any mode (L, RGBA, P, …) are converted to RGB; outputs are RGB.
"""
from __future__ import annotations

import inspect
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from ..errors import ConfigError

Fill = int | tuple[int, int, int]


def _rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.uint8)  # [H, W, 3]


def _never_all_zero(arr: np.ndarray) -> Image.Image:
    if not arr.any():
        arr = np.ones_like(arr)
    return Image.fromarray(arr, mode="RGB")


def patch_blacken(img: Image.Image, patch: int = 14, prob: float = 0.6, fill: Fill = 0,
                  rng: np.random.Generator | None = None) -> Image.Image:
    """Each `patch`-pixel square of a grid (partial squares at the right/bottom edge included) is filled
    with `fill` independently with probability `prob` (PAPO/VPPO random patch masking)."""
    if patch < 1 or not 0.0 <= prob <= 1.0:
        raise ValueError(f"patch={patch}, prob={prob}: need patch >= 1 and 0 <= prob <= 1")
    rng = rng if rng is not None else np.random.default_rng()
    arr = _rgb(img).copy()
    h, w = arr.shape[:2]
    grid_h, grid_w = -(-h // patch), -(-w // patch)
    hit = rng.random((grid_h, grid_w)) < prob  # [gh, gw]
    pixel_hit = np.repeat(np.repeat(hit, patch, axis=0), patch, axis=1)[:h, :w]  # [H, W]
    arr[pixel_hit] = np.broadcast_to(np.asarray(fill, dtype=np.uint8), (3,))
    return _never_all_zero(arr)


def gaussian_noise(img: Image.Image, std: float = 64.0, rng: np.random.Generator | None = None) -> Image.Image:
    """Add N(0, std²) noise to every channel of every pixel, clipped to [0, 255]."""
    if std < 0:
        raise ValueError(f"std={std}: must be >= 0")
    rng = rng if rng is not None else np.random.default_rng()
    arr = _rgb(img).astype(np.float32)
    noisy = arr + rng.normal(0.0, std, size=arr.shape).astype(np.float32)
    return _never_all_zero(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


def blur(img: Image.Image, radius: float = 6.0) -> Image.Image:
    """Gaussian blur (deterministic; takes no seed)."""
    if radius < 0:
        raise ValueError(f"radius={radius}: must be >= 0")
    return _never_all_zero(_rgb(img.convert("RGB").filter(ImageFilter.GaussianBlur(radius))))


def constant_fill(img: Image.Image, value: Fill = 128) -> Image.Image:
    """The same size filled with one colour: the image carries no information at all."""
    arr = np.empty_like(_rgb(img))
    arr[...] = np.broadcast_to(np.asarray(value, dtype=np.uint8), (3,))
    return _never_all_zero(arr)


# kind -> (function, whether it draws random numbers)
CORRUPTIONS: dict[str, tuple[Callable[..., Image.Image], bool]] = {
    "patch": (patch_blacken, True),
    "noise": (gaussian_noise, True),
    "blur": (blur, False),
    "constant": (constant_fill, False),
}


def corrupt_images(images: list[Image.Image], kind: str, seed: int, **params) -> list[Image.Image]:
    """Corrupt each image with one generator seeded by `seed` (>= 0), drawn in image order.

    `params` are the kind's own keyword arguments: patch (patch, prob, fill), noise (std), blur (radius),
    constant (value).
    """
    if kind not in CORRUPTIONS:
        raise ConfigError(f"algorithm.corruption.kind={kind!r}: use one of {', '.join(CORRUPTIONS)}")
    fn, seeded = CORRUPTIONS[kind]
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("img", "rng")]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(f"corruption {kind!r} got unknown parameter(s) {', '.join(unknown)}; "
                          f"it takes {', '.join(allowed) or 'none'}")
    if seeded:
        params = dict(params, rng=np.random.default_rng(seed))
    return [fn(im, **params) for im in images]


def corrupt_image(img: Image.Image, kind: str = "patch", seed: int = 0, **params) -> Image.Image:
    """One image; equal to `corrupt_images([img], kind, seed, **params)[0]`."""
    return corrupt_images([img], kind, seed, **params)[0]
