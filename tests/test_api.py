"""The Python API: `lite_srpo.{load_config, plan, train, evaluate, export}`, documented, and cheap to import."""
from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import lite_srpo
from lite_srpo.config import RunConfig
from lite_srpo.errors import ConfigError
from lite_srpo.model.memory.plan import plan as planner

ROOT = Path(__file__).resolve().parent.parent
API = ("load_config", "plan", "train", "evaluate", "export")


@pytest.mark.parametrize("name", API)
def test_each_name_is_a_documented_function(name):
    fn = getattr(lite_srpo, name)
    assert inspect.isfunction(fn) and fn.__module__ == "lite_srpo" and name in lite_srpo.__all__
    doc = inspect.getdoc(fn)
    assert doc and len(doc.split()) >= 25, f"lite_srpo.{name} needs a docstring that says what it does"


def test_importing_the_package_loads_no_torch():
    code = "import sys, lite_srpo; print('torch' in sys.modules, 'lite_srpo.rl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split() == ["False", "False"]


def test_load_config_reads_the_recipe_with_overrides_and_reports_every_problem():
    cfg = lite_srpo.load_config(ROOT / "recipes" / "demo_cpu.yaml", ["train.steps=7", "algorithm.srpo.lam=0.3"])
    assert isinstance(cfg, RunConfig) and cfg.train.steps == 7 and cfg.algorithm.name == "srpo"
    assert cfg.algorithm.srpo.lam == 0.3 and cfg.rollout.group_size == 8
    with pytest.raises(ConfigError) as err:
        lite_srpo.load_config(None, ["train.stepz=1", "rollout.group_size=1"])
    assert "train.stepz: unknown key" in str(err.value)


def test_plan_is_the_planner_on_the_loaded_recipe(tiny_qwen):
    cfg = lite_srpo.load_config(ROOT / "recipes" / "demo_cpu.yaml", [f"model.path={tiny_qwen}"])
    got = lite_srpo.plan(cfg, 2.0, device="cpu")
    assert got == planner(cfg, 2.0, device="cpu")
    assert got["device"] == "cpu" and got["shape"]["group_size"] == 8 and 0 < got["peak_gib"] < 2.0 and got["fits"]
