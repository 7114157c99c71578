"""The long-response keys reach the update: one real step with both on matches one with both off."""
import logging

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_recipe
from lite_srpo.config import config_from_dict
from lite_srpo.rl.train import train
from lite_srpo.run.checkpoint import latest_checkpoint
from lite_srpo.run.events import read_events


def one_step(model, root, **train_keys):
    overrides = {f"train__{k}": v for k, v in train_keys.items()}
    cfg = config_from_dict(tiny_recipe(model, root, train__steps=1, train__save_every=1, **overrides))
    train(cfg, quiet=True)
    metrics = next(e for e in read_events(cfg.run_dir / "events.jsonl") if e["type"] == "metrics")
    adapter = load_file(str(latest_checkpoint(cfg.run_dir) / "adapter" / "adapter_model.safetensors"))
    return metrics, adapter


def test_a_step_with_offload_and_chunked_recompute_matches_the_default(tiny_qwen, tmp_path, caplog):
    m0, a0 = one_step(tiny_qwen, tmp_path / "off")
    assert "offload_activations" not in caplog.text and "recompute_chunk" not in caplog.text
    with caplog.at_level(logging.INFO, logger="lite_srpo.model.policy"):
        m1, a1 = one_step(tiny_qwen, tmp_path / "on", offload_activations=True, recompute_chunk=4)
    # the run installed both on the policy it trained (2 decoder + 2 vision blocks checkpointed; 2 MLPs)
    assert "offload_activations: 4 checkpointed layers" in caplog.text
    assert "recompute_chunk: 2 decoder MLPs run 4 tokens" in caplog.text
    assert m0["reward/mean"] == m1["reward/mean"]  # same rollout: the features touch only the update
    for key in ("loss/total", "grad/norm"):
        assert m1[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-7), key
    assert a0.keys() == a1.keys()
    for k in a0:
        assert torch.allclose(a0[k], a1[k], rtol=0, atol=1e-6), k
