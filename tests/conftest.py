"""Shared fixtures: tiny models are built once per session, offline, with the project's own builder."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    from lite_srpo.model.tiny import make_tiny

    return make_tiny("qwen2_5_vl", tmp_path_factory.mktemp("tiny") / "qwen2_5_vl", size="test", seed=0)


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory):
    """Build (and cache) a tiny model of any arch."""
    from lite_srpo.model.tiny import make_tiny

    cache: dict[tuple[str, str], object] = {}

    def make(arch: str, size: str = "test"):
        key = (arch, size)
        if key not in cache:
            cache[key] = make_tiny(arch, tmp_path_factory.mktemp(f"tiny_{arch}_{size}") / arch, size=size, seed=0)
        return cache[key]

    return make


@pytest.fixture(scope="session", autouse=True)
def length_reward():
    """A reward that varies on a random tiny model (accuracy is ~always 0 there), so updates are non-zero.
    Registered the way a user adds a reward: a plain function in the registry (in-process only)."""
    from lite_srpo.rewards import builtin as rewards

    rewards.REWARD_FUNCTIONS["test_length"] = lambda response, sample, fmt: len(response) / 50.0
    yield
    rewards.REWARD_FUNCTIONS.pop("test_length", None)


def tiny_recipe(model_path, run_root, **overrides) -> dict:
    """A minimal CPU recipe dict for end-to-end tests."""
    recipe = {
        "name": "t",
        "output_dir": str(run_root),
        "model": {"path": str(model_path), "load_in_4bit": True, "dtype": "float32", "gradient_checkpointing": True},
        "lora": {"r": 8, "alpha": 16},
        "data": {"task": "count_shapes", "n_train": 16, "n_test": 4, "image_size": 56, "template": "structured"},
        "rollout": {"group_size": 2, "prompts_per_step": 2, "max_new_tokens": 12},
        "algorithm": {"name": "grpo"},
        "reward": {"weights": {"accuracy": 0.9, "format": 0.1, "test_length": 1.0}},
        "optim": {"lr": 1e-3},
        "train": {"steps": 3, "micro_batch_size": 2, "save_every": 2, "logprob_chunk": 16},
        "sft": {"steps": 0},
    }
    for dotted, value in overrides.items():
        node = recipe
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return recipe


WARM_SFT = {"sft__steps": 60, "sft__lr": 3e-3, "sft__batch_size": 16, "data__n_train": 256, "data__n_test": 16,
            "train__logprob_chunk": 256}


@pytest.fixture(scope="session")
def warm_qwen(tiny_qwen, tmp_path_factory):
    """The tiny test model after a short SFT warm-up (built once per session, ~20 s): it writes the
    structured format greedily and about 40 % of the time at T = 1, so responses carry real perception and
    reasoning roles and an RL run has something to learn. Shared by the learning and role tests."""
    from lite_srpo.config import config_from_dict
    from lite_srpo.rl.pipeline import ensure_warmup

    root = tmp_path_factory.mktemp("warm")
    recipe = tiny_recipe(tiny_qwen, root, name="warmup", reward__weights={"accuracy": 0.9, "format": 0.1},
                         **WARM_SFT)
    return Path(ensure_warmup(config_from_dict(recipe)).model.path)


# ------------------------------------------------------------------------------------------ shared checks


def tree_hash(path: Path) -> str:
    """One hash of every file's relative path and bytes under `path` (a checkpoint left untouched keeps it)."""
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + p.read_bytes())
    return h.hexdigest()


def assert_same(a, b, where: str = "") -> None:
    """Bitwise equality of nested state (tensors, dicts, lists, numbers)."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ------------------------------------------------------------------------------------------ CUDA stand-ins


class FakeCudaState:
    """A stand-in for the one thing this machine lacks, a node with GPUs: the CUDA calls `init_from_env` and
    `pick_device` make, over a real current-device state (set_device changes what current_device reads).
    Shared by tests/rl/test_distributed.py and tests/fake_cuda/, where emulated tensors follow it."""

    def __init__(self, count: int) -> None:
        self.count, self.current = count, 0

    def install(self, monkeypatch) -> None:
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "set_device", lambda i: setattr(self, "current", int(i)))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)


# ------------------------------------------------------------------------------------------ fake_cuda marker

REQUIRE_FAKE_CUDA = "LITE_SRPO_REQUIRE_FAKE_CUDA"
"""Set by `make test` (CI): the session fails unless fake_cuda tests ran and none was skipped, so that a
CPU-build venv, a deselection or a deleted directory cannot turn them into silent skips."""
_FAKE_CUDA_RUN = {"passed": 0, "skipped": 0, "failed": 0}


def pytest_collection_modifyitems(config, items):
    """fake_cuda tests skip, with the reason, on the CPU build of torch: it has no CUDA code to run."""
    import torch

    if torch.version.cuda is not None:
        return
    skip = pytest.mark.skip(reason=f"fake_cuda: torch {torch.__version__} is the CPU build (torch.version.cuda is "
                                   "None); these tests run the CUDA build's code paths: use .venv-cuda (make test)")
    for item in items:
        if "fake_cuda" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    if "fake_cuda" not in report.keywords:
        return
    if report.skipped:
        _FAKE_CUDA_RUN["skipped"] += 1
    elif report.failed:
        _FAKE_CUDA_RUN["failed"] += 1
    elif report.passed and report.when == "call":
        _FAKE_CUDA_RUN["passed"] += 1


def _fake_cuda_shortfall() -> str | None:
    if os.environ.get(REQUIRE_FAKE_CUDA) != "1":
        return None
    run = _FAKE_CUDA_RUN
    if run["passed"] == 0 or run["skipped"]:
        return (f"{REQUIRE_FAKE_CUDA}=1: {run['passed']} fake_cuda test(s) passed, {run['skipped']} skipped; CI needs "
                "them run (the CUDA build of torch in the test venv, tests/fake_cuda collected)")
    return None


def pytest_terminal_summary(terminalreporter):
    message = _fake_cuda_shortfall()
    if message:
        terminalreporter.write_line(message, red=True, bold=True)


def pytest_sessionfinish(session, exitstatus):
    if _fake_cuda_shortfall() and exitstatus == 0:  # 5 (nothing collected) stays 5: `make test` reports it
        session.exitstatus = 1
