"""Experiment trackers (`train.report_to`): a real 2-step tiny run mirrored to TensorBoard (read back with
EventAccumulator) and to wandb in offline mode (its run directory read back), plus the config errors."""
import json
import sys

import pytest

from conftest import tiny_recipe
from lite_srpo.config import config_from_dict
from lite_srpo.config.validate import tracker_problems
from lite_srpo.errors import ConfigError
from lite_srpo.rl.train import train
from lite_srpo.run.events import read_events
from lite_srpo.run.trackers import Trackers, numeric

USER_REWARD = "rw.py:brevity"


def test_report_to_is_checked_before_training(tmp_path, monkeypatch):
    assert tracker_problems([]) == [] and tracker_problems(["tensorboard"]) == []
    with pytest.raises(ConfigError) as err:
        config_from_dict(tiny_recipe("m", tmp_path, train__report_to=["tensorboard", "mlflow", "tensorboard"]))
    assert "train.report_to[1]: 'mlflow' is not one of tensorboard, wandb" in str(err.value)
    assert "train.report_to[2]: 'tensorboard' is listed twice" in str(err.value)
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python marks a module as not importable
    with pytest.raises(ConfigError, match=r"train.report_to\[0\]: 'wandb' needs the wandb package — pip install wandb"):
        config_from_dict(tiny_recipe("m", tmp_path, train__report_to=["wandb"]))


def test_numeric_keeps_finite_numbers_and_flattens():
    assert numeric({"a": 1, "b": float("nan"), "c": None, "d": True, "e": "x", "t": {"x": 0.5}}, "eval/") == {
        "eval/a": 1.0, "eval/t/x": 0.5}
    Trackers([]).log(1, {"a": 1.0})  # no backend: a no-op


def test_two_step_run_reaches_tensorboard_and_wandb(tiny_qwen, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for var, sub in (("WANDB_CONFIG_DIR", "wb_config"), ("WANDB_CACHE_DIR", "wb_cache"), ("WANDB_DATA_DIR", "wb_data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rw.py").write_text("def brevity(response, sample):\n    return 1.0 / (1 + len(response))\n")
    recipe = tiny_recipe(tiny_qwen, tmp_path / "runs", train__steps=2, train__eval_every=2, train__eval_samples=2,
                         train__report_to=["tensorboard", "wandb"],
                         reward__weights={"accuracy": 0.9, "format": 0.1, "test_length": 1.0, USER_REWARD: 0.1})
    run = train(config_from_dict(recipe), quiet=True)
    events = read_events(run.run_dir / "events.jsonl")
    metrics = [e for e in events if e["type"] == "metrics"]
    evals = [e for e in events if e["type"] == "eval"]
    assert len(metrics) == 2 and len(evals) == 1 and events[-1]["status"] == "finished"

    acc = EventAccumulator(str(run.run_dir / "tensorboard"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    user_key = f"reward/{USER_REWARD}/mean"
    for key in ("reward/mean", "loss/total", "accuracy", "time/step", user_key, f"reward/{USER_REWARD}/failures"):
        assert key in scalars, key
        points = acc.Scalars(key)
        assert [p.step for p in points] == [1, 2], key
        assert [p.value for p in points] == pytest.approx([m[key] for m in metrics], rel=1e-6), key
    eval_points = acc.Scalars("eval/accuracy")
    assert [(p.step, p.value) for p in eval_points] == [(2, pytest.approx(evals[0]["accuracy"]))]
    assert "eval/per_task/count_shapes" in scalars
    assert any(tag.startswith("recipe") for tag in acc.Tags()["tensors"])  # the recipe as text

    offline = list((run.run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert list(offline[0].glob("*.wandb")), "no wandb transaction log"
    history, config = _read_wandb_log(next(offline[0].glob("*.wandb")))
    assert sorted(history) == [1, 2]
    for step, m in zip((1, 2), metrics):
        assert history[step]["reward/mean"] == pytest.approx(m["reward/mean"])
        assert history[step][user_key] == pytest.approx(m[user_key])
    assert history[2]["eval/accuracy"] == pytest.approx(evals[0]["accuracy"])
    assert config["train"]["report_to"] == ["tensorboard", "wandb"] and config["data"]["task"] == "count_shapes"


def _read_wandb_log(path) -> tuple[dict[int, dict], dict]:
    """History per step and the run config from a `.wandb` transaction log (LevelDB log format: 32 KiB
    blocks of checksum/length/type-framed chunks holding protobuf Records). wandb has no reader of its own
    for offline runs any more, and offline mode writes no wandb-summary.json."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            records.append(pb.Record.FromString(buf))
            buf = b""
    history: dict[int, dict] = {}
    config: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(r.history.step.num, {}).update(items)
        elif r.WhichOneof("record_type") == "run":
            config = {i.key: json.loads(i.value_json) for i in r.run.config.update}
    config = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in config.items()}
    return history, config


def test_rerun_and_resume_leave_one_point_per_step(tiny_qwen, tmp_path):
    """A fresh run over an old one (overwrite) and a resume both purge TensorBoard points after their start."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def points(run_dir):
        acc = EventAccumulator(str(run_dir / "tensorboard"))
        acc.Reload()
        return [(p.step, p.value) for p in acc.Scalars("reward/mean")]

    recipe = tiny_recipe(tiny_qwen, tmp_path, train__steps=2, train__report_to=["tensorboard"])
    first = train(config_from_dict(recipe), quiet=True)
    again = train(config_from_dict(recipe), quiet=True, overwrite=True)
    steps = [e for e in read_events(again.run_dir / "events.jsonl") if e["type"] == "metrics"]
    assert points(again.run_dir) == [(m["step"], pytest.approx(m["reward/mean"])) for m in steps]
    resumed = train(config_from_dict(dict(recipe, train=dict(recipe["train"], steps=3))), quiet=True, resume=True)
    assert [s for s, _ in points(resumed.run_dir)] == [1, 2, 3] and first.run_dir == resumed.run_dir
