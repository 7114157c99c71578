"""Train/validation/test splits from the recipe: a procedural task, or local dataset files.

The validation split (`data.n_val`) is carved from the train side and never overlaps training items,
so hyper-parameters can be chosen without looking at the test split.
"""
from __future__ import annotations

from ..config import DataConfig
from ..errors import DataError
from .hub import load_data_source
from .tasks import make_task
from .tasks.base import Sample


def load_all_splits(cfg: DataConfig, seed: int) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(train, validation, test). Procedural tasks draw validation items after the n_train train items
    (same train split, other indices); a file dataset keeps its last `n_val` train rows for validation and,
    without a test file, its last 10% (at least 1) for test."""
    if cfg.task:
        train = make_task(cfg.task, "train", cfg.n_train + cfg.n_val, seed, image_size=cfg.image_size)
        test = make_task(cfg.task, "test", cfg.n_test, seed, image_size=cfg.image_size)
        return train[:cfg.n_train], train[cfg.n_train:], test
    root = cfg.image_root or None
    train = load_data_source(cfg.train_file, key="data.train_file", image_root=root, columns=cfg.columns)
    if cfg.test_file:
        test = load_data_source(cfg.test_file, key="data.test_file", image_root=root, columns=cfg.columns,
                                default_split="test")
    else:
        if len(train) < 2:
            raise DataError(f"{cfg.train_file}: {len(train)} row(s) — need at least 2 to hold one out as test "
                            "(or set data.test_file)")
        n_test = max(1, len(train) // 10)
        train, test = train[:-n_test], train[-n_test:]
    if cfg.n_val:
        if cfg.n_val >= len(train):
            raise DataError(f"data.n_val={cfg.n_val}: {cfg.train_file} has only {len(train)} training row(s)")
        train, val = train[:-cfg.n_val], train[-cfg.n_val:]
    else:
        val = []
    return train, val, test


def load_splits(cfg: DataConfig, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, test); validation items, if any, are left out of train."""
    train, _, test = load_all_splits(cfg, seed)
    return train, test
