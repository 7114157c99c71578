"""`Run`: everything one RL step needs, built once by `train.setup` and handed to the step's parts."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import RunConfig
from ..data.prompts import ResponseFormat
from ..data.tasks.base import Sample
from ..model.policy import PolicyModel
from ..rewards.runner import Rewarder
from ..run.distributed import SINGLE, DistContext
from ..run.events import EventWriter
from ..run.trackers import Trackers
from .algorithms import AlgorithmSpec


@dataclass
class Run:
    """Everything a step needs; built once by `setup`."""

    cfg: RunConfig
    policy: PolicyModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_set: list[Sample]
    test_set: list[Sample]
    fmt: ResponseFormat
    spec: AlgorithmSpec
    events: EventWriter
    start_step: int = 0
    micro_batch: int = 0
    generation_batch: int = 0
    generation_rows: int = 0
    """Rows per generate call (rollout.generation_rows; 0 = all of a call's rows); the OOM retry lowers it."""
    nonfinite_streak: int = 0
    last_metrics: dict = field(default_factory=dict)
    rewarder: Rewarder | None = None
    """Scores responses (user rewards in worker processes); built by `setup`, closed by `train`."""
    trackers: Trackers = field(default_factory=lambda: Trackers([]))
    dist: DistContext = SINGLE
    """This process's rank in a data-parallel job (one process: rank 0 of 1)."""

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir
