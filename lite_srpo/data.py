"""Train/test splits from the recipe: a procedural task, or local dataset files."""
from __future__ import annotations

from .config import DataConfig
from .errors import DataError
from .hub_data import load_data_source
from .tasks import make_task
from .tasks.base import Sample


def load_splits(cfg: DataConfig, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(train, test). Without a test file, a file dataset keeps its last 10% (at least 1) as test."""
    if cfg.task:
        train = make_task(cfg.task, "train", cfg.n_train, seed, image_size=cfg.image_size)
        test = make_task(cfg.task, "test", cfg.n_test, seed, image_size=cfg.image_size)
        return train, test
    root = cfg.image_root or None
    train = load_data_source(cfg.train_file, key="data.train_file", image_root=root, columns=cfg.columns)
    if cfg.test_file:
        return train, load_data_source(cfg.test_file, key="data.test_file", image_root=root, columns=cfg.columns,
                                default_split="test")
    if len(train) < 2:
        raise DataError(f"{cfg.train_file}: {len(train)} row(s) — need at least 2 to hold one out as test "
                        "(or set data.test_file)")
    n_test = max(1, len(train) // 10)
    return train[:-n_test], train[-n_test:]
