"""Reliability of the real training loop on a tiny 4-bit Qwen2.5-VL: kill -9 and signals against a
training subprocess, then exact resume; injected NaN/inf, out-of-memory and disk-full faults; too-long
prompts; pre-flight checks of the output directory; and the loaders that must not run code."""
import errno
import os
import random
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import assert_same, tiny_recipe, tree_hash
from lite_srpo.config import config_from_dict, load_config
from lite_srpo.errors import ConfigError, LiteSrpoError
from lite_srpo.rl import step_sampling  # the step's rollout calls generate from here
from lite_srpo.rl import train as train_mod
from lite_srpo.run import checkpoint as ckpt
from lite_srpo.run import preflight
from lite_srpo.run.checkpoint import checkpoint_dirs, latest_checkpoint, load_trainer_state, restore
from lite_srpo.run.events import read_events

ROOT = Path(__file__).resolve().parents[2]
VOLATILE = ("time/", "perf/", "mem/")  # wall-clock and memory metrics differ between runs by nature

# The training CLI, plus the test reward (the same function conftest registers in-process) and an
# optional pause: PAUSE_AT="<checkpoint function>:<n>" blocks before its n-th call and touches
# PAUSE_MARK, so the test can kill the process at an exact point of a save.
CHILD = """
import os, sys, time
from lite_srpo.run import checkpoint
from lite_srpo.rewards import builtin as rewards
from lite_srpo.cli import main

rewards.REWARD_FUNCTIONS["test_length"] = lambda response, sample, fmt: len(response) / 50.0
if os.environ.get("PAUSE_AT"):
    name, nth = os.environ["PAUSE_AT"].split(":")
    real, calls = getattr(checkpoint, name), []

    def paused(*args, **kwargs):
        calls.append(1)
        if len(calls) == int(nth):
            open(os.environ["PAUSE_MARK"], "w").close()
            time.sleep(600)
        return real(*args, **kwargs)

    setattr(checkpoint, name, paused)
sys.exit(main(sys.argv[1:]))
"""


# ---------------------------------------------------------------------------------------------------
# helpers


def metrics_of(run_dir: Path, since: float = 0.0) -> list[dict]:
    return [e for e in read_events(run_dir / "events.jsonl") if e["type"] == "metrics" and e["time"] >= since]


def adapter_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter" / "adapter_model.safetensors"))


def step_metrics(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in ("time",) and not k.startswith(VOLATILE)}


class Child:
    """`python CHILD train RECIPE ...` with its output in a log file (no pipe to fill up)."""

    def __init__(self, script: Path, recipe: Path, *args: str, log: Path, **env: str):
        self.log = log
        self.started = time.time()
        with open(log, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), "train", str(recipe), *args], cwd=ROOT, stdout=out,
                stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, condition, what: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"training exited (rc={self.proc.returncode}) before {what}:\n{self.output()[-3000:]}")
            if time.time() > deadline:
                pytest.fail(f"timed out waiting for {what}:\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"training did not exit within {timeout} s:\n{self.output()[-3000:]}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(30) == -signal.SIGKILL


@pytest.fixture
def children():
    started: list[Child] = []
    yield started
    for c in started:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait()


# ---------------------------------------------------------------------------------------------------
# 1-3. kill -9 at several points, SIGINT, a second signal; exact resume through all of it


def test_kill9_and_signals_then_resume_matches_an_uninterrupted_run(tiny_qwen, tmp_path, children):
    """One run is interrupted five ways and resumed each time; it must end bitwise equal (adapter,
    AdamW moments, LR schedule, RNG, every step's metrics) to a run that was never interrupted, and its
    event log must hold each step exactly once.

    1. kill -9 mid-save (adapter written, trainer state not);  2. kill -9 at a random moment after a
    step;  3. SIGTERM: finish the step, checkpoint, exit 0;  4. SIGINT then SIGTERM while a save is in
    progress: stop at once, previous checkpoint intact;  5. resume to the end.
    """
    from lite_srpo.model.policy import load_policy
    from lite_srpo.rl.optim import build_optimizer, build_scheduler

    script = tmp_path / "child.py"
    script.write_text(CHILD)
    steps = 16  # enough that the signals land mid-run on a fast machine (8 finished first there once)

    def recipe(root: Path) -> Path:
        data = tiny_recipe(tiny_qwen, root, train__steps=steps, train__save_every=1, train__keep_last=2,
                           rollout__max_new_tokens=8, optim__schedule="linear", optim__warmup_steps=1)
        path = root.with_suffix(".yaml")
        path.write_text(yaml.safe_dump(data))
        return path

    ref_recipe, run_recipe = recipe(tmp_path / "straight"), recipe(tmp_path / "interrupted")
    ref_dir, run_dir = tmp_path / "straight" / "t", tmp_path / "interrupted" / "t"
    # The uninterrupted reference trains alongside (a separate process, like the interrupted one).
    reference = Child(script, ref_recipe, "--quiet", log=tmp_path / "straight.log")
    children.append(reference)

    cfg = config_from_dict(yaml.safe_load(run_recipe.read_text()))
    fresh = load_policy(cfg.model, cfg.lora)  # never trained: every check restores into it from disk
    fresh_opt = build_optimizer(fresh.trainable_parameters(), cfg.optim, fresh.device)
    fresh_sched = build_scheduler(fresh_opt, cfg.optim, steps)

    def restorable() -> int:
        last = latest_checkpoint(run_dir)
        assert last is not None, "no loadable checkpoint left"
        state = restore(last, fresh.model, fresh_opt, fresh_sched)
        on_disk = adapter_of(last)
        in_model = {n: p for n, p in fresh.model.named_parameters() if p.requires_grad}
        assert len(on_disk) == len(in_model) > 0
        assert int(state["step"]) == int(last.name.split("_")[1])
        return int(state["step"])

    mark = tmp_path / "paused"

    # 1. kill -9 in the middle of the second save
    c = Child(script, run_recipe, log=tmp_path / "r1.log", PAUSE_AT="_write_state:2", PAUSE_MARK=str(mark))
    children.append(c)
    c.wait_for(mark.exists, "the second save to start")
    partial = list((run_dir / "checkpoints").glob(".tmp-step_000002-*"))
    assert len(partial) == 1 and (partial[0] / "adapter").is_dir() and not (partial[0] / "trainer_state.pt").exists()
    c.kill9()
    assert restorable() == 1

    # 2. kill -9 at a random moment after the first step of a resumed run
    delay = random.uniform(0.0, 0.5)
    c = Child(script, run_recipe, "--resume", log=tmp_path / "r2.log")
    children.append(c)
    c.wait_for(lambda: metrics_of(run_dir, c.started), "a resumed step")
    time.sleep(delay)
    c.kill9()
    # on an idle machine a tiny step takes well under the delay, so more steps may have completed
    got = restorable()
    assert 1 <= got <= int(metrics_of(run_dir)[-1]["step"]), f"delay {delay:.2f} s: checkpoint step {got}"

    # 3. SIGTERM: the step finishes, a checkpoint is written, exit 0 with a message
    c = Child(script, run_recipe, "--resume", log=tmp_path / "r3.log")
    children.append(c)
    c.wait_for(lambda: metrics_of(run_dir, c.started), "a resumed step")
    c.proc.send_signal(signal.SIGTERM)
    assert c.wait_exit() == 0, c.output()[-3000:]
    stopped = int(metrics_of(run_dir)[-1]["step"])
    assert "stop requested (SIGTERM)" in c.output() and f"stopped at step {stopped}" in c.output()
    status = [e for e in read_events(run_dir / "events.jsonl") if e["type"] == "status"][-1]
    assert status["status"] == "stopped" and status["step"] == stopped
    assert restorable() == stopped < steps
    assert [m["step"] for m in metrics_of(run_dir)] == list(range(1, stopped + 1))

    # 4. SIGINT, then SIGTERM while the next save is in progress: out at once, the last checkpoint intact
    before = latest_checkpoint(run_dir)
    before_hash = tree_hash(before)
    mark.unlink()
    c = Child(script, run_recipe, "--resume", log=tmp_path / "r4.log", PAUSE_AT="_write_state:1", PAUSE_MARK=str(mark))
    children.append(c)
    c.wait_for(mark.exists, "a save to start")
    c.proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert c.proc.poll() is None, "the first signal must let the step and its save finish"
    c.proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    assert c.wait_exit(timeout=60) != 0
    assert time.time() - t0 < 30, "the second signal must stop at once (the save was blocked for 600 s)"
    assert "stop requested (SIGINT)" in c.output()
    assert latest_checkpoint(run_dir) == before and tree_hash(before) == before_hash
    status = [e for e in read_events(run_dir / "events.jsonl") if e["type"] == "status"][-1]
    assert status["status"] == "stopped" and "interrupted" in status["message"]
    assert restorable() == stopped

    # 5. resume to the end
    c = Child(script, run_recipe, "--resume", "--quiet", log=tmp_path / "r5.log")
    children.append(c)
    assert c.wait_exit() == 0, c.output()[-3000:]
    assert reference.wait_exit() == 0, reference.output()[-3000:]

    events = read_events(run_dir / "events.jsonl")
    assert [e["step"] for e in events if e["type"] == "metrics"] == list(range(1, steps + 1))  # no gaps, no repeats
    assert events[-1]["status"] == "finished"
    assert sum(e.get("status") == "resumed" for e in events) == 4
    ref_metrics, run_metrics = metrics_of(ref_dir), metrics_of(run_dir)
    for a, b in zip(ref_metrics, run_metrics):
        assert step_metrics(a) == step_metrics(b), f"step {a['step']}"
    assert len({m["optim/lr"] for m in ref_metrics}) > 2  # the schedule moves, so resuming it is tested

    a_dir, b_dir = latest_checkpoint(ref_dir), latest_checkpoint(run_dir)
    assert a_dir.name == b_dir.name == f"step_{steps:06d}"
    assert [p.name for p in checkpoint_dirs(run_dir)] == [f"step_{s:06d}" for s in (steps - 1, steps)]  # keep_last=2
    assert_same(adapter_of(a_dir), adapter_of(b_dir), "adapter")
    a_state, b_state = load_trainer_state(a_dir), load_trainer_state(b_dir)
    assert a_state["optimizer"]["state"], "AdamW moments are saved"
    for key in ("optimizer", "scheduler", "rng", "step", "extra"):
        assert_same(a_state[key], b_state[key], key)


# ---------------------------------------------------------------------------------------------------
# 4. NaN / inf


def test_nonfinite_loss_or_gradient_skips_the_update_and_repeated_faults_stop_the_run(tiny_qwen, tmp_path, monkeypatch):
    """Injected faults: step 1 NaN loss in its second micro-batch (after the first one's backward),
    step 2 clean, step 3 NaN gradients under a finite loss, step 4 inf loss. With
    max_consecutive_nonfinite=2, steps 3-4 stop the run with a checkpoint holding step 2's weights."""
    cfg = config_from_dict(tiny_recipe(tiny_qwen, tmp_path, train__steps=6, train__save_every=1, train__keep_last=6,
                                       train__max_consecutive_nonfinite=2, rollout__max_new_tokens=8))
    faults = {1: "nan_loss_second_micro_batch", 3: "nan_grad", 4: "inf_loss"}
    now = {"step": 0, "calls": 0}
    real_update, real_loss = train_mod.policy_update, train_mod.grpo.policy_loss

    def update(run, batch, shaping, x, **kwargs):
        now["step"], now["calls"] = x.step, 0
        return real_update(run, batch, shaping, x, **kwargs)

    def loss(logp, *args, **kwargs):
        now["calls"] += 1
        value, metrics = real_loss(logp, *args, **kwargs)
        fault = faults.get(now["step"])
        if fault == "nan_loss_second_micro_batch" and now["calls"] == 2:
            value = value * float("nan")
        elif fault == "nan_grad":
            logp.register_hook(lambda g: g * float("nan"))
        elif fault == "inf_loss":
            value = value + float("inf")
        return value, metrics

    monkeypatch.setattr(train_mod, "policy_update", update)
    monkeypatch.setattr(train_mod.grpo, "policy_loss", loss)
    with pytest.raises(LiteSrpoError, match="2 consecutive non-finite updates") as err:
        train_mod.train(cfg, quiet=True)
    assert "before the fault" in str(err.value)

    events = read_events(cfg.run_dir / "events.jsonl")
    skipped = {e["step"]: e["update/skipped_nonfinite"] for e in events if e["type"] == "metrics"}
    assert skipped == {1: 1.0, 2: 0.0, 3: 1.0, 4: 1.0}  # the run stopped after step 4
    warned = [e["step"] for e in events if e["type"] == "warning" and "non-finite" in e["message"]]
    assert warned == [1, 3, 4]
    assert events[-1]["status"] == "crashed" and events[-1]["step"] == 4

    dirs = {p.name: p for p in checkpoint_dirs(cfg.run_dir)}
    assert sorted(dirs) == [f"step_{s:06d}" for s in (1, 2, 3, 4)]
    a1, a2, a3, a4 = (adapter_of(dirs[f"step_{s:06d}"]) for s in (1, 2, 3, 4))
    # peft starts lora_B at zero; a skipped step 1 leaves it there (the first micro-batch's gradient
    # was thrown away), the clean step 2 moves it, the faulty steps 3 and 4 leave step 2's weights.
    assert all(not v.any() for k, v in a1.items() if "lora_B" in k)
    assert any(v.any() for k, v in a2.items() if "lora_B" in k)
    assert_same(a3, a2, "step 3")
    assert_same(a4, a2, "step 4")
    s1, s2, s4 = (load_trainer_state(dirs[f"step_{s:06d}"]) for s in (1, 2, 4))
    assert s1["optimizer"]["state"] == {}  # no AdamW step was taken
    assert_same(s4["optimizer"]["state"], s2["optimizer"]["state"], "AdamW moments")
    assert float(next(iter(s4["optimizer"]["state"].values()))["step"]) == 1.0


# ---------------------------------------------------------------------------------------------------
# 5. out of memory


def oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_halves_micro_batch_then_generation_batch_and_gives_up_clearly(tiny_qwen, tmp_path, monkeypatch):
    """A CUDA OOM injected on CPU (torch.OutOfMemoryError is what CUDA raises) stands in for a GPU:
    the first in the rollout halves the micro-batch, the next in the update halves the generation
    batch, then the step succeeds with one update; at size 1 the run gives up naming what to lower."""
    cfg = config_from_dict(tiny_recipe(tiny_qwen, tmp_path, train__steps=1, train__save_every=1,
                                       rollout__max_new_tokens=8))
    real_generate, real_logprobs = step_sampling.generate, train_mod.rows_logprobs
    calls = {"generate": [], "logprobs": 0}

    def generate(*args, **kwargs):
        calls["generate"].append(kwargs.get("batch_prompts"))
        if len(calls["generate"]) == 1:
            raise oom()
        return real_generate(*args, **kwargs)

    def rows_logprobs(*args, **kwargs):
        calls["logprobs"] += 1
        if calls["logprobs"] == 1:
            raise oom()
        return real_logprobs(*args, **kwargs)

    monkeypatch.setattr(step_sampling, "generate", generate)
    monkeypatch.setattr(train_mod, "rows_logprobs", rows_logprobs)
    run = train_mod.train(cfg, quiet=True)

    assert calls["generate"] == [0, 0, 1]  # all prompts at once, again, then one prompt per call
    events = read_events(cfg.run_dir / "events.jsonl")
    warnings = [e["message"] for e in events if e["type"] == "warning"]
    assert warnings == ["out of memory: retrying with train.micro_batch_size -> 1",
                        "out of memory: retrying with rollout.generation_batch_size -> 1"]
    assert [e["step"] for e in events if e["type"] == "metrics"] == [1]
    state = load_trainer_state(latest_checkpoint(cfg.run_dir))
    # a resumed run keeps the smaller sizes (and needs the same number of processes)
    assert state["extra"] == {"micro_batch": 1, "generation_batch": 1, "generation_rows": 0, "world_size": 1}
    assert float(next(iter(state["optimizer"]["state"].values()))["step"]) == 1.0  # failed tries left no update

    # Out of memory at every size: micro-batch 2 -> 1, generation batch 2 -> 1, rows per call G -> ... -> 1,
    # then a clear error.
    attempts = []

    def always_oom(*args, **kwargs):
        attempts.append(1)
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB")  # the pre-2.5 torch form

    monkeypatch.setattr(step_sampling, "generate", always_oom)
    run.micro_batch, run.generation_batch = 2, 2
    with pytest.raises(LiteSrpoError) as err:
        train_mod.step_with_oom_retry(run, 2)
    assert len(attempts) == 3 + (cfg.rollout.group_size - 1).bit_length() and run.generation_rows == 1
    msg = str(err.value)
    assert "micro-batch 1" in msg and "rollout.max_new_tokens" in msg and "lite-srpo plan" in msg

    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(step_sampling, "generate", broken)
    run.micro_batch = 2
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # not an OOM: not retried
        train_mod.step_with_oom_retry(run, 2)
    assert run.micro_batch == 2


# ---------------------------------------------------------------------------------------------------
# 7. disk full, unwritable output dir


def test_disk_full_while_training_keeps_the_previous_checkpoint(tiny_qwen, tmp_path, monkeypatch):
    cfg = config_from_dict(tiny_recipe(tiny_qwen, tmp_path, train__steps=2, train__save_every=1,
                                       rollout__max_new_tokens=8))
    real = ckpt._write_state
    calls = []

    def write_state(path, state):
        calls.append(path)
        real(path, state)
        if len(calls) == 2:  # the second save: the file is written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_state", write_state)
    with pytest.raises(LiteSrpoError) as err:
        train_mod.train(cfg, quiet=True)
    msg = str(err.value)
    assert "No space left on device" in msg and "train.keep_last" in msg and "step_000001" in msg
    assert [p.name for p in (cfg.run_dir / "checkpoints").iterdir()] == ["step_000001"]
    last = latest_checkpoint(cfg.run_dir)
    assert load_trainer_state(last)["step"] == 1

    # The pre-flight estimate bounds the real checkpoint: fp32 adapter + two fp32 AdamW moments (12 B
    # per parameter) + 1 MiB of fixed files, and it is not wildly above it.
    params = sum(t.numel() for t in adapter_of(last).values())
    actual = sum(p.stat().st_size for p in last.rglob("*") if p.is_file())
    estimate = preflight.checkpoint_bytes(params, "adamw")
    assert actual <= estimate <= actual + 2 * 2**20, (actual, estimate)


def test_output_dir_that_cannot_exist_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(LiteSrpoError) as err:
        preflight.check_output_dir(blocker / "runs" / "t")
    assert str(blocker) in str(err.value) and "not a directory" in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits; see the read-only test")
def test_read_only_output_dir_is_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(LiteSrpoError, match="writable"):
            preflight.check_output_dir(ro / "t")
    finally:
        ro.chmod(0o700)


def test_write_probe_failure_names_the_directory_and_fix(tmp_path, monkeypatch):
    """Root ignores chmod, so a read-only mount is simulated where the probe file is fsynced."""
    def read_only(fd):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(preflight.os, "fsync", read_only)
    with pytest.raises(LiteSrpoError) as err:
        preflight.check_output_dir(tmp_path / "runs" / "t")
    assert str(tmp_path / "runs" / "t") in str(err.value) and "Read-only file system" in str(err.value)
    assert "writable" in str(err.value)
    assert not list((tmp_path / "runs" / "t").iterdir())  # the probe file was removed


Usage = namedtuple("Usage", "total used free")


def test_disk_space_check_counts_kept_checkpoints(tmp_path, monkeypatch):
    # 1,000,000 fp32 LoRA params with AdamW: 1e6 * (4 + 8) + 1 MiB = 13,048,576 B per checkpoint;
    # keep_last=3 -> 4 at the peak = 52,194,304 B = 49.8 MiB.
    per = preflight.checkpoint_bytes(1_000_000, "adamw")
    assert per == 13_048_576
    assert preflight.checkpoint_bytes(1_000_000, "paged_adamw8bit") == 1_000_000 * 6 + 2**20
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: Usage(10**12, 0, 40 * 2**20))
    with pytest.raises(LiteSrpoError) as err:
        preflight.check_disk_space(tmp_path / "t", per, keep_last=3)
    msg = str(err.value)
    assert "40.0 MiB free" in msg and "49.8 MiB" in msg and "train.keep_last=3" in msg and str(tmp_path / "t") in msg
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: Usage(10**12, 0, 50 * 2**20))
    assert preflight.check_disk_space(tmp_path / "t", per, keep_last=3) == 4 * per
    # two checkpoints already on disk (a resumed run): only 3 + 1 - 2 = 2 more are needed
    for step in (1, 2):
        d = tmp_path / "t" / "checkpoints" / f"step_{step:06d}"
        (d / "adapter").mkdir(parents=True)
        (d / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
        (d / "trainer_state.pt").write_bytes(b"x")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: Usage(10**12, 0, 30 * 2**20))
    assert preflight.check_disk_space(tmp_path / "t", per, keep_last=3) == 2 * per


def test_train_refuses_an_unwritable_output_dir_before_loading_the_model(tiny_qwen, tmp_path, monkeypatch):
    """Needs `preflight.check_output_dir(run_dir)` at the top of `train.setup` (lead's file)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = config_from_dict(tiny_recipe(tiny_qwen, blocker / "runs"))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output directory was checked")

    monkeypatch.setattr(train_mod, "load_policy", no_model)
    with pytest.raises(LiteSrpoError, match="not a directory"):
        train_mod.train(cfg, quiet=True)


def test_train_refuses_to_start_without_room_for_checkpoints(tiny_qwen, tmp_path, monkeypatch):
    """Needs `preflight.check_disk_space(...)` in `train.setup` once the adapter size is known (lead's file)."""
    cfg = config_from_dict(tiny_recipe(tiny_qwen, tmp_path, train__steps=1))

    def no_step(*args, **kwargs):
        raise AssertionError("training started although the disk cannot hold its checkpoints")

    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: Usage(10**12, 10**12, 1024))
    monkeypatch.setattr(train_mod, "rl_step", no_step)
    with pytest.raises(LiteSrpoError, match="train.keep_last"):
        train_mod.train(cfg, quiet=True)


# ---------------------------------------------------------------------------------------------------
# 3 (CLI side). A second signal raises KeyboardInterrupt out of the loop


def test_cli_turns_an_immediate_stop_into_a_message_and_exit_130(tiny_qwen, tmp_path, monkeypatch, capsys):
    """Needs `except KeyboardInterrupt` in `cli.main` (lead's file): no traceback, exit 128 + SIGINT."""
    from lite_srpo import cli
    from lite_srpo.rl import pipeline

    recipe = tiny_recipe(tiny_qwen, tmp_path)
    recipe.pop("reward")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("second signal: stopping now; the last checkpoint is intact")

    monkeypatch.setattr(pipeline, "run_training", interrupted)
    try:
        rc = cli.main(["train", str(path)])
    except KeyboardInterrupt:
        pytest.fail("cli.main let KeyboardInterrupt escape (a traceback for the user)")
    assert rc == 130
    assert "checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# 6. prompts too long for data.max_prompt_length


def test_too_long_prompts_are_skipped_with_a_warning_and_never_cut(tiny_qwen, tmp_path, monkeypatch, caplog):
    from lite_srpo.data.tasks.base import Sample
    from lite_srpo.rl.rollout import encode_prompt

    cfg = config_from_dict(tiny_recipe(tiny_qwen, tmp_path, train__steps=1, data__max_prompt_length=8))
    run = train_mod.setup(cfg)
    short = run.train_set[0]
    wordy = Sample(images=short.images, question=short.question + " Count every shape carefully." * 10,
                   answer=short.answer, source="wordy.jsonl:7", task=short.task)
    short_enc, wordy_enc = (encode_prompt(run.policy, s, cfg.data.template, run.fmt) for s in (short, wordy))
    assert wordy_enc.length > short_enc.length > 8

    # The limit at the short prompt's length: it passes whole, the wordy one is skipped with a warning.
    cfg.data.max_prompt_length = short_enc.length
    with caplog.at_level("WARNING", logger="lite_srpo.rl.train"):
        kept = train_mod.encode_prompts(run, [wordy, short])
    assert len(kept) == 1 and torch.equal(kept[0].input_ids, short_enc.input_ids)
    assert f"skipping wordy.jsonl:7: prompt is {wordy_enc.length} tokens" in caplog.text
    assert "image tokens are never cut" in caplog.text
    merge = run.policy.processor.image_processor.merge_size
    image_tokens = int((kept[0].input_ids == run.policy.image_token_id()).sum())
    # Qwen2.5-VL: one token per merge x merge patch block; 56 px / 14 px patches = 4 x 4 -> 4 tokens
    assert image_tokens == int(kept[0].visual["image_grid_thw"].prod(-1).sum()) // merge**2 == 4

    # Through train: every prompt of the step too long -> a clear error before any rollout.
    cfg.data.max_prompt_length = 8
    generated = []
    monkeypatch.setattr(step_sampling, "generate", lambda *a, **k: generated.append(1))
    caplog.clear()
    with caplog.at_level("WARNING", logger="lite_srpo.rl.train"):
        with pytest.raises(LiteSrpoError, match="data.max_prompt_length=8"):
            train_mod.train(cfg, run=run, quiet=True)
    assert not generated
    assert caplog.text.count("image tokens are never cut") == cfg.rollout.prompts_per_step
    assert not checkpoint_dirs(cfg.run_dir)


# ---------------------------------------------------------------------------------------------------
# 8. safety of what is loaded


def test_trust_remote_code_is_off_unless_the_recipe_turns_it_on(tiny_qwen, tmp_path, monkeypatch):
    import transformers

    from lite_srpo.model import policy as modeling

    seen = []
    real_config = transformers.AutoConfig.from_pretrained

    class Stop(Exception):
        pass

    class FakeModel:
        @staticmethod
        def from_pretrained(path, **kwargs):
            seen.append(("model", kwargs.get("trust_remote_code")))
            raise Stop

    def config(path, **kwargs):
        seen.append(("config", kwargs.get("trust_remote_code")))
        return real_config(path, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", config)
    monkeypatch.setattr(modeling, "_auto_model_class", lambda: FakeModel)
    default = config_from_dict(tiny_recipe(tiny_qwen, tmp_path))
    assert default.model.trust_remote_code is False
    with pytest.raises(Stop):
        modeling.load_base(default.model, torch.device("cpu"))
    assert seen == [("config", False), ("model", False)]

    seen.clear()
    opted_in = config_from_dict(tiny_recipe(tiny_qwen, tmp_path, model__trust_remote_code=True))
    with pytest.raises(Stop):
        modeling.load_base(opted_in.model, torch.device("cpu"))
    assert seen == [("config", True), ("model", True)]


def test_recipe_yaml_cannot_construct_python_objects(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    assert not marker.exists()
