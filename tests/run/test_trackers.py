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


def offline_wandb(monkeypatch, tmp_path) -> None:
    """wandb offline, its config, cache and staging (artifacts: tables and their images) under tmp_path."""
    for var, sub in (("WANDB_CONFIG_DIR", "wb_config"), ("WANDB_CACHE_DIR", "wb_cache"), ("WANDB_DATA_DIR", "wb_data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)


WEIGHTS = {"accuracy": 0.9, "format": 0.1, "test_length": 1.0, USER_REWARD: 0.1}


def test_two_step_run_reaches_tensorboard_and_wandb(tiny_qwen, tmp_path, monkeypatch):
    """Metrics, evals and the recipe in both trackers; at step 2 the completions table (SRPO, so it has
    weights per role; see `check_completions`)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    offline_wandb(monkeypatch, tmp_path)
    (tmp_path / "rw.py").write_text("def brevity(response, sample):\n    return 1.0 / (1 + len(response))\n")
    recipe = tiny_recipe(tiny_qwen, tmp_path / "runs", algorithm__name="srpo", algorithm__dynamic_sampling=False,
                         train__steps=2, train__eval_every=2, train__eval_samples=2, train__tokens_every=2,
                         train__log_completions_every=2, train__report_to=["tensorboard", "wandb"],
                         reward__weights=WEIGHTS)
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
    check_completions(run.run_dir, events)


def _wandb_records(path) -> list:
    """The protobuf Records of a `.wandb` transaction log (LevelDB log format: 32 KiB blocks of
    checksum/length/type-framed chunks). wandb has no reader of its own for offline runs any more."""
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
    return records


def _read_wandb_log(path) -> tuple[dict[int, dict], dict]:
    """History per step and the run config from a `.wandb` file (offline mode writes no wandb-summary.json)."""
    history: dict[int, dict] = {}
    config: dict = {}
    for r in _wandb_records(path):
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(r.history.step.num, {}).update(items)
        elif r.WhichOneof("record_type") == "run":
            config = {i.key: json.loads(i.value_json) for i in r.run.config.update}
    config = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in config.items()}
    return history, config


def wait_for_next_second() -> None:
    """Sleep until the wall clock's whole second changes (wandb's offline folder names have second resolution)."""
    import time

    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.02)


def test_rerun_and_resume_continue_one_series(tiny_qwen, tmp_path, monkeypatch):
    """A fresh run over an old one (overwrite) starts new series: TensorBoard purges its points, wandb gets a
    new run. A resume continues them: TensorBoard purges the points after the checkpoint, wandb continues the
    same run id. A crash after step 3 was logged but before its checkpoint re-runs step 3 on resume: one
    point per step in TensorBoard, and wandb is sent each step once over the three processes."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lite_srpo.run.trackers import read_wandb_state

    def points(run_dir):
        acc = EventAccumulator(str(run_dir / "tensorboard"))
        acc.Reload()
        return [(p.step, p.value) for p in acc.Scalars("reward/mean")]

    offline_wandb(monkeypatch, tmp_path)
    recipe = tiny_recipe(tiny_qwen, tmp_path, train__steps=2, train__report_to=["tensorboard", "wandb"])
    first = train(config_from_dict(recipe), quiet=True)
    first_id = read_wandb_state(first.run_dir)["id"]
    again = train(config_from_dict(recipe), quiet=True, overwrite=True)
    run_id = read_wandb_state(again.run_dir)["id"]
    assert run_id != first_id
    steps = [e for e in read_events(again.run_dir / "events.jsonl") if e["type"] == "metrics"]
    assert points(again.run_dir) == [(m["step"], pytest.approx(m["reward/mean"])) for m in steps]
    with_steps = lambda n: config_from_dict(dict(recipe, train=dict(recipe["train"], steps=n)))  # noqa: E731
    # wandb names an offline run's folder by its start time to the second and the run id, so two processes of
    # one run id started within a second share a folder and the later overwrites the earlier's log (seen on a
    # fast machine). A real resume follows a crash and a restart; here each process waits for a new second.
    wait_for_next_second()
    resumed = train(with_steps(3), quiet=True, resume=True)
    assert [s for s, _ in points(resumed.run_dir)] == [1, 2, 3] and first.run_dir == resumed.run_dir
    assert read_wandb_state(first.run_dir) == {"id": run_id, "last_step": 3}

    shutil.rmtree(first.run_dir / "checkpoints" / "step_000003")  # as if killed before step 3's checkpoint
    wait_for_next_second()
    train(with_steps(4), quiet=True, resume=True)
    metrics = [e for e in read_events(first.run_dir / "events.jsonl") if e["type"] == "metrics"]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert points(first.run_dir) == [(m["step"], pytest.approx(m["reward/mean"])) for m in metrics]
    runs = sorted((first.run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    logged = []
    for r in runs:
        records = _wandb_records(next(r.glob("*.wandb")))
        assert {x.run.run_id for x in records if x.WhichOneof("record_type") == "run"} == {run_id}
        logged.append(sorted(_read_wandb_log(next(r.glob("*.wandb")))[0]))
    assert logged == [[1, 2], [3], [4]]
    assert len(list((first.run_dir / "wandb").glob("offline-run-*"))) == 4  # and the overwritten run's own


def _wandb_tables(offline_dir) -> dict[int, tuple[dict, dict]]:
    """step -> (the logged table's json, its files by artifact path), read from the run's `.wandb` log and
    the artifact staging files it points to (offline runs keep them until `wandb sync`)."""
    records = _wandb_records(next(offline_dir.glob("*.wandb")))
    artifacts = {r.artifact.client_id: {c.path: c.local_path for c in r.artifact.manifest.contents}
                 for r in records if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "run_table"}
    history, _ = _read_wandb_log(next(offline_dir.glob("*.wandb")))
    out = {}
    for step, items in history.items():
        if items.get("completions/_type") == "table-file":
            client_id = items["completions/artifact_path"].split("://", 1)[1].split("/", 1)[0]
            files = artifacts[client_id]
            with open(files["completions.table.json"], encoding="utf-8") as f:
                out[step] = (json.load(f), files)
    return out


def check_completions(run_dir, events) -> None:
    """The SRPO run's table, 2 prompts x 2 samples at step 2 only, read back from both trackers: the same
    rows; the image and text of the tokens event; reward parts adding up to the reward; the group advantage
    of those rewards; the mean SRPO weight per role of the tokens event's weights."""
    import io

    import numpy as np
    import torch
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lite_srpo.rl.objectives import grpo
    from lite_srpo.run.trackers import markdown_table

    tokens = next(e for e in events if e["type"] == "tokens")
    assert tokens["step"] == 2

    tables = _wandb_tables(next((run_dir / "wandb").glob("offline-run-*")))
    assert list(tables) == [2]
    table, files = tables[2]
    columns = table["columns"]
    assert columns == ["prompt", "sample", "image", "question", "answer", "response", "reward", "reward/accuracy",
                       "reward/format", "reward/test_length", f"reward/{USER_REWARD}", "reward/overlong", "advantage",
                       "weight/perception", "weight/reasoning"]
    rows = [dict(zip(columns, r)) for r in table["data"]]
    assert [(r["prompt"], r["sample"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    rewards = torch.tensor([r["reward"] for r in rows])
    assert [r["advantage"] for r in rows] == pytest.approx(grpo.group_advantages(rewards, 2).tolist(), abs=1e-4)
    for r in rows:
        parts = sum(w * r[f"reward/{name}"] for name, w in WEIGHTS.items())
        assert r["reward"] == pytest.approx(parts + r["reward/overlong"], abs=1e-4)
    assert len(tokens["samples"]) == len(rows)  # the tokens event records the step's first responses, prompt by prompt
    for record, row in zip(tokens["samples"], rows):
        plain = row["response"]
        for mark in ("[P]", "[/P]", "[R]", "[/R]"):
            plain = plain.replace(mark, "")
        assert plain.startswith(record["response"]) and row["question"] == record["question"]
        assert row["reward"] == pytest.approx(record["reward"], abs=1e-4)
        expected = np.asarray(Image.open(run_dir / record["image"]).convert("RGB"))
        assert row["image"]["_type"] == "image-file"
        assert np.array_equal(np.asarray(Image.open(files[row["image"]["path"]]).convert("RGB")), expected)
        weights = [t["weight"] for t in record["tokens"]]
        roles = [t["role"] for t in record["tokens"]]
        for role, key in ((1, "weight/perception"), (2, "weight/reasoning")):
            mine = [w for w, r in zip(weights, roles) if r == role]
            assert row[key] == (pytest.approx(sum(mine) / len(mine), abs=1e-4) if mine else None)

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    texts = acc.Tensors("completions/text_summary")
    assert [t.step for t in texts] == [2]
    markdown = texts[0].tensor_proto.string_val[0].decode()
    lines = markdown.splitlines()
    assert len(lines) == 2 + 4 and lines[0].startswith("| prompt | sample | image | question | answer | response |")
    assert markdown == markdown_table([dict(r, image=r["image"] and "x") for r in rows])  # the same rows as wandb
    firsts = {}  # each prompt's first recorded response (the tokens event has a whole group per prompt)
    for record, row in zip(tokens["samples"], rows):
        firsts.setdefault(row["prompt"], record)
    for prompt, record in firsts.items():
        images = acc.Images(f"completions/prompt_{prompt}")
        assert [i.step for i in images] == [2]
        got = np.asarray(Image.open(io.BytesIO(images[0].encoded_image_string)).convert("RGB"))
        assert np.array_equal(got, np.asarray(Image.open(run_dir / record["image"]).convert("RGB")))
