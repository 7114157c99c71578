"""Confidence intervals for small-scale results: a percentile bootstrap over test items.

A held-out accuracy on 100 items moves by several points between seeds, so every figure the demo and
`compare` report carries a 95 % interval, and differences between arms are paired (same items).
"""
from __future__ import annotations

import numpy as np


def bootstrap_ci(values: list[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (one value per test item)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def paired_difference(a: list[float], b: list[float], n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0) -> dict[str, float | list[float]]:
    """Mean of `a − b` over the same items, with its bootstrap interval (items resampled jointly)."""
    if len(a) != len(b):
        raise ValueError(f"paired difference needs the same items: {len(a)} vs {len(b)} values")
    diff = (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).tolist()
    lo, hi = bootstrap_ci(diff, n_boot=n_boot, level=level, seed=seed)
    return {"mean": float(np.mean(diff)) if diff else float("nan"), "ci95": [lo, hi]}


def with_ci(result: dict, key: str = "item_accuracy") -> dict:
    """`{"accuracy": mean, "ci95": [lo, hi]}` plus the result's other summary numbers, from per-item scores."""
    items = result[key]
    lo, hi = bootstrap_ci(items)
    out = {"accuracy": float(np.mean(items)) if items else float("nan"), "ci95": [lo, hi]}
    for k in ("format_rate", "mean_length", "truncated_frac", "protocol", "n_samples", "n_responses"):
        if k in result:
            out[k] = result[k]
    out["items"] = items
    return out


def seeds_items_ci(values: list[list[float]], n_boot: int = 2000, level: float = 0.95,
                   seed: int = 0) -> dict[str, float | list[float]]:
    """Mean over seeds × items, with a two-level bootstrap (resample seeds, then items): the interval
    carries the seed-to-seed variance of RL as well as the test-set sampling. `values[k][i]`: seed k, item i."""
    x = np.asarray(values, dtype=np.float64)  # [K, n]
    if x.size == 0:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")]}
    rng = np.random.default_rng(seed)
    k, n = x.shape
    seeds = rng.integers(0, k, size=(n_boot, k))  # [B, K]
    items = rng.integers(0, n, size=(n_boot, n))  # [B, n]
    means = np.array([x[seeds[b]][:, items[b]].mean() for b in range(n_boot)])
    alpha = (1.0 - level) / 2
    return {"mean": float(x.mean()), "ci95": [float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))]}


def paired_seeds_items(a: list[list[float]], b: list[list[float]], **kw) -> dict[str, float | list[float]]:
    """SRPO-vs-base style difference: arm a minus arm b on the same seeds (same warm-up, same seed's prompt
    order) and the same items, with the two-level bootstrap of `seeds_items_ci` on the paired differences."""
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if xa.shape != xb.shape:
        raise ValueError(f"paired difference needs the same seeds and items: {xa.shape} vs {xb.shape}")
    out = seeds_items_ci((xa - xb).tolist(), **kw)
    out["per_seed"] = (xa - xb).mean(axis=1).tolist()
    return out
