"""README: "first SIGINT/SIGTERM finishes the step and checkpoints; a second one stops at once" and exits 130.
A real `python -m lite_srpo train` process (tiny 4-bit model) gets SIGINT twice in the middle of step 2."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from conftest import tiny_recipe, tree_hash
from lite_srpo.run.checkpoint import checkpoint_dirs, latest_checkpoint, load_trainer_state
from lite_srpo.run.events import read_events

ROOT = Path(__file__).resolve().parents[2]




def test_second_sigint_exits_130_and_keeps_the_last_checkpoint(tiny_qwen, tmp_path):
    recipe = tiny_recipe(tiny_qwen, tmp_path, train__steps=3, train__save_every=1,
                         rollout__max_new_tokens=384, rollout__prompts_per_step=2)
    recipe["reward"] = {"weights": {"accuracy": 0.9, "format": 0.1}}  # the subprocess has no test reward
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = tmp_path / "t"
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lite_srpo", "train", str(path), "--quiet"], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline = time.time() + 300
        while latest_checkpoint(run_dir) is None:  # step 1 done and saved: step 2 (long generation) is next
            assert proc.poll() is None, f"exited early (rc={proc.returncode}):\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        first = latest_checkpoint(run_dir)
        before = tree_hash(first)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        assert proc.poll() is None, "the first signal must let the step finish"
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert rc == 130, output[-3000:]
    assert "stop requested (SIGINT)" in output and "Traceback" not in output
    assert "the last checkpoint is intact" in output
    assert [p.name for p in checkpoint_dirs(run_dir)] == [first.name] == ["step_000001"]
    assert tree_hash(first) == before and load_trainer_state(first)["step"] == 1
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    events = read_events(run_dir / "events.jsonl")
    assert [e["step"] for e in events if e["type"] == "metrics"] == [1]
    status = [e for e in events if e["type"] == "status"][-1]
    assert status["status"] == "stopped" and "last checkpoint is step 1" in status["message"]
