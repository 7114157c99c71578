"""Fixtures of the fake_cuda tests: tiny models of the four families loaded on emulated CUDA by the project's
own loader, and stand-ins for the few driver calls that have no emulation (each says so).

Every test here carries the `fake_cuda` marker; on the CPU build of torch the root conftest skips them with
the reason, and `make test` (LITE_SRPO_REQUIRE_FAKE_CUDA=1) fails when they did not run.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from lite_srpo.config import LoraConfig, ModelConfig
from lite_srpo.data.tasks import make_task
from lite_srpo.data.tasks.base import Sample
from lite_srpo.model.policy import PolicyModel, load_policy

from .cuda_emulation import fake_cuda

FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "idefics3")
CUDA0 = torch.device("cuda", 0)
GIB = 2**30


def load_on_cuda(path: str, device: torch.device | None = CUDA0, **model: object) -> PolicyModel:
    """`load_policy` as `train.setup` calls it, onto emulated `device` (None: `pick_device()`). dtype `auto`;
    not 4-bit: bitsandbytes' Params4bit cannot wrap an emulated tensor (cuda_emulation.py)."""
    cfg = ModelConfig(path=str(path), load_in_4bit=False, dtype="auto", gradient_checkpointing=True)
    for key, value in model.items():
        setattr(cfg, key, value)
    with fake_cuda(), torch.no_grad():
        return load_policy(cfg, LoraConfig(r=4, alpha=8), device=device)


@pytest.fixture(scope="module")
def cuda_policy(tiny_factory) -> Callable[[str], PolicyModel]:
    """`cuda_policy(arch)`: the tiny `arch` model on emulated cuda:0, loaded once per module."""
    cache: dict[str, PolicyModel] = {}

    def get(arch: str) -> PolicyModel:
        if arch not in cache:
            cache[arch] = load_on_cuda(tiny_factory(arch))
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def cpu_policy(tiny_factory) -> Callable[[str], PolicyModel]:
    """`cpu_policy(arch)`: the same model loaded on the CPU in bf16, what the card's numbers are compared with
    (the emulation computes with the CPU kernels, so the two agree unless the CUDA branch differs)."""
    cache: dict[str, PolicyModel] = {}

    def get(arch: str) -> PolicyModel:
        if arch not in cache:
            cfg = ModelConfig(path=str(tiny_factory(arch)), load_in_4bit=False, dtype="bfloat16")
            cache[arch] = load_policy(cfg, LoraConfig(r=4, alpha=8), device=torch.device("cpu"))
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return make_task("count_shapes", "train", 2, seed=0)


class CudaGenerators:
    """Stand-in for the CUDA driver's per-device generators: `torch.cuda.get_rng_state_all` and
    `set_rng_state_all` need a driver (without one torch returns `[]`, and queues a set until a CUDA init that
    never comes). Each state is a uint8 tensor of 16 bytes, like CUDA's (seed and Philox offset); `draw()`
    advances one device's offset the way a cuda random op does. `is_available`/`device_count` say a node has
    `count` GPUs."""

    def __init__(self, count: int = 2) -> None:
        self.count = count
        self.states = [torch.arange(16, dtype=torch.uint8) + 16 * d for d in range(count)]
        self.sets = 0

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [s.clone() for s in self.states]

    def set_rng_state_all(self, states: list[torch.Tensor]) -> None:
        if len(states) != self.count:
            raise RuntimeError(f"{len(states)} CUDA RNG states for {self.count} devices")
        self.states = [torch.as_tensor(s, dtype=torch.uint8).clone() for s in states]
        self.sets += 1

    def draw(self, device: int = 0) -> None:
        self.states[device][8] += 4  # the low byte of the Philox offset

    def install(self, monkeypatch: pytest.MonkeyPatch) -> "CudaGenerators":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", self.get_rng_state_all)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", self.set_rng_state_all)
        return self


class FakeCards:
    """Stand-in for `torch.cuda.get_device_properties`, which needs a driver: each device reports only its
    `total_memory` (what `fit.auto_fit` reads), e.g. {0: 80 GiB, 1: 24 GiB}."""

    def __init__(self, gib_by_device: dict[int, float]) -> None:
        self.gib = gib_by_device
        self.asked: list[int] = []

    def get_device_properties(self, device: int | torch.device) -> object:
        index = device.index if isinstance(device, torch.device) else int(device)
        self.asked.append(index)
        return type("Props", (), {"total_memory": int(self.gib[index] * GIB), "name": f"fake {self.gib[index]} GiB"})()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> "FakeCards":
        monkeypatch.setattr(torch.cuda, "get_device_properties", self.get_device_properties)
        return self
