"""The planner's long-context terms (generation rows, offloaded checkpoints, chunked MLP recompute, [L, L]
masks) by hand, and `lite-srpo plan --fit`'s search."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest

from lite_srpo.config import config_from_dict, load_config
from lite_srpo.model.dims import load_model_dims
from lite_srpo.model.memory.fit import (auto_fit, fit, generate_calls, generation_options, override_line,
                                        training_options, with_settings)
from lite_srpo.model.memory.plan import _needed, plan, sum_phases
from lite_srpo.model.memory.report import plan_main
from lite_srpo.model.memory.terms import GIB, OFFLOAD_DEVICE_LAYERS, phase_terms

ROOT = Path(__file__).resolve().parents[2]
RECIPE_7B = ROOT / "recipes" / "qwen2_5_vl_7b_srpo_24gb.yaml"
D7 = load_model_dims("Qwen/Qwen2.5-VL-7B-Instruct")
P, R = 1024, 4096  # prompt and response tokens
S = P + R


def cfg7(**flat):
    """The 7B SRPO recipe with dotted overrides."""
    return load_config(RECIPE_7B, [f"{k}={v}" for k, v in flat.items()])


def terms(cfg, device="cuda", dense_mask=None, group=8):
    return {(t.name, t.phase): t.gib * GIB for t in phase_terms(cfg, D7, device, P, group, R, dense_mask=dense_mask)}


def test_kv_cache_holds_generation_rows_rows():
    per_row = S * D7.layers * 2 * D7.kv_dim * 2 * (1 + 1 / D7.layers)
    assert terms(cfg7())[("KV cache", "generation")] == pytest.approx(32 * per_row)  # 4 prompts x G=8, one call
    assert terms(cfg7(**{"rollout.generation_batch_size": 1}))[("KV cache", "generation")] == pytest.approx(8 * per_row)
    for rows in (1, 3, 8, 20):
        got = terms(cfg7(**{"rollout.generation_rows": rows}))[("KV cache", "generation")]
        assert got == pytest.approx(min(rows, 32) * per_row)
    both = cfg7(**{"rollout.generation_batch_size": 1, "rollout.generation_rows": 20})
    assert terms(both)[("KV cache", "generation")] == pytest.approx(8 * per_row)  # a call has 8 rows anyway


def test_checkpointed_inputs_with_and_without_offload():
    h, m = D7.hidden, 1
    plain = terms(cfg7(**{"train.micro_batch_size": m}))
    assert plain[("checkpointed layer inputs", "update")] == pytest.approx(m * S * D7.layers * h * 2)
    off = terms(cfg7(**{"train.micro_batch_size": m, "train.offload_activations": "true"}))
    assert ("checkpointed layer inputs", "update") not in off
    assert off[("checkpointed layer inputs (offloaded: on the card)", "update")] == pytest.approx(
        OFFLOAD_DEVICE_LAYERS * m * S * h * 2)
    assert off[("checkpointed layer inputs (offloaded: pinned host memory)", "host")] == pytest.approx(
        m * S * D7.layers * h * 2)
    # host bytes are reported but not on the card: the update phase drops by the difference
    c_plain, c_off = cfg7(**{"train.micro_batch_size": m}), cfg7(**{"train.micro_batch_size": m,
                                                                   "train.offload_activations": "true"})
    p0, p1 = plan(c_plain, 24, D7, prompt_tokens=P), plan(c_off, 24, D7, prompt_tokens=P)
    drop = (D7.layers - OFFLOAD_DEVICE_LAYERS) * m * (P + 2048) * h * 2 / GIB
    assert p0["phases"]["update"] - p1["phases"]["update"] == pytest.approx(drop)
    assert p1["host_gib"] == pytest.approx(m * (P + 2048) * D7.layers * h * 2 / GIB) and p0["host_gib"] == 0
    # on CPU the host is the device: offloading changes nothing
    cpu = terms(cfg7(**{"train.micro_batch_size": m, "train.offload_activations": "true"}), device="cpu")
    assert cpu[("checkpointed layer inputs", "update")] == pytest.approx(m * S * D7.layers * h * 4)
    assert not any(phase == "host" for _, phase in cpu)


# QLoRA on a card: peft casts each LoRA'd projection's input to the fp32 adapter dtype and keeps it for the
# adapter's gradient (6 H-wide inputs: q, k, v, o, gate, up), and computes the adapter's output and its
# scaled copy in fp32 next to the bf16 MLP buffers: 3 x 2 + 8 = 14 B per token and I with grad (vs 4 x 2),
# 2 x 2 + 8 = 12 without (vs 3 x 2). The step trace (rl/trace_step.py) shows these tensors at the peaks.
LORA_INPUTS_H = 6 * 4  # bytes per token and per unit of H
REC_MLP, NOGRAD_MLP = 14, 12  # bytes per token and per unit of I


def test_recomputed_layer_with_recompute_chunk():
    h, kv, i, b, m = D7.hidden, D7.kv_dim, D7.intermediate, 2, 2
    rest = (7 * h + 2 * kv) * b + 8 * h + LORA_INPUTS_H * h
    full = terms(cfg7())[("one layer recomputed for backward", "update")]
    assert full == pytest.approx(m * S * (rest + REC_MLP * i))
    for chunk in (512, 2048, 100_000):
        got = terms(cfg7(**{"train.recompute_chunk": chunk}))[("one layer recomputed for backward", "update")]
        assert got == pytest.approx(m * S * rest + min(chunk, m * S) * REC_MLP * i)
    # without checkpointing every layer's activations are stored, except each MLP's 4I intermediate, which the
    # chunked MLP recomputes one chunk at a time (offload needs checkpointing: the recipe refuses it here)
    no_gc = terms(cfg7(**{"model.gradient_checkpointing": "false", "train.recompute_chunk": 512}))
    assert no_gc[("activations of every layer", "update")] == pytest.approx(
        m * S * D7.layers * rest + min(512, m * S) * REC_MLP * i)
    plain = terms(cfg7(**{"model.gradient_checkpointing": "false"}))
    assert plain[("activations of every layer", "update")] == pytest.approx(m * S * D7.layers * (rest + REC_MLP * i))
    # on CPU (fp32 compute, fitted terms) nothing is cast and the MLP keeps its four buffers
    cpu = terms(cfg7(), device="cpu")[("one layer recomputed for backward", "update")]
    assert cpu == pytest.approx(m * S * ((7 * h + 2 * kv + 4 * i) * 4 + 8 * h))
    # without LoRA on the MLP or attention the card's formula is the plain one again
    bare = terms(cfg7(**{"lora.target_modules": "[down_proj]"}))[("one layer recomputed for backward", "update")]
    assert bare == pytest.approx(m * S * ((7 * h + 2 * kv + 4 * i) * b + 8 * h))


def test_no_grad_passes_with_recompute_chunk_hold_one_mlp_chunk():
    h, kv, i, b, m = D7.hidden, D7.kv_dim, D7.intermediate, 2, 2
    name = ("one layer's activations (no grad)", "passes")
    assert terms(cfg7())[name] == pytest.approx(m * S * ((4 * h + 2 * kv) * b + NOGRAD_MLP * i + 3 * h * b))
    got = terms(cfg7(**{"train.recompute_chunk": 1024}))[name]
    assert got == pytest.approx(m * S * ((4 * h + 2 * kv) * b + 3 * h * b) + 1024 * NOGRAD_MLP * i)
    # DAPO with one mini-batch and no KL runs no pass at all: the update's forward gives the old log-probs
    assert name not in terms(cfg7(**{"algorithm.name": "dapo"}))
    assert name in terms(cfg7(**{"algorithm.name": "dapo", "train.mini_batches": 2}))


def test_generation_has_a_prefill_and_a_decode_moment():
    """On a card the prefill (prompt-long cache, a whole prompt's activations) and the decode (full cache)
    do not coexist: the generation phase is the larger of the two, not their sum."""
    t = phase_terms(cfg7(), D7, "cuda", P, 8, R)
    gen = [x for x in t if x.phase == "generation"]
    prefill = sum(x.gib for x in gen if x.moment == "prefill")
    decode = sum(x.gib for x in gen if x.moment == "decode")
    always = sum(x.gib for x in gen if not x.moment)
    kv_prompt = 32 * P * D7.layers * 2 * D7.kv_dim * 2 / GIB
    assert next(x.gib for x in gen if x.name == "KV cache at the prefill") == pytest.approx(kv_prompt)
    fixed = sum(x.gib for x in t if x.phase == "fixed")
    assert sum_phases(t, "cuda")[1]["generation"] == pytest.approx(fixed + always + max(prefill, decode))
    assert sum_phases(t, "cuda")[1]["generation"] < fixed + always + prefill + decode


def test_dense_mask_only_for_eager_or_padded_batches():
    name = "[L, L] attention mask"
    mask = S * S * (1 + 2)
    one = terms(cfg7(**{"train.micro_batch_size": 1}))
    assert one[(name, "passes")] == 0 and one[(name, "update")] == 0  # SDPA, one unpadded row
    assert terms(cfg7())[(name, "update")] == pytest.approx(2 * mask)  # micro-batch 2: padded rows
    eager = terms(cfg7(**{"train.micro_batch_size": 1, "model.attn_implementation": "eager"}))
    assert eager[(name, "passes")] == pytest.approx(mask) and eager[(name, "update")] == pytest.approx(mask)
    forced = terms(cfg7(**{"train.micro_batch_size": 1}), dense_mask=True)
    assert forced[(name, "update")] == pytest.approx(mask)


def test_every_term_is_in_the_plan_output_with_its_formula(capsys):
    assert plan_main([str(RECIPE_7B), "rollout.generation_rows=3", "train.micro_batch_size=1",
                      "train.offload_activations=true", "train.recompute_chunk=1024", "--gpu-mem", "24GiB"]) == 0
    out = capsys.readouterr().out
    for text in ("3 row(s) per generate call, rollout.generation_rows=3", "offloaded: pinned host memory",
                 "MLP over chunks: 1024 x I x 14 B (train.recompute_chunk=1024)",
                 "none: sdpa attention with a causal flag", "pinned host memory for offloaded activations"):
        assert text in out


def test_generate_calls_and_options():
    assert generate_calls(4, 8, 0, 0) == (1, 32)
    assert generate_calls(4, 8, 1, 0) == (4, 8)
    assert generate_calls(4, 8, 3, 0) == (2, 24)  # 3 + 1 prompts
    assert generate_calls(4, 8, 1, 3) == (12, 3)  # ceil(8 / 3) per prompt
    assert generate_calls(4, 8, 0, 3) == (11, 3)  # rows of different prompts share a call
    opts = generation_options(4, 8)
    calls = [o["calls"] for o in opts]
    assert calls == sorted(calls) and len(set(calls)) == len(calls) and calls[0] == 1 and calls[-1] == 32
    assert opts[1] == {"rollout.generation_batch_size": 2, "rollout.generation_rows": 0, "calls": 2, "rows": 16}


def test_fit_is_the_first_option_in_cost_order_that_fits():
    cfg = cfg7(**{"rollout.max_new_tokens": 32768})
    found = fit(cfg7(), 24.0, D7, response_tokens=32768)
    assert found["fits"] and found["plan"]["fits"] and found["plan"]["needed_gib"] <= 24.0
    prompt = found["plan"]["shape"]["prompt_tokens"]

    def ok(settings, phases):
        c = with_settings(cfg, {k: v for k, v in settings.items() if "." in k})
        _, ph, _ = sum_phases(phase_terms(c, D7, "cuda", prompt, 8, 32768), "cuda")
        return all(_needed(ph[p], "cuda") <= 24.0 for p in phases)

    gens = generation_options(4, 8)
    k = gens.index(found["generation"])
    assert k > 0 and not any(ok(o, ("generation",)) for o in gens[:k])  # every faster generate setting misses
    trains = list(training_options(cfg, 32, 512))
    j = trains.index(found["training"])
    assert not any(ok(o, ("passes", "update")) for o in trains[:j])
    # the line to paste reproduces a plan that fits
    again = load_config(RECIPE_7B, override_line(found["overrides"]).split())
    assert plan(again, 24.0, D7)["fits"] and again.rollout.max_new_tokens == 32768


def test_fit_keeps_the_recipe_when_it_is_already_fastest_and_reports_nothing_fits():
    small = config_from_dict({"model": {"path": "Qwen/Qwen2.5-VL-7B-Instruct", "gradient_checkpointing": False},
                              "data": {"task": "count_shapes"},
                              "rollout": {"group_size": 2, "prompts_per_step": 1, "max_new_tokens": 16},
                              "train": {"micro_batch_size": 2, "logprob_chunk": 512}})
    found = fit(small, 80.0, D7)
    assert found["fits"] and found["overrides"] == {}
    none = fit(cfg7(), 4.0, D7)
    assert not none["fits"] and none["overrides"] == {}


def test_plan_main_fit_prints_the_line_to_paste(capsys):
    assert plan_main([str(RECIPE_7B), "--gpu-mem", "24GiB", "--fit", "--response-len", "32768"]) == 0
    out = capsys.readouterr().out
    assert f"paste: lite-srpo train {RECIPE_7B} rollout.max_new_tokens=32768" in out
    assert "longest response that fits" in out and "largest G" in out and "cost order" in out
    assert plan_main([str(RECIPE_7B), "--gpu-mem", "4GiB", "--fit"]) == 1
    assert "NOTHING FITS" in capsys.readouterr().out
    assert plan_main([str(RECIPE_7B), "--response-len", "100"]) == 2


def test_auto_fit_on_cpu_does_nothing_and_says_so(caplog):
    cfg = cfg7(**{"train.auto_fit": "true"})
    with caplog.at_level(logging.INFO, logger="lite_srpo.model.memory.fit"):
        assert auto_fit(cfg) is cfg
    assert "no CUDA device" in caplog.text
    off = cfg7()
    assert auto_fit(off) is off


def test_new_keys_are_validated():
    from lite_srpo.errors import ConfigError

    for bad in ("rollout.generation_rows=-1", "train.recompute_chunk=-5", "train.offload_activations=3",
                "train.auto_fit=maybe", "train.auto_fit_margin=0.95"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            cfg7(**dict([bad.split("=")]))
    assert math.isclose(plan(cfg7(), 24, D7)["peak_gib"], plan(cfg7(**{"train.auto_fit": "true"}), 24, D7)["peak_gib"])


def test_auto_fit_on_a_card_leaves_its_margin_and_logs_it(monkeypatch, caplog):
    """A 24 GiB card stood in for (no GPU here: the three torch.cuda calls auto_fit makes). The recipe, as
    written, does not fit; auto_fit's settings must fit the card less its default 10 % margin (21.6 GiB),
    where the fastest settings for the full 24 GiB do not (checked first, so the margin is what is tested)."""
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=24 * GIB))
    cfg = cfg7(**{"train.auto_fit": "true", "rollout.max_new_tokens": 32768})
    assert cfg.train.auto_fit_margin == 0.1
    full_card = with_settings(cfg, fit(cfg, 24.0)["settings"])
    assert plan(full_card, 24.0)["fits"] and not plan(full_card, 21.6)["fits"]
    with caplog.at_level(logging.INFO, logger="lite_srpo.model.memory.fit"):
        fitted = auto_fit(cfg)
    assert plan(fitted, 21.6)["fits"] and not plan(cfg, 24.0)["fits"]
    assert "24.0 GiB card, 21.6 GiB planned for (auto_fit_margin 0.1)" in caplog.text
    no_margin = auto_fit(cfg7(**{"train.auto_fit": "true", "rollout.max_new_tokens": 32768,
                                 "train.auto_fit_margin": "0"}))
    assert not plan(no_margin, 21.6)["fits"] and plan(no_margin, 24.0)["fits"]  # margin 0 packs the card


def test_a_card_counts_the_larger_update_moment_cpu_rss_both():
    """The streamed lm_head's buffers are gone before backward recomputes a decoder layer: on a card
    (live bytes) the update holds the larger of the two moments, on CPU (RSS, freed heap kept) both."""
    from lite_srpo.model.memory.plan import phase_gib
    from lite_srpo.model.memory.terms import Term

    terms = [Term("a", "update", 1.0, ""), Term("lm", "update", 3.0, "", "lm_head"),
             Term("layer", "update", 2.0, "", "layers"), Term("w", "update", 0.5, "", "layers"),
             Term("kv", "generation", 7.0, "")]
    assert phase_gib(terms, "update", live=True) == 1.0 + 3.0
    assert phase_gib(terms, "update", live=False) == 1.0 + 3.0 + 2.0 + 0.5
    assert phase_gib(terms, "generation", live=True) == 7.0
    # in the plan: the 7B recipe's update on a card is the sum minus the smaller moment
    t = phase_terms(cfg7(), D7, "cuda", P, 8, R)
    lm = sum(x.gib for x in t if x.phase == "update" and x.moment == "lm_head")
    layers = sum(x.gib for x in t if x.phase == "update" and x.moment == "layers")
    assert lm > 0 and layers > 0
    assert sum_phases(t, "cuda")[1]["update"] == pytest.approx(
        sum(x.gib for x in t if x.phase in ("fixed", "update")) - min(lm, layers))
    # without checkpointing every layer's activations live through the lm_head: no moments
    assert not any(x.moment for x in phase_terms(cfg7(**{"model.gradient_checkpointing": "false"}), D7, "cuda",
                                                 P, 8, R) if x.phase == "update")


def test_plan_weighs_the_pinned_host_buffers_against_the_machines_ram(capsys):
    """Offload moves the checkpointed layer inputs into pinned host memory: 12.6 GiB for the 7B recipe at
    32k-token responses. A 64 GiB machine holds them; a 16 GiB desktop does not (pinned <= half the RAM),
    and --fit on that desktop must not choose a setting whose pinned buffers overflow it."""
    from lite_srpo.model.memory.plan import HOST_PINNED_FRACTION

    cfg = cfg7(**{"rollout.max_new_tokens": 32768, "train.offload_activations": "true"})
    big = plan(cfg, 80.0, D7, host_mem_gib=64.0)
    small = plan(cfg, 80.0, D7, host_mem_gib=16.0)
    assert 12.0 < big["host_gib"] == small["host_gib"] < 13.0
    assert big["fits"] and big["host_fits"]
    assert not small["fits"] and not small["host_fits"] and small["needed_gib"] <= 80.0  # the card alone would fit
    assert plan(cfg, 80.0, D7)["fits"]  # no RAM given: the card alone decides (the function's default)
    for host in (16.0, 64.0):
        found = fit(cfg, 80.0, D7, host_mem_gib=host)
        assert found["fits"] and found["plan"]["host_gib"] <= HOST_PINNED_FRACTION * host
    assert plan_main([str(RECIPE_7B), "rollout.max_new_tokens=32768", "train.offload_activations=true",
                      "--gpu-mem", "80GiB", "--host-mem", "16GiB"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT 16.0 GiB of RAM" in out and "the machine's RAM would not hold the pinned buffers" in out
