"""The memory planner: parameter counts, image tokens, per-term arithmetic, search, CLI."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from lite_srpo.config import config_from_dict, load_config
from lite_srpo.errors import ConfigError, ModelError
from lite_srpo.model.chunking import NF4_DQ_BYTES_PER_PARAM
from lite_srpo.model.dims import KNOWN_MODELS, dims_from_config, image_tokens, load_model_dims
from lite_srpo.model.memory.plan import plan
from lite_srpo.model.memory.report import format_plan, parse_memory, plan_main
from lite_srpo.model.memory.terms import GIB

ROOT = Path(__file__).resolve().parents[2]
RECIPE_7B = ROOT / "recipes" / "qwen2_5_vl_7b_srpo_24gb.yaml"


def recipe(path: str = "Qwen/Qwen2.5-VL-7B-Instruct", **sections) -> dict:
    out = {"model": {"path": path}, "data": {"task": "count_shapes", "image_size": 448},
           "rollout": {"group_size": 8, "prompts_per_step": 1, "max_new_tokens": 2048},
           "algorithm": {"name": "srpo"}, "train": {"micro_batch_size": 2, "logprob_chunk": 1024}}
    for key, value in sections.items():
        out[key] = {**out.get(key, {}), **value}
    return out


def term(p: dict, name: str, phase: str) -> float:
    return next(t["gib"] for t in p["terms"] if t["name"] == name and t["phase"] == phase)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "idefics3"])
def test_parameter_groups_match_the_real_tiny_models(tiny_factory, arch):
    from transformers import AutoModelForImageTextToText

    from lite_srpo.model.tiny import available_archs

    assert arch in available_archs(), f"{arch}: the pinned transformers must build it"
    path = tiny_factory(arch)
    dims = load_model_dims(str(path))
    model = AutoModelForImageTextToText.from_pretrained(path)
    groups = {"vision": 0, "embed": 0, "head": 0, "linear": 0, "other": 0}
    for name, p in model.named_parameters():
        if any(k in name for k in ("visual", "vision_model", "connector")):
            groups["vision"] += p.numel()
        elif "embed_tokens" in name:
            groups["embed"] += p.numel()
        elif "lm_head" in name:
            groups["head"] += p.numel()
        elif p.dim() == 2 and ".layers." in name:
            groups["linear"] += p.numel()
        else:
            groups["other"] += p.numel()
    assert groups == {"vision": dims.vision_params, "embed": dims.embed_params, "head": dims.lm_head_params,
                      "linear": dims.llm_linear_params, "other": dims.other_params}


@pytest.mark.parametrize("model_id, published_b", [
    ("Qwen/Qwen2.5-VL-3B-Instruct", 3.75), ("Qwen/Qwen2.5-VL-7B-Instruct", 8.29), ("Qwen/Qwen2-VL-2B-Instruct", 2.21),
    ("Qwen/Qwen2-VL-7B-Instruct", 8.29), ("Qwen/Qwen3-VL-8B-Instruct", 8.77),
    ("HuggingFaceTB/SmolVLM-256M-Instruct", 0.256), ("HuggingFaceTB/SmolVLM-Instruct", 2.25),
])
def test_known_models_match_their_published_totals(model_id, published_b):
    dims = dims_from_config(KNOWN_MODELS[model_id], model_id)
    assert dims.total_params / 1e9 == pytest.approx(published_b, rel=0.01)


def test_hub_ids_resolve_without_suffix_and_case():
    assert load_model_dims("qwen/qwen2.5-vl-7b").name == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert load_model_dims("Qwen2.5-VL-3B-Instruct").hidden == 2048


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="Known hub ids: Qwen/Qwen2.5-VL-3B-Instruct"):
        load_model_dims("someone/unknown-vlm")
    with pytest.raises(ModelError, match="no config.json"):
        load_model_dims(str(tmp_path))


def test_weights_lora_and_quantization_match_the_hand_arithmetic():
    p = plan(config_from_dict(recipe()), 24.0)
    # LLM linears of 7B: 28 layers x (3584*3584*2 + 3584*512*2 + 3*3584*18944) = 6.525e9 params;
    # NF4 + double quant = 0.5 + 1/64 + 4/16384 bytes each -> 3.135 GiB (anchors.md §5: 3.14)
    linears = 28 * (3584 * 3584 * 2 + 3584 * 512 * 2 + 3 * 3584 * 18944)
    assert term(p, "weights: LLM linears (NF4 + double quant)", "fixed") == pytest.approx(
        linears * NF4_DQ_BYTES_PER_PARAM / GIB)
    assert linears * NF4_DQ_BYTES_PER_PARAM / GIB == pytest.approx(3.135, abs=0.002)
    # LoRA r=16 on the 7 linears: 28 x 16 x ((3584+3584)*2 + (3584+512)*2 + (3584+18944)*3) = 40.37M params;
    # fp32 weight + grad (8 B) + paged 8-bit AdamW (2 B) = 10 B each -> 0.376 GiB
    lora = 28 * 16 * ((3584 + 3584) * 2 + (3584 + 512) * 2 + (3584 + 18944) * 3)
    assert lora == 40_370_176
    assert term(p, "LoRA: fp32 weights + grads + optimizer", "fixed") == pytest.approx(lora * 10 / GIB)
    # untied 7B: embeddings and lm_head each 152064 x 3584 x 2 B = 1.015 GiB
    assert term(p, "weights: lm_head", "fixed") == pytest.approx(152064 * 3584 * 2 / GIB)


def test_kv_cache_and_logits_terms_by_hand():
    p = plan(config_from_dict(recipe()), 24.0, prompt_tokens=1024)
    # 8 rows x 3072 tokens x 28 layers x 2 (k, v) x 512 (4 kv heads x 128) x 2 B x (1 + 1/28) = 0.7 GiB... exactly:
    kv = 8 * 3072 * 28 * 2 * 512 * 2 * (1 + 1 / 28)
    assert term(p, "KV cache", "generation") == pytest.approx(kv / GIB)
    # streamed chunk with backward (fused, frozen lm_head): 1024 rows x 152064 x 4 B x 3.5 copies (bf16) = 2.03 GiB
    assert term(p, "streamed lm_head chunk (with backward)", "update") == pytest.approx(1024 * 152064 * 4 * 3.5 / GIB)


def test_logits_term_is_flat_in_length_and_group_size():
    short = plan(config_from_dict(recipe(rollout={"max_new_tokens": 512, "group_size": 2})), 24.0)
    long = plan(config_from_dict(recipe(rollout={"max_new_tokens": 4096, "group_size": 16})), 24.0)
    name = "streamed lm_head chunk (with backward)"
    assert term(short, name, "update") == term(long, name, "update")
    assert long["full_logits_gib"] == pytest.approx(short["full_logits_gib"] * 8 * 8)  # 8x longer, 8x more rows
    assert long["peak_gib"] > short["peak_gib"]  # activations and KV cache still grow


def test_design_target_7b_fits_24gb_and_full_logits_would_not():
    p = plan(load_config(RECIPE_7B), 24.0)
    assert p["device"] == "cuda" and p["fits"]
    assert 10 < p["peak_gib"] < 22
    assert p["full_logits_gib"] > 24  # what materialised [tokens x vocab] logits alone would need


def test_largest_g_and_length_are_the_boundary():
    cfg_dict = recipe()
    p = plan(config_from_dict(cfg_dict), 24.0)
    g, r = p["max_group_size"], p["max_response_tokens"]
    assert g is not None and r is not None and 8 <= g < 4096 and 2048 <= r < 262_144
    at = plan(config_from_dict(recipe(rollout={"group_size": g})), 24.0)
    over = plan(config_from_dict(recipe(rollout={"group_size": g + 1})), 24.0)
    assert at["fits"] and not over["fits"]
    at = plan(config_from_dict(recipe(rollout={"max_new_tokens": r})), 24.0)
    over = plan(config_from_dict(recipe(rollout={"max_new_tokens": r + 1})), 24.0)
    assert at["fits"] and not over["fits"]


def test_too_small_budget_reports_no_fitting_size():
    p = plan(config_from_dict(recipe()), 4.0)
    assert not p["fits"] and p["max_group_size"] is None and p["max_response_tokens"] is None


def test_cpu_plan_uses_fp32_and_the_process_baseline(tiny_qwen):
    cfg = config_from_dict(recipe(str(tiny_qwen), data={"image_size": 56}, rollout={"group_size": 2,
                                                                                     "max_new_tokens": 16}))
    p = plan(cfg, 16.0, device="cpu")
    assert p["shape"]["compute_bytes"] == 4 and p["device"] == "cpu"
    assert term(p, "process baseline", "fixed") > 0.2
    # a tiny model's step on CPU is a few hundred MiB above the baseline
    assert 0.3 < p["peak_gib"] < 2.0
    # image tokens of the tiny processor: 56 x 56 px -> (56 / 28)^2 = 4
    assert p["shape"]["image_tokens"] == 4


def test_gradient_checkpointing_off_stores_every_layer():
    on = plan(config_from_dict(recipe()), 80.0)
    off = plan(config_from_dict(recipe(model={"gradient_checkpointing": False})), 80.0)
    assert off["phases"]["update"] > on["phases"]["update"] + 5  # 28 layers of activations instead of one


def test_image_tokens_follow_the_processors():
    qwen = dims_from_config(KNOWN_MODELS["Qwen/Qwen2.5-VL-7B-Instruct"])
    assert image_tokens(qwen, 448, 448) == 256  # (448 / 28)^2
    assert image_tokens(qwen, 28, 28) == 4  # raised to min_pixels 56 x 56
    assert image_tokens(qwen, 1024, 1024) == 37 * 37  # round(1024 / 28) = 37 per side
    huge = image_tokens(qwen, 8000, 8000)  # capped by max_pixels = 16384 tokens
    assert 16000 < huge <= 16384
    smol = dims_from_config(KNOWN_MODELS["HuggingFaceTB/SmolVLM-256M-Instruct"])
    assert image_tokens(smol, 512, 512) == 64  # one 512 px tile: (512/16)^2 / 4^2
    assert image_tokens(smol, 1024, 1024) == 5 * 64  # 2 x 2 tiles + a global tile


def test_model_dims_argument_overrides_the_path():
    cfg = config_from_dict(recipe("not/on-disk"))
    p = plan(cfg, 24.0, model_dims=KNOWN_MODELS["Qwen/Qwen2.5-VL-3B-Instruct"])
    assert p["dims"]["hidden"] == 2048 and p["dims"]["tied"] is True
    assert term(p, "weights: lm_head", "fixed") == 0  # tied to the embeddings


@pytest.mark.parametrize("text, gib", [("24GiB", 24.0), ("24", 24.0), ("24 GB", 24e9 / 2**30),
                                       ("24000MiB", 24000 / 1024), ("0.5TiB", 512.0)])
def test_parse_memory(text, gib):
    assert parse_memory(text) == pytest.approx(gib)


def test_parse_memory_rejects_garbage():
    with pytest.raises(ConfigError, match="expected a size"):
        parse_memory("lots")


def test_format_plan_has_the_table_and_verdict():
    text = format_plan(plan(config_from_dict(recipe()), 24.0))
    assert "| term | phase | GiB | how |" in text
    assert "FITS in 24.0 GiB" in text and "device: cuda" in text
    assert "largest group size that fits" in text


def test_plan_main_exit_codes(capsys):
    assert plan_main([str(RECIPE_7B), "--gpu-mem", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "KV cache" in out
    assert plan_main([str(RECIPE_7B), "--gpu-mem", "8GiB"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert plan_main([str(RECIPE_7B), "rollout.group_size=1"]) == 2
    assert "rollout.group_size" in capsys.readouterr().err


def test_plan_main_json_and_overrides(capsys):
    import json

    assert plan_main([str(RECIPE_7B), "rollout.max_new_tokens=512", "--gpu-mem", "24", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["shape"]["response_tokens"] == 512 and math.isfinite(data["peak_gib"])


def test_per_rank_plan_splits_the_rows_and_adds_the_exchange():
    """With N ranks each holds the model but only prompts_per_step / N prompts' rows: the rows' terms
    shrink by N, the weights do not, and the step's exchanged vectors and the gradient buffer appear."""
    cfg = config_from_dict(recipe(rollout={"prompts_per_step": 4, "group_size": 8, "generation_batch_size": 0}))
    one, two = plan(cfg, 24.0), plan(cfg, 24.0, ranks=2)
    terms1, terms2 = ({t["name"]: t["gib"] for t in p["terms"]} for p in (one, two))
    assert two["shape"]["prompts_per_rank"] == 2 and two["shape"]["responses_per_rank"] == 16
    assert terms2["weights: LLM linears (NF4 + double quant)"] == terms1["weights: LLM linears (NF4 + double quant)"]
    assert terms2["KV cache"] == pytest.approx(terms1["KV cache"] / 2)
    assert "gradient all-reduce buffer" in terms2 and "gradient all-reduce buffer" not in terms1
    assert two["peak_gib"] < one["peak_gib"]
    assert "every figure below is per rank" in format_plan(two)
    with pytest.raises(ConfigError, match="prompts_per_step=4 is not divisible by the 3 ranks"):
        plan(cfg, 24.0, ranks=3)
