"""User reward functions (`file.py:fn`, `pkg.mod:fn`): loading and checks at config time, the worker pool
with per-call timeouts (hung workers killed and replaced), and real tiny-model training runs whose reward
hangs, raises or returns NaN on half the calls, or fails on every call."""
import json
import math
import multiprocessing as mp
import os
import signal
import textwrap
import time

import pytest

from conftest import tiny_recipe
from lite_srpo.config import RewardConfig, config_from_dict
from lite_srpo.config.user_rewards import RewardLoadError, parse_reward_ref
from lite_srpo.data.prompts import ResponseFormat
from lite_srpo.data.tasks import make_task
from lite_srpo.data.tasks.base import Sample
from lite_srpo.errors import ConfigError, LiteSrpoError
from lite_srpo.rewards.pool import RewardPool
from lite_srpo.rewards.runner import Rewarder, RewardFailureError
from lite_srpo.rl.train import prompts_for_step, train
from lite_srpo.run.events import read_events

REWARDS = textwrap.dedent('''
    import json, math, time
    from pathlib import Path

    FAIL = set(json.loads((Path(__file__).parent / "fail.json").read_text()))

    def two_args(response, sample):
        return len(response) / 50.0

    def three_args(response, sample, fmt):
        return 1.0

    def by_text(response, sample):
        if response == "hang":
            time.sleep(10_000)
        if response == "boom":
            raise RuntimeError("boom " + sample.source)
        if response == "nan":
            return math.nan
        if response == "text":
            return "1.0"
        return float(len(response))

    def _fails(sample):
        return sample.source in FAIL

    def hangs(response, sample):
        if _fails(sample):
            time.sleep(10_000)
        return len(response) / 50.0

    def raises(response, sample):
        if _fails(sample):
            raise ValueError("bad sample " + sample.source)
        return len(response) / 50.0

    def nan(response, sample):
        return math.nan if _fails(sample) else len(response) / 50.0

    def always(response, sample):
        raise RuntimeError("always broken")
''')


@pytest.fixture
def reward_dir(tmp_path, monkeypatch):
    """A user reward file and an importable package, with the working directory next to them."""
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    (tmp_path / "fail.json").write_text("[]")
    pkg = tmp_path / "site" / "userpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "scores.py").write_text("def const(response, sample):\n    return 0.25\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return tmp_path


def _sample(source: str = "s:row 1") -> Sample:
    return Sample(images=[], question="q", answer="1", source=source)


def _recipe_errors(model_path, run_root, weights: dict) -> str:
    with pytest.raises(ConfigError) as err:
        config_from_dict(tiny_recipe(model_path, run_root, reward__weights=weights))
    return str(err.value)


def test_parse_reward_ref_forms(reward_dir):
    ref = parse_reward_ref("my_rewards.py:two_args")
    assert ref.is_file and ref.target == str(reward_dir / "my_rewards.py") and ref.function == "two_args"
    ref = parse_reward_ref("userpkg.scores:const")
    assert not ref.is_file and ref.target == "userpkg.scores"
    for bad in ("my_rewards.py:", ":fn", "my_rewards.py:not-a-name", "not a module:fn"):
        with pytest.raises(RewardLoadError):
            parse_reward_ref(bad)


def test_config_checks_user_rewards_before_training(reward_dir, tmp_path):
    ok = config_from_dict(tiny_recipe("m", tmp_path, reward__weights={
        "accuracy": 0.9, "my_rewards.py:two_args": 0.1, "userpkg.scores:const": 0.05}))
    assert list(ok.reward.weights) == ["accuracy", "my_rewards.py:two_args", "userpkg.scores:const"]
    assert ok.reward.timeout_s == 5.0 and ok.reward.max_failure_frac == 0.5
    msg = _recipe_errors("m", tmp_path, {"missing.py:f": 1.0})
    assert "reward.weights.missing.py:f" in msg and "not found" in msg
    msg = _recipe_errors("m", tmp_path, {"my_rewards.py:nope": 1.0})
    assert "reward.weights.my_rewards.py:nope" in msg and "no function 'nope'" in msg and "two_args" in msg
    msg = _recipe_errors("m", tmp_path, {"my_rewards.py:three_args": 1.0})
    assert "reward.weights.my_rewards.py:three_args" in msg and "does not accept (response, sample)" in msg
    msg = _recipe_errors("m", tmp_path, {"no_such_pkg.mod:f": 1.0})
    assert "reward.weights.no_such_pkg.mod:f" in msg and "not found" in msg
    msg = _recipe_errors("m", tmp_path, {"lengthy": 1.0})
    assert "reward.weights.lengthy: unknown reward" in msg and "accuracy" in msg
    with pytest.raises(ConfigError, match="reward.timeout_s"):
        config_from_dict(tiny_recipe("m", tmp_path, reward__timeout_s=0))
    with pytest.raises(ConfigError, match="reward.max_failure_frac"):
        config_from_dict(tiny_recipe("m", tmp_path, reward__max_failure_frac=1.5))


def test_pool_scores_and_contains_every_failure(reward_dir):
    pool = RewardPool({"f": parse_reward_ref("my_rewards.py:by_text"), "c": parse_reward_ref("userpkg.scores:const")},
                      timeout_s=1.0, workers=2)
    try:
        texts = ["ab", "hang", "boom", "nan", "text", "abcd"]
        results = pool.run([("f", t, _sample(f"s:row {i}")) for i, t in enumerate(texts)] + [("c", "x", _sample())])
        assert [r.value for r in results] == [2.0, None, None, None, None, 4.0, 0.25]
        assert "timed out after 1 s" in results[1].error
        assert results[2].error == "RuntimeError: boom s:row 2"
        assert "nan" in results[3].error and "not a number" in results[4].error
        assert pool.restarts == 1
        # the killed worker was replaced: the next batch is served, quickly
        start = time.monotonic()
        again = pool.run([("f", "xyz", _sample())] * 4)
        assert [r.value for r in again] == [3.0] * 4 and time.monotonic() - start < 30
        procs = [w.proc for w in pool._workers]
        assert procs and all(p.is_alive() for p in procs)
        ready = [w.proc for w in pool._workers if w.ready]
        for p in procs:  # Ctrl-C hits the whole process group: scoring goes on (a starting worker is replaced)
            os.kill(p.pid, signal.SIGINT)
        assert [r.value for r in pool.run([("f", "xy", _sample())] * 3)] == [2.0] * 3
        assert ready and all(p.is_alive() for p in ready)
    finally:
        pool.close()
    assert not any(p.is_alive() for p in procs)


def test_rewarder_mixes_builtins_and_user_functions(reward_dir):
    warnings = []
    cfg = RewardConfig(weights={"format": 0.5, "my_rewards.py:by_text": 0.1}, timeout_s=1.0, max_failure_frac=0.5)
    rewarder = Rewarder(cfg, ResponseFormat(template="plain"), warn=lambda step, msg: warnings.append((step, msg)))
    try:
        totals, raw, metrics = rewarder.compute(["\\boxed{1}", "boom"], [_sample("a:row 1"), _sample("b:row 2")], 3)
        assert raw == {"format": [1.0, 0.0], "my_rewards.py:by_text": [9.0, 0.0]}
        assert totals == pytest.approx([0.5 + 0.9, 0.0])
        assert metrics == {"reward/my_rewards.py:by_text/failures": 1.0}
        assert warnings and warnings[0][0] == 3 and "my_rewards.py:by_text" in warnings[0][1] and "b:row 2" in warnings[0][1]
        with pytest.raises(RewardFailureError, match=r"2 of 2 calls failed at step 4.*max_failure_frac=0.5"):
            rewarder.compute(["boom", "nan"], [_sample(), _sample()], 4)
    finally:
        rewarder.close()


def _failing_sources(steps: int, seed: int = 0) -> list[str]:
    """The first prompt of each step (so exactly half of each step's reward calls fail)."""
    train_set = make_task("count_shapes", "train", 16, seed, image_size=56)
    return [prompts_for_step(train_set, step, 2, seed)[0].source for step in range(1, steps + 1)]


@pytest.mark.parametrize("fn", ["hangs", "raises", "nan"])
def test_training_survives_a_failing_reward(tiny_qwen, reward_dir, fn):
    (reward_dir / "fail.json").write_text(json.dumps(_failing_sources(2)))
    name = f"my_rewards.py:{fn}"
    recipe = tiny_recipe(tiny_qwen, reward_dir / "runs", train__steps=2, reward__timeout_s=1.0,
                         reward__weights={"accuracy": 0.9, "format": 0.1, name: 1.0})
    start = time.monotonic()
    run = train(config_from_dict(recipe), quiet=True)
    assert time.monotonic() - start < 300
    events = read_events(run.run_dir / "events.jsonl")
    metrics = [e for e in events if e["type"] == "metrics"]
    assert [m[f"reward/{name}/failures"] for m in metrics] == [2.0, 2.0]  # 1 of 2 prompts x group of 2
    # the failed calls score 0 and the others len(response) / 50: the mean is finite and in [0, cap / 50]
    assert all(0.0 <= m[f"reward/{name}/mean"] <= 200 / 50 and math.isfinite(m[f"reward/{name}/mean"])
               for m in metrics)
    warnings = [e["message"] for e in events if e["type"] == "warning" and name in e["message"]]
    assert len(warnings) == 2 and all("failed on 2 of 4 calls" in w for w in warnings)
    assert _failing_sources(2)[0] in warnings[0] and _failing_sources(2)[1] in warnings[1]
    reason = {"hangs": "timed out after 1 s", "raises": "ValueError: bad sample", "nan": "returned nan"}[fn]
    assert all(reason in w for w in warnings)
    assert events[-1]["status"] == "finished"
    assert not [p for p in mp.active_children() if p.name == "lite-srpo-reward"]  # workers gone with the run


def test_training_stops_when_a_reward_always_fails(tiny_qwen, reward_dir):
    recipe = tiny_recipe(tiny_qwen, reward_dir / "runs", train__steps=2, reward__timeout_s=1.0,
                         reward__weights={"accuracy": 1.0, "my_rewards.py:always": 1.0})
    cfg = config_from_dict(recipe)
    with pytest.raises(LiteSrpoError, match=r"my_rewards.py:always: 4 of 4 calls failed at step 1.*always broken"):
        train(cfg, quiet=True)
    events = read_events(cfg.run_dir / "events.jsonl")
    assert events[-1]["status"] == "crashed" and "max_failure_frac" in events[-1]["message"]
    assert not [p for p in mp.active_children() if p.name == "lite-srpo-reward"]


HOSTILE = textwrap.dedent('''
    import json, multiprocessing, os
    from pathlib import Path

    MODE = (Path(__file__).parent / "hostile_mode.txt").read_text().strip()
    IN_WORKER = multiprocessing.current_process().name != "MainProcess"
    if MODE == "raise_on_import" and IN_WORKER:
        raise ImportError("hostile cannot be imported here")
    if MODE == "die_at_start" and IN_WORKER:
        os._exit(3)
    FAIL = set(json.loads((Path(__file__).parent / "fail.json").read_text()))

    def exits(response, sample):
        if sample.source in FAIL:
            os._exit(1)  # the worker dies in the middle of a call
        return len(response) / 50.0

    def unpicklable(response, sample):
        if sample.source in FAIL:
            return lambda: 1.0  # neither a number nor picklable
        return len(response) / 50.0
''')


def hostile_run(tiny_qwen, reward_dir, fn: str, mode: str = "", steps: int = 2):
    (reward_dir / "hostile.py").write_text(HOSTILE)
    (reward_dir / "hostile_mode.txt").write_text(mode)
    (reward_dir / "fail.json").write_text(json.dumps(_failing_sources(steps)))
    name = f"hostile.py:{fn}"
    recipe = tiny_recipe(tiny_qwen, reward_dir / "runs", train__steps=steps, reward__timeout_s=5.0,
                         reward__weights={"accuracy": 0.9, "format": 0.1, name: 1.0})
    return name, config_from_dict(recipe)


@pytest.mark.parametrize("fn, reason", [("exits", "worker process died (exit code 1)"),
                                        ("unpicklable", "returned function")])
def test_a_reward_that_kills_its_worker_or_returns_garbage_scores_zero_and_is_counted(tiny_qwen, reward_dir, fn, reason):
    name, cfg = hostile_run(tiny_qwen, reward_dir, fn)
    start = time.monotonic()
    run = train(cfg, quiet=True)
    assert time.monotonic() - start < 300
    events = read_events(run.run_dir / "events.jsonl")
    metrics = [e for e in events if e["type"] == "metrics"]
    assert [m[f"reward/{name}/failures"] for m in metrics] == [2.0, 2.0]  # the failing prompt's group of 2
    warnings = [e["message"] for e in events if e["type"] == "warning" and name in e["message"]]
    assert len(warnings) == 2 and all(reason in w for w in warnings), warnings
    assert [e for e in events if e["type"] == "status"][-1]["status"] == "finished"
    assert not [p for p in mp.active_children() if p.name == "lite-srpo-reward"]


@pytest.mark.parametrize("mode, needle", [("raise_on_import", "ImportError: hostile cannot be imported here"),
                                          ("die_at_start", "keep exiting while starting (exit code 3)")])
def test_a_reward_whose_workers_cannot_start_stops_the_run_naming_it(tiny_qwen, reward_dir, mode, needle):
    """The module imports in the trainer (so the recipe check passes) but fails, or kills the process, in
    every worker: the run stops at the first step with an error naming the reward, and hangs nowhere."""
    name, cfg = hostile_run(tiny_qwen, reward_dir, "exits", mode=mode)
    start = time.monotonic()
    with pytest.raises(ConfigError) as e:
        train(cfg, quiet=True)
    assert time.monotonic() - start < 300
    assert name in str(e.value) and needle in str(e.value), str(e.value)
    assert not [p for p in mp.active_children() if p.name == "lite-srpo-reward"]


OLD_STYLE = textwrap.dedent('''
    from lite_srpo.tasks.base import Sample   # the import README showed before the layered package

    def brevity(response: str, sample: Sample) -> float:
        return max(0.0, 1.0 - len(response) / 200)
''')


def test_a_reward_file_with_the_old_import_path_still_loads_and_warns(tmp_path, monkeypatch):
    import importlib

    import lite_srpo.tasks
    import lite_srpo.tasks.base

    with pytest.warns(DeprecationWarning, match="lite_srpo.data.tasks"):
        importlib.reload(lite_srpo.tasks)
    assert lite_srpo.tasks.base.Sample is Sample and lite_srpo.tasks.make_task is make_task
    (tmp_path / "old_rewards.py").write_text(OLD_STYLE)
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict(tiny_recipe("m", tmp_path, reward__weights={"accuracy": 0.9, "old_rewards.py:brevity": 0.1}))
    assert "old_rewards.py:brevity" in cfg.reward.weights
    pool = RewardPool({"b": parse_reward_ref("old_rewards.py:brevity")}, timeout_s=30.0, workers=1)
    try:  # the worker process ('spawn') imports the file, and the old path, afresh
        results = pool.run([("b", "x" * 50, make_task("count_shapes", "test", 1, 0)[0])])
    finally:
        pool.close()
    assert not results[0].error and results[0].value == pytest.approx(0.75)
