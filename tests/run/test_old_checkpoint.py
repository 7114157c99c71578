"""A checkpoint written before the layered package (tests/fixtures/old_layout_run, made by the flat layout
at commit e3418b1) resumes with today's code, through the Python API, exactly where the old code resumed it."""
from __future__ import annotations

import io
import json
import pickletools
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lite_srpo
from conftest import assert_same
from lite_srpo.rl import train as train_mod
from lite_srpo.run import checkpoint as ckpt

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "old_layout_run"
CHECKPOINT = "checkpoints/step_000002"
PLACEHOLDER = "TINY_MODEL_PATH"


@pytest.fixture
def old_run(tiny_qwen, tmp_path) -> Path:
    """A copy of the old run directory, pointed at this session's tiny model (same builder, same seed)."""
    run_dir = tmp_path / "old_layout_run"
    shutil.copytree(FIXTURE, run_dir)
    for recipe in run_dir.rglob("recipe.yaml"):
        recipe.write_text(recipe.read_text(encoding="utf-8").replace(PLACEHOLDER, str(tiny_qwen)), encoding="utf-8")
    return run_dir


def test_the_trainer_state_pickles_no_module_path_of_the_package():
    """Moving modules cannot break loading: the state holds tensors and plain data only (weights_only)."""
    with zipfile.ZipFile(FIXTURE / CHECKPOINT / ckpt.STATE_FILE) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    listing = io.StringIO()
    pickletools.dis(data, out=listing)
    globals_ = {line.split("GLOBAL", 1)[1].strip() for line in listing.getvalue().splitlines() if "GLOBAL" in line}
    assert globals_ and all(g.split()[0].strip("'") in ("torch", "torch._utils", "collections") for g in globals_)
    state = ckpt.load_trainer_state(FIXTURE / CHECKPOINT)
    assert state[ckpt.STEP_KEY] == 2 and set(state) == {"step", "optimizer", "scheduler", "rng", "extra"}


def test_setup_restores_the_old_checkpoint_bitwise(old_run):
    cfg = lite_srpo.load_config(old_run / "recipe.yaml", [f"output_dir={old_run.parent}", "train.steps=3"])
    run = train_mod.setup(cfg, resume=True)
    assert run.start_step == 2
    saved = load_file(str(old_run / CHECKPOINT / "adapter" / "adapter_model.safetensors"))
    mine = {k: v for k, v in run.policy.model.state_dict().items() if "lora_" in k}
    assert len(mine) == len(saved) == 8
    for key, value in saved.items():
        assert torch.equal(mine[key.replace(".weight", ".default.weight")], value), key
    state = torch.load(old_run / CHECKPOINT / ckpt.STATE_FILE, weights_only=True)
    assert_same(run.optimizer.state_dict()["state"], state["optimizer"]["state"], "optimizer state")
    assert_same(run.scheduler.state_dict(), state["scheduler"], "scheduler")
    run.rewarder.close()


def test_resuming_the_old_checkpoint_matches_what_the_old_code_did(old_run):
    cfg = lite_srpo.load_config(old_run / "recipe.yaml", [f"output_dir={old_run.parent}", "train.steps=3"])
    run = lite_srpo.train(cfg, resume=True, quiet=True)
    expected = json.loads((FIXTURE / "resumed_step3.json").read_text())
    events = [json.loads(line) for line in (old_run / "events.jsonl").read_text().splitlines()]
    assert [e["message"] for e in events if e["type"] == "status" and e.get("status") == "resumed"] == \
        ["resumed from step_000002"]
    step3 = next(e for e in events if e["type"] == "metrics" and e["step"] == 3)
    for key, value in expected["metrics"].items():
        assert step3[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    weights = load_file(str(run.run_dir / "checkpoints" / "step_000003" / "adapter" / "adapter_model.safetensors"))
    sums = {k: float(v.double().sum()) for k, v in sorted(weights.items())}
    assert sums == pytest.approx(expected["adapter_sums"], rel=1e-4, abs=1e-6)


def test_evaluate_and_export_the_old_run_through_the_api(old_run, tmp_path):
    result = lite_srpo.evaluate(old_run, limit=2, max_new_tokens=4)
    (name, held_out), = result["datasets"].items()
    assert name == "held-out (count_shapes)" and held_out["n_samples"] == 2 and 0 <= held_out["accuracy"] <= 1
    info = lite_srpo.export(old_run, tmp_path / "adapter")
    assert info["mode"] == "adapter" and info["step"] == 2 and info["verification"]["passed"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
