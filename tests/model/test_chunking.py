"""`train.logprob_chunk: auto`: the rule, its values on real vocabularies, and one answer for trainer and planner."""
from __future__ import annotations

import pytest

from lite_srpo.model.chunking import (AUTO_MAX_CHUNK, AUTO_MIN_CHUNK, AUTO_WEIGHT_FRACTION, LOGITS_COPIES_GRAD,
                                      auto_logprob_chunk, resolved_logprob_chunk, weight_bytes)
from lite_srpo.model.dims import KNOWN_MODELS, dims_from_config

# The CPU bench model (bench/common.py): Qwen2.5-VL architecture, 2 layers, H=256, real V=151,936.
BENCH_TEXT = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 151936}


def test_rule_is_the_largest_power_of_two_within_budget():
    v, h = 151936, 3584
    per_row = v * 4 * LOGITS_COPIES_GRAD[2] + h * 2 * 2
    for rows in (128, 256, 512, 1024):
        assert auto_logprob_chunk(v, h, 2, rows * per_row) == rows  # exactly at the budget
        assert auto_logprob_chunk(v, h, 2, rows * per_row - 1) == rows // 2 or rows == AUTO_MIN_CHUNK
    assert auto_logprob_chunk(v, h, 2, 1.0) == AUTO_MIN_CHUNK
    assert auto_logprob_chunk(v, h, 2, 1e15) == AUTO_MAX_CHUNK
    with pytest.raises(ValueError):
        auto_logprob_chunk(v, h, 3, 1e9)


def test_int_settings_pass_through():
    dims = dims_from_config(KNOWN_MODELS["Qwen/Qwen2.5-VL-7B-Instruct"])
    assert resolved_logprob_chunk(1024, dims, True, 2) == 1024
    assert resolved_logprob_chunk(7, dims, True, 2) == 7


def test_values_for_7b_3b_and_the_bench_model():
    seven = dims_from_config(KNOWN_MODELS["Qwen/Qwen2.5-VL-7B-Instruct"])
    three = dims_from_config(KNOWN_MODELS["Qwen/Qwen2.5-VL-3B-Instruct"])
    vision = dict(KNOWN_MODELS["Qwen/Qwen2.5-VL-3B-Instruct"]["vision_config"], depth=2, hidden_size=64,
                  intermediate_size=128, out_hidden_size=256, num_heads=2)
    bench = dims_from_config({"model_type": "qwen2_5_vl", "text_config": BENCH_TEXT, "tie_word_embeddings": False,
                              "vision_config": vision})
    # 7B in 4-bit with bf16 compute: ~7 GiB of weights -> a quarter is ~1.7 GiB -> 512 rows (1.4 GiB of logits).
    assert resolved_logprob_chunk("auto", seven, True, 2) == 512
    assert resolved_logprob_chunk("auto", three, True, 2) == 256
    # The 2-layer bench model weighs ~0.3 GiB (its fp32 embeddings and lm_head): the floor of 128 rows applies.
    assert resolved_logprob_chunk("auto", bench, True, 4) == AUTO_MIN_CHUNK
    for dims, b in ((seven, 2), (three, 2)):
        chunk = resolved_logprob_chunk("auto", dims, True, b)
        logits = chunk * dims.vocab * 4 * LOGITS_COPIES_GRAD[b]
        assert logits <= AUTO_WEIGHT_FRACTION * weight_bytes(dims, True, b) < 2 * logits


def test_trainer_and_planner_resolve_the_same_chunk(tiny_qwen, caplog):
    """The loaded policy's config and the planner's config.json give one answer, and the plan reports it."""
    from conftest import tiny_recipe
    from lite_srpo.config import config_from_dict
    from lite_srpo.model.chunking import policy_logprob_chunk
    from lite_srpo.model.memory.plan import plan
    from lite_srpo.model.memory.report import format_plan
    from lite_srpo.model.policy import load_policy

    cfg = config_from_dict(tiny_recipe(tiny_qwen, "runs-unused", train__logprob_chunk="auto"))
    policy = load_policy(cfg.model, cfg.lora)
    with caplog.at_level("INFO", logger="lite_srpo.model.chunking"):
        trained = policy_logprob_chunk(cfg, policy)
        assert policy_logprob_chunk(cfg, policy) == trained  # resolved once per policy, logged once
    ours = [r.getMessage().split(" (")[0] for r in caplog.records if r.name == "lite_srpo.model.chunking"]
    assert ours == [f"train.logprob_chunk: auto -> {trained} rows"]
    p = plan(cfg, 24.0, device="cpu")
    assert p["shape"]["logprob_chunk"] == trained == AUTO_MIN_CHUNK  # a tiny model: the floor
    assert p["shape"]["logprob_chunk_setting"] == "auto"
    assert f"lm_head chunk {trained} (auto)" in format_plan(p)
    fixed = config_from_dict(tiny_recipe(tiny_qwen, "runs-unused", train__logprob_chunk=16))
    assert policy_logprob_chunk(fixed, policy) == 16 == plan(fixed, 24.0, device="cpu")["shape"]["logprob_chunk"]
