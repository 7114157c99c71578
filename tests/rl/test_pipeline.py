"""SFT warm-up, `pipeline.ensure_warmup` (once, atomically) and `compare` on a tiny model, for real."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml

from conftest import tiny_recipe
from lite_srpo.config import config_from_dict
from lite_srpo.data.prompts import ResponseFormat
from lite_srpo.data.splits import load_splits
from lite_srpo.model.policy import PolicyModel, load_base
from lite_srpo.rl import pipeline
from lite_srpo.rl.passes import rows_logprobs
from lite_srpo.rl.sft import sft_warmup, trace_batch
from lite_srpo.run.events import EventWriter, read_events


def trace_nll(cfg, model_path, samples) -> float:
    """Mean per-token NLL of the samples' reference traces under the model at `model_path` (fp32)."""
    model_cfg = dataclasses.replace(cfg.model, path=str(model_path), load_in_4bit=False)
    base, processor, family = load_base(model_cfg, torch.device("cpu"))
    policy = PolicyModel(model=base, processor=processor, family=family, device=torch.device("cpu"),
                         dtype=torch.float32, gradient_checkpointing=False)
    fmt = ResponseFormat(perception_tag=cfg.data.perception_tag, think_tag=cfg.data.think_tag,
                         template=cfg.data.template)
    batch = trace_batch(policy, samples, fmt, cfg.data.template)
    with torch.no_grad():
        logp = rows_logprobs(policy, batch, list(range(batch.size)), cfg.train.logprob_chunk, 1.0)
    mask = batch.response_mask.float()
    return float(-(logp * mask).sum() / mask.sum())


def test_sft_lowers_the_loss_on_its_traces(tiny_qwen, tmp_path):
    cfg = config_from_dict(tiny_recipe(tiny_qwen, tmp_path, sft__steps=8, sft__batch_size=4, sft__lr=3e-3,
                                       data__n_train=8))
    train_set, _ = load_splits(cfg.data, seed=cfg.train.seed)
    before = trace_nll(cfg, tiny_qwen, train_set)
    out = sft_warmup(cfg, train_set, tmp_path / "sft_model", events=EventWriter(tmp_path / "events.jsonl"))
    assert (out / "config.json").is_file()
    after = trace_nll(cfg, out, train_set)
    assert after < before - 0.5, (before, after)  # a random tiny model starts near ln(vocab)
    losses = [e["loss"] for e in read_events(tmp_path / "events.jsonl") if e["type"] == "sft"]
    assert len(losses) == 8 and losses[-1] < losses[0]


def test_ensure_warmup_runs_once_into_a_temporary_directory_renamed_into_place(tiny_qwen, tmp_path, monkeypatch):
    cfg = config_from_dict(tiny_recipe(tiny_qwen, tmp_path, sft__steps=1, sft__batch_size=2))
    target = cfg.run_dir / pipeline.WARMUP_DIR
    real = pipeline.sft_warmup
    calls = []

    def recording(cfg_, train_set, out_dir, events=None):
        calls.append(out_dir)
        assert not target.exists(), "the target must appear only when the warm-up is complete"
        return real(cfg_, train_set, out_dir, events=events)

    monkeypatch.setattr(pipeline, "sft_warmup", recording)
    warm = pipeline.ensure_warmup(cfg)
    assert len(calls) == 1
    assert calls[0].parent == cfg.run_dir and calls[0].name.startswith(f".tmp-{pipeline.WARMUP_DIR}-")
    assert (target / "config.json").is_file() and not calls[0].exists()
    assert not list(cfg.run_dir.glob(".tmp-*"))
    assert warm.model.path == str(target) and warm.sft.steps == 0
    stamp = (target / "config.json").stat().st_mtime_ns

    again = pipeline.ensure_warmup(cfg)  # on disk already: no second SFT
    assert len(calls) == 1 and again.model.path == str(target)
    assert (target / "config.json").stat().st_mtime_ns == stamp
    assert pipeline.ensure_warmup(dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, steps=0))).model.path \
        == str(tiny_qwen)  # no warm-up asked for: the model is used as it is


def test_interrupted_warmup_leaves_no_target_and_is_redone(tiny_qwen, tmp_path, monkeypatch):
    cfg = config_from_dict(tiny_recipe(tiny_qwen, tmp_path, sft__steps=1, sft__batch_size=2))
    target = cfg.run_dir / pipeline.WARMUP_DIR
    real = pipeline.sft_warmup

    def dies_after_writing(cfg_, train_set, out_dir, events=None):
        real(cfg_, train_set, out_dir, events=events)
        raise KeyboardInterrupt("killed after the files were written, before the rename")

    monkeypatch.setattr(pipeline, "sft_warmup", dies_after_writing)
    with pytest.raises(KeyboardInterrupt):
        pipeline.ensure_warmup(cfg)
    assert not target.exists()
    monkeypatch.setattr(pipeline, "sft_warmup", real)
    pipeline.ensure_warmup(cfg)
    assert (target / "config.json").is_file() and not list(cfg.run_dir.glob(".tmp-*"))


def test_compare_two_arms_one_step_writes_compare_json(tiny_qwen, tmp_path):
    from lite_srpo.eval.compare import run_compare

    recipe = tiny_recipe(tiny_qwen, tmp_path / "warm", train__steps=1, train__save_every=1, data__n_test=2,
                         rollout__max_new_tokens=4, sft__steps=1, sft__batch_size=2)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out_dir = tmp_path / "compare"
    result = run_compare(str(path), [], arms=("grpo", "dapo"), out_dir=str(out_dir))
    saved = json.loads((out_dir / "compare.json").read_text())
    assert saved["n_test"] == 2 and saved["steps"] == 1

    def arm_names(arms):
        if isinstance(arms, dict):
            return set(arms)
        return {a.get("arm", a.get("algorithm")) for a in arms}

    assert arm_names(saved["arms"]) == arm_names(result["arms"]) == {"grpo", "dapo"}
    for name in ("grpo", "dapo"):  # each arm trained its own run from the shared warm-up
        runs = list(out_dir.glob(f"compare_{name}*"))
        assert runs and all((r / "checkpoints").is_dir() for r in runs)
        recipe_of_run = yaml.safe_load((runs[0] / "recipe.yaml").read_text())
        assert recipe_of_run["algorithm"]["name"] == name
        assert recipe_of_run["model"]["path"].endswith(pipeline.WARMUP_DIR)
    # more seeds later (`--first-seed`): the same warm-up, seed train.seed + 2, merged by seed value
    more = run_compare(str(path), [], arms=("dapo",), out_dir=str(tmp_path / "more"), seeds=1, first_seed=2)
    seed0 = saved["runs"][0]["seed"]
    assert [r["seed"] for r in more["runs"]] == [seed0 + 2] and (tmp_path / "more" / f"compare_dapo_s{seed0 + 2}").is_dir()
    from lite_srpo.eval.compare_report import merge
    assert merge([saved, more])["arm_seeds"]["dapo"] == [seed0, seed0 + 2]


def test_bf16_sft_keeps_fp32_master_weights_so_small_updates_add_up(tiny_qwen, tmp_path):
    """At lr 2e-5, one AdamW step moves a weight by about 2e-5: under half a bf16 step for every weight
    of magnitude above ~0.01, so a pure-bf16 update rounds back and that weight never moves. With fp32
    master weights the steps add up and show after the final cast to bf16. (Checked by hand: with the
    warm-up loading the model in bf16, as it did before, `moved` was 0.0.)"""
    from safetensors.torch import load_file

    cfg = config_from_dict(tiny_recipe(tiny_qwen, tmp_path, sft__steps=12, sft__batch_size=4, sft__lr=2e-5,
                                       data__n_train=8, model__dtype="bfloat16"))
    train_set, _ = load_splits(cfg.data, seed=cfg.train.seed)
    out = sft_warmup(cfg, train_set, tmp_path / "sft_model")
    before, after = load_file(tiny_qwen / "model.safetensors"), load_file(out / "model.safetensors")
    key = next(k for k in after if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert after[key].dtype == torch.bfloat16  # saved in the recipe's dtype
    start = before[key].to(torch.bfloat16)
    large = start.float().abs() > 0.01
    moved = float((after[key] != start)[large].float().mean())
    assert moved > 0.5, moved
