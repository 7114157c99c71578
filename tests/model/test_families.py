"""Every supported model family end to end on a tiny 4-bit model: one SRPO step (corrupted-image and
perception-removed passes), one greedy eval and a verified export. qwen2_5_vl is covered by test_train.py /
test_export.py; this file runs the other families through the same path (issue 12, item 10)."""
import json
import math

import pytest
import torch

from conftest import tiny_recipe
from lite_srpo.config import config_from_dict
from lite_srpo.model.export.cli import export_main
from lite_srpo.model.tiny import available_archs
from lite_srpo.rl import passes as passes_mod
from lite_srpo.rl import train as train_mod
from lite_srpo.rl.evaluate import Protocol, evaluate
from lite_srpo.rl.rollout import collate_visual, encode_visual
from lite_srpo.run.events import read_events

FAMILIES = ["qwen2_vl", "qwen3_vl", "idefics3"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_run(request, tiny_factory, tmp_path_factory):
    """One SRPO step on the family's tiny model, with spies on the corrupted-image copies and the passes."""
    arch = request.param
    assert arch in available_archs(), f"{arch}: the pinned transformers must build it (available: {available_archs()})"
    model = tiny_factory(arch)
    root = tmp_path_factory.mktemp(f"fam_{arch}")
    recipe = tiny_recipe(model, root, name=arch, train__steps=1, algorithm__name="srpo",
                         algorithm__dynamic_sampling=False, rollout__group_size=2, rollout__prompts_per_step=2,
                         rollout__max_new_tokens=8, data__n_train=4, data__n_test=2,
                         model__gradient_checkpointing=False)
    cfg = config_from_dict(recipe)
    seen: dict = {}
    real_corrupted, real_passes = passes_mod.corrupted_visuals, train_mod.run_passes

    def spy_corrupted(policy, batch, *args, **kwargs):
        out = real_corrupted(policy, batch, *args, **kwargs)
        seen["batch"], seen["corrupted"] = batch, out
        return out

    def spy_passes(*args, **kwargs):
        seen["passes"] = out = real_passes(*args, **kwargs)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(passes_mod, "corrupted_visuals", spy_corrupted)
        mp.setattr(train_mod, "run_passes", spy_passes)
        run = train_mod.train(cfg, quiet=True)
    return arch, run, seen


def test_srpo_step_runs_corrupted_and_removed_passes(family_run):
    arch, run, seen = family_run
    events = read_events(run.run_dir / "events.jsonl")
    metrics = [e for e in events if e["type"] == "metrics"]
    assert len(metrics) == 1 and events[-1]["status"] == "finished"
    m = metrics[0]
    assert m["loss/total"] is not None and math.isfinite(m["loss/total"])
    assert m["time/extra_passes"] > 0 and "srpo/weight_perception" in m
    assert m.get("update/skipped_nonfinite", 0.0) == 0.0

    out = seen["passes"]
    assert {"corrupted", "removed"} <= set(out.seconds), out.seconds
    batch = seen["batch"]
    mask = batch.response_mask.bool()
    assert mask.any()
    for name in ("old_logp", "corrupted_logp", "removed_logp"):
        t = getattr(out, name)
        assert t is not None and t.shape == batch.response_ids.shape, name
        assert torch.isfinite(t[mask]).all() and (t[mask] <= 0).all(), name
    # the model sees the corrupted image: teacher-forced log-probs of the same tokens move
    assert (out.corrupted_logp - out.old_logp)[mask].abs().max() > 1e-6


def test_corrupted_copies_match_the_original_layout(family_run):
    arch, run, seen = family_run
    batch, corrupted = seen["batch"], seen["corrupted"]
    assert corrupted is not None and len(corrupted) == batch.size
    for i, p in enumerate(batch.prompt_of):
        original = batch.prompts[p].visual
        copy = corrupted[i]
        assert set(copy) == set(original), (sorted(copy), sorted(original))
        for key in original:
            assert copy[key].shape == original[key].shape, key
            assert copy[key].dtype == original[key].dtype, key
        assert not torch.equal(copy["pixel_values"], original["pixel_values"]), f"row {i}: pixels not corrupted"
        for key in original:  # grid sizes, pixel masks: the layout of the image stays the same
            if key != "pixel_values":
                assert torch.equal(copy[key], original[key]), key
    # per-response corruption: the two responses of a prompt see different copies
    assert not torch.equal(corrupted[0]["pixel_values"], corrupted[1]["pixel_values"])
    collated = collate_visual(corrupted)
    originals = collate_visual([batch.prompts[p].visual for p in batch.prompt_of])
    assert {k: v.shape for k, v in collated.items()} == {k: v.shape for k, v in originals.items()}


def test_idefics3_collation_pads_the_image_axis(family_run):
    arch, run, seen = family_run
    if arch != "idefics3":
        pytest.skip("Idefics3-only layout ([1, n_images, C, H, W])")
    one = seen["batch"].prompts[0].visual
    images = seen["batch"].prompts[0].sample.images
    two = encode_visual(run.policy, images * 2)
    assert one["pixel_values"].dim() == 5 and two["pixel_values"].shape[1] == 2 * one["pixel_values"].shape[1]
    out = collate_visual([one, two])
    n = one["pixel_values"].shape[1]
    for key in one:
        assert out[key].shape[:2] == (2, 2 * n), key
        assert torch.equal(out[key][0, :n], one[key][0]) and torch.equal(out[key][1], two[key][0]), key
        assert not out[key][0, n:].any(), f"{key}: padding images must be all zero (Idefics3 drops them)"


def test_greedy_eval(family_run):
    arch, run, seen = family_run
    samples = run.test_set[:2]
    assert len(samples) == 2
    result = evaluate(run.policy, samples, run.cfg.data.template, run.fmt, protocol=Protocol("greedy"),
                      max_new_tokens=8)
    assert result["n_samples"] == 2 and result["n_responses"] == 2
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["format_rate"] <= 1.0
    assert 0 < result["mean_length"] <= 8


@pytest.mark.parametrize("mode", ["adapter", "merged"])
def test_export_verifies_logits(family_run, tmp_path, mode):
    arch, run, seen = family_run
    out = tmp_path / mode
    assert export_main([str(run.run_dir), "--mode", mode, "--out", str(out)]) == 0
    info = json.loads((out / "export.json").read_text())
    v = info["verification"]
    assert info["mode"] == mode and info["step"] == 1 and info["algorithm"] == "srpo"
    assert v["passed"] is True and v["tokens"] > 0 and v["top1_agreement"] == 1.0
    if mode == "adapter":
        assert v["max_abs_diff"] == 0.0
        assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    else:
        assert v["max_abs_diff"] < 1e-4
        assert any(out.glob("model*.safetensors"))
        assert "quantization_config" not in json.loads((out / "config.json").read_text())
