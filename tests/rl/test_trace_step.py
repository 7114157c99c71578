"""The step traced at real shapes on meta tensors (`rl/trace_step.py`), against the plan and by hand."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_recipe
from lite_srpo.config import config_from_dict, load_config
from lite_srpo.errors import ModelError
from lite_srpo.model.memory.plan import plan
from lite_srpo.model.meta_model import read_config
from lite_srpo.rl import trace_step as ts
from lite_srpo.rl.sampling import InverseCdfSampler
from lite_srpo.rl.trace_report import AGREEMENT, compare, model_config, plan_or_trace_main

ROOT = Path(__file__).resolve().parents[2]
RECIPE_3B = ROOT / "recipes" / "qwen2_5_vl_3b_srpo_24gb.yaml"


def tiny_cfg(model, tmp_path, **overrides):
    return config_from_dict(tiny_recipe(model, tmp_path / "runs", model__dtype="auto", reward__weights={"accuracy": 1.0},
                                        algorithm__name="srpo", **overrides))


def test_the_3b_recipe_traced_agrees_with_the_plan_phase_by_phase():
    """Qwen2.5-VL-3B-Instruct's published config, the SRPO 24 GB recipe: 36 real Linear4bit layers x 7, peft
    LoRA, checkpointing, the corrupted and perception-removed passes. Each phase within 15 % of the plan."""
    cfg = load_config(RECIPE_3B)
    config, source = model_config(cfg.model.path)
    assert "published copy" in source
    result = ts.trace_step(cfg, config)
    planned = plan(cfg, 24.0, model_dims=config, device="cuda")
    report = compare(result, planned)
    assert result.passes_run == ["old", "corrupted", "removed"]
    assert report["fixed"]["traced_gib"] == pytest.approx(report["fixed"]["planned_gib"], rel=0.01)
    for name, row in report["phases"].items():
        assert abs(row["traced_over_planned"] - 1) <= AGREEMENT, (name, row)
    # the shapes traced are the recipe's: 4 prompts x G=8 rows of 1,024 prompt + 2,048 response tokens
    assert (result.shape.generation_rows, result.shape.prompt_tokens, result.shape.response_tokens) == (32, 1024, 2048)


def test_offload_puts_every_checkpointed_input_in_host_memory(tiny_qwen, tmp_path):
    """Traced host bytes against the hand count: layers x micro-batch x (prompt + response) x H x 2 B."""
    config = read_config(tiny_qwen)
    on = ts.trace_step(tiny_cfg(tiny_qwen, tmp_path, train__offload_activations=True), config)
    off = ts.trace_step(tiny_cfg(tiny_qwen, tmp_path), config)
    text = config["text_config"] if "text_config" in config else config
    s = on.shape
    expected = text["num_hidden_layers"] * s.micro_batch * (s.prompt_tokens + s.response_tokens) * text["hidden_size"] * 2
    assert on.host_gib * 2**30 == expected
    assert off.host_gib == 0
    assert on.phases["generation"] == off.phases["generation"]  # offload changes only the update


def test_attention_is_traced_as_the_gpu_kernel_that_keeps_no_scores(tiny_qwen, tmp_path, monkeypatch):
    """sdpa on meta takes the math path and holds fp32 [rows, heads, L, L] scores; a card's bf16 flash kernel
    does not. With the routing off the passes' peak grows by at least one such score tensor."""
    cfg = tiny_cfg(tiny_qwen, tmp_path)
    config = read_config(tiny_qwen)
    routed = ts.trace_step(cfg, config)
    monkeypatch.setattr(ts, "_cuda_attention_kernels", contextlib.nullcontext)
    math_path = ts.trace_step(cfg, config)
    s = routed.shape
    heads = (config["text_config"] if "text_config" in config else config)["num_attention_heads"]
    scores = s.micro_batch * heads * (s.prompt_tokens + s.response_tokens) ** 2 * 4
    assert (math_path.phases["passes"] - routed.phases["passes"]) * 2**30 >= scores


def test_plan_trace_command(tiny_qwen, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(tiny_recipe(tiny_qwen, tmp_path / "runs", model__dtype="auto",
                                             reward__weights={"accuracy": 1.0})))
    assert plan_or_trace_main([str(recipe), "--trace", "--json", "--gpu-mem", "24GiB"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["phases"]) == {"generation", "passes", "update"}
    assert all(row["traced_gib"] > 0 and row["planned_gib"] > 0 for row in report["phases"].values())
    assert report["traced_fits"] and "not GPU-measured" in report["caveat"]
    assert plan_or_trace_main([str(recipe), "--trace", "--gpu-mem", "0.001GiB"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert plan_or_trace_main([str(recipe), "--gpu-mem", "24GiB"]) == 0  # without --trace: the plan
    assert "| term | phase | GiB | how |" in capsys.readouterr().out


def test_a_hub_id_without_a_config_gets_told_how_to_fetch_just_that_file():
    assert "published copy" in model_config("Qwen/Qwen2.5-VL-7B-Instruct")[1]
    with pytest.raises(ModelError, match="huggingface-cli download Org/Unknown-VL config.json"):
        model_config("Org/Unknown-VL")


def test_the_sampler_runs_on_meta_without_a_boolean_index():
    """The suppress ids are filtered on the host and copied once, so a decode step has no host sync."""
    sampler = InverseCdfSampler(1.0, suppress=[3, 10**9])
    scores = torch.empty(4, 50, device="meta")
    assert sampler(None, scores).shape == (4, 50)
    cached = sampler._suppress_cache[1]
    sampler(None, scores)
    assert sampler._suppress_cache[1] is cached and cached.device.type == "meta"
    real = torch.zeros(2, 5)
    assert set(InverseCdfSampler(1.0, suppress=[0, 1, 2, 3]).sample(real).tolist()) == {4}


def test_the_planners_pass_rule_matches_the_trainers():
    """`terms.runs_no_grad_pass` is the model layer's copy of which steps run a no-grad pass (it cannot
    import rl/algorithms.py): for every algorithm, with and without KL and a second mini-batch, it agrees
    with the specs the trainer reads."""
    from lite_srpo.config import config_from_dict
    from lite_srpo.config.schema import ALGORITHMS
    from lite_srpo.model.memory.terms import runs_no_grad_pass
    from lite_srpo.rl.algorithms import ALGORITHM_SPECS, old_pass_needed

    for name in ALGORITHMS:
        for beta in (0.0, 0.01):
            for mini in (1, 2):
                cfg = config_from_dict({"model": {"path": "m"}, "data": {"task": "count_shapes"},
                                        "algorithm": {"name": name, "beta": beta}, "train": {"mini_batches": mini}})
                spec = ALGORITHM_SPECS[name]
                trainer = (old_pass_needed(spec, mini) or spec.needs_corrupted or spec.needs_removed(cfg.algorithm)
                           or spec.needs_focus or beta > 0)
                assert runs_no_grad_pass(cfg) == trainer, (name, beta, mini)
