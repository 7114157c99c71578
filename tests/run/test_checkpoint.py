"""Checkpoint files on a tiny LoRA model (no VLM): exact round trip, pruning, a simulated kill at every
phase of a save, disk-full errors, and refusal of pickled objects."""
import copy
import errno
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from lite_srpo.errors import LiteSrpoError
from lite_srpo.run import checkpoint as ckpt
from lite_srpo.run.checkpoint import (OPTIMIZER_KEY, SCHEDULER_KEY, STATE_FILE, STEP_KEY, checkpoint_dirs,
                                      latest_checkpoint, load_trainer_state, restore, save_checkpoint)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 8)
        self.b = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Trainer:
    """A LoRA model, AdamW and a decaying LambdaLR: the objects `save_checkpoint` stores."""

    def __init__(self, seed: int):
        torch.manual_seed(0)
        base = Tiny()  # the frozen base is the same every time, as when loaded from disk
        torch.manual_seed(seed)
        self.model = get_peft_model(base, LoraConfig(r=2, target_modules=["a", "b"], init_lora_weights=False))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=0.1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0 / (1 + s))

    def step(self) -> None:
        x = torch.randn(3, 4)  # draws from the global RNG, like rollout sampling does
        self.optimizer.zero_grad()
        self.model(x).pow(2).sum().backward()
        self.optimizer.step()
        self.scheduler.step()

    def adapter(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def save(self, run_dir: Path, step: int, keep_last: int = 3) -> Path:
        return save_checkpoint(run_dir, step, self.model, self.optimizer, self.scheduler, "name: t\n",
                               metrics={"loss": 1.0}, extra={"micro_batch": 2}, keep_last=keep_last)


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def files_of(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_round_trip_restores_adapter_optimizer_scheduler_and_every_rng(tmp_path):
    t = Trainer(seed=0)
    t.step()
    t.step()
    path = t.save(tmp_path, 2)
    adapter2, opt_state = t.adapter(), copy.deepcopy(t.optimizer.state_dict())  # live tensors move on
    np_draw, py_draw = np.random.rand(3), random.random()  # numpy / python RNGs right after the save
    t.step()  # draws its input from the torch RNG right after the save
    adapter3 = t.adapter()

    fresh = Trainer(seed=1)  # different initial adapter
    assert not same_tensors(fresh.adapter(), adapter2)
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    state = restore(path, fresh.model, fresh.optimizer, fresh.scheduler)
    assert state[STEP_KEY] == 2 and state["extra"] == {"micro_batch": 2}
    assert same_tensors(fresh.adapter(), adapter2)
    restored = fresh.optimizer.state_dict()
    for i, s in opt_state["state"].items():
        assert torch.equal(restored["state"][i]["exp_avg"], s["exp_avg"])
        assert torch.equal(restored["state"][i]["exp_avg_sq"], s["exp_avg_sq"])
        assert float(restored["state"][i]["step"]) == 2.0
    # LambdaLR 1/(1+s) after two scheduler steps: lr = 0.1 / 3
    assert fresh.scheduler.last_epoch == 2 and fresh.scheduler.get_last_lr()[0] == pytest.approx(0.1 / 3)
    assert np.array_equal(np.random.rand(3), np_draw) and random.random() == py_draw
    # The third step from the restored state (same input draw, moments, lr) is bitwise the original's.
    fresh.step()
    assert same_tensors(fresh.adapter(), adapter3)
    assert not same_tensors(adapter3, adapter2)


def test_keep_last_prunes_oldest_and_leaves_no_temporaries(tmp_path):
    t = Trainer(seed=0)
    for step in range(1, 6):
        t.step()
        t.save(tmp_path, step, keep_last=2)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_000004", "step_000005"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000004", "step_000005"]
    assert latest_checkpoint(tmp_path).name == "step_000005"


def test_incomplete_and_temporary_directories_are_not_checkpoints(tmp_path):
    t = Trainer(seed=0)
    t.save(tmp_path, 1)
    root = tmp_path / "checkpoints"
    (root / "step_000009").mkdir()  # no files at all
    half = root / "step_000008"
    (half / "adapter").mkdir(parents=True)
    (half / STATE_FILE).write_bytes(b"x")  # state but no adapter weights
    (root / ".tmp-step_000010-1").mkdir()
    (root / "notes").mkdir()
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_000001"]


class Killed(BaseException):
    """Stands in for kill -9: no `except Exception`/`except OSError` cleanup runs."""


def kill_in(monkeypatch, name: str, partial=None):
    """Make `checkpoint.<name>` die on its next call, optionally after doing part of its work."""
    def die(*args, **kwargs):
        if partial is not None:
            partial(*args, **kwargs)
        raise Killed(name)
    monkeypatch.setattr(ckpt, name, die)


def write_half_state(path, state):
    torch.save(state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def delete_adapter_only(path):
    shutil.rmtree(path / "adapter")


# (function that dies, what it did first, checkpoints listed afterwards)
PHASES = [
    ("_write_adapter", None, [1]),             # temporary dir created, nothing in it
    ("_write_state", write_half_state, [1]),   # adapter written, trainer state half-written
    ("_fsync_tree", None, [1]),                # every file written, not yet durable
    ("_publish", None, [1]),                   # complete and fsynced, not renamed
    ("_prune", None, [1, 2]),                  # renamed into place, the older one not pruned yet
    ("_remove_tree", delete_adapter_only, [2]),  # the older one renamed to .del- and half deleted
]


@pytest.mark.parametrize("name,partial,listed", PHASES, ids=[p[0] for p in PHASES])
def test_kill_at_any_phase_of_a_save_leaves_a_loadable_checkpoint(tmp_path, monkeypatch, name, partial, listed):
    t = Trainer(seed=0)
    t.step()
    t.save(tmp_path, 1, keep_last=1)
    step1 = files_of(tmp_path / "checkpoints" / "step_000001")
    t.step()
    adapter2 = t.adapter()
    kill_in(monkeypatch, name, partial)
    with pytest.raises(Killed):
        t.save(tmp_path, 2, keep_last=1)
    monkeypatch.undo()

    assert [p.name for p in checkpoint_dirs(tmp_path)] == [f"step_{s:06d}" for s in listed]
    last, latest = latest_checkpoint(tmp_path), listed[-1]
    fresh = Trainer(seed=5)
    assert restore(last, fresh.model, fresh.optimizer, fresh.scheduler)[STEP_KEY] == latest
    if latest == 1:
        assert files_of(last) == step1  # the previous checkpoint is byte-for-byte untouched
    else:
        assert same_tensors(fresh.adapter(), adapter2)

    # The next save cleans every leftover (.tmp-, .del-) and prunes to keep_last.
    t.step()
    t.save(tmp_path, 3, keep_last=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000003"]


def test_resave_killed_between_the_two_renames_keeps_the_step(tmp_path, monkeypatch):
    """Re-saving an existing step renames old -> .old-, then new -> step_N; a kill in between must not
    lose step N: it is listed under its .old- name and the next save puts it back."""
    t = Trainer(seed=0)
    t.step()
    t.save(tmp_path, 1)
    t.step()
    first = t.save(tmp_path, 2)
    before = files_of(first)
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # the second rename of the swap: new copy -> step_000002
            raise Killed("between renames")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", rename)
    with pytest.raises(Killed):
        t.save(tmp_path, 2)
    monkeypatch.undo()
    assert calls[0][0] == "step_000002" and calls[0][1].startswith(".old-step_000002-")
    assert not first.exists()
    last = latest_checkpoint(tmp_path)
    assert last.name.startswith(".old-step_000002-") and files_of(last) == before
    assert load_trainer_state(last)[STEP_KEY] == 2

    t.step()
    t.save(tmp_path, 3)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step_000001", "step_000002", "step_000003"]
    assert files_of(tmp_path / "checkpoints" / "step_000002") == before
    assert not list((tmp_path / "checkpoints").glob(".*"))


@pytest.mark.parametrize("where", ["_write_adapter", "_write_state", "_fsync_tree"])
def test_disk_full_mid_save_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    t = Trainer(seed=0)
    t.step()
    t.save(tmp_path, 1)
    before = files_of(tmp_path / "checkpoints" / "step_000001")
    real = getattr(ckpt, where)

    def full(*args, **kwargs):
        real(*args, **kwargs)  # part of the data reached the disk, then the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, where, full)
    t.step()
    with pytest.raises(LiteSrpoError) as err:
        t.save(tmp_path, 2)
    msg = str(err.value)
    assert "No space left on device" in msg and "ENOSPC" in msg and "train.keep_last" in msg
    assert str(tmp_path / "checkpoints") in msg and "step_000001" in msg
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]  # partial copy removed
    assert files_of(tmp_path / "checkpoints" / "step_000001") == before
    assert load_trainer_state(latest_checkpoint(tmp_path))[STEP_KEY] == 1


def test_permission_error_mid_save_names_the_fix(tmp_path, monkeypatch):
    t = Trainer(seed=0)

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(ckpt, "_write_adapter", denied)
    with pytest.raises(LiteSrpoError, match="writable") as err:
        t.save(tmp_path, 1)
    assert "no earlier checkpoint exists" in str(err.value)


class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_trainer_state_with_a_pickled_object_is_refused(tmp_path):
    t = Trainer(seed=0)
    t.step()
    path = t.save(tmp_path, 1)
    marker = tmp_path / "code-ran"
    state = torch.load(path / STATE_FILE, weights_only=True)
    state["extra"] = {"evil": Payload(marker)}
    torch.save(state, path / STATE_FILE)
    assert not marker.exists()

    fresh = Trainer(seed=3)
    weights_before = fresh.adapter()
    with pytest.raises(LiteSrpoError, match="refused to load"):
        load_trainer_state(path)
    with pytest.raises(LiteSrpoError, match="refused to load"):
        restore(path, fresh.model, fresh.optimizer, fresh.scheduler)
    assert not marker.exists()
    assert same_tensors(fresh.adapter(), weights_before)  # nothing half-restored
    torch.load(path / STATE_FILE, weights_only=False)  # the control: an unsafe load would have run it
    assert marker.exists()


def test_truncated_or_foreign_trainer_state_is_a_clear_error(tmp_path):
    t = Trainer(seed=0)
    path = t.save(tmp_path, 1)
    data = (path / STATE_FILE).read_bytes()
    (path / STATE_FILE).write_bytes(data[: len(data) // 3])
    with pytest.raises(LiteSrpoError, match="unreadable or truncated"):
        load_trainer_state(path)
    torch.save({"weights": torch.zeros(2)}, path / STATE_FILE)
    with pytest.raises(LiteSrpoError, match="not a lite-srpo trainer state"):
        load_trainer_state(path)
    with pytest.raises(LiteSrpoError, match="not a checkpoint"):
        load_trainer_state(tmp_path)


def test_saved_state_holds_optimizer_and_scheduler_under_their_keys(tmp_path):
    t = Trainer(seed=0)
    t.step()
    state = load_trainer_state(t.save(tmp_path, 7))
    assert state[STEP_KEY] == 7
    assert state[SCHEDULER_KEY]["last_epoch"] == 1
    assert len(state[OPTIMIZER_KEY]["state"]) == len(t.params)
