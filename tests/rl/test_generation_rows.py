"""rollout.generation_rows: a group's G samples decoded in several generate calls give the same tokens,
texts and rewards as one call, because each response samples from its own (seed, step, prompt, sample)
stream."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_recipe
from lite_srpo.config import LoraConfig, ModelConfig, config_from_dict
from lite_srpo.data.prompts import ResponseFormat
from lite_srpo.data.tasks import make_task
from lite_srpo.model.policy import load_policy
from lite_srpo.rl.rollout import encode_prompt, generate
from lite_srpo.rl.train import train
from lite_srpo.run.checkpoint import latest_checkpoint
from lite_srpo.run.events import read_events
from lite_srpo.run.runtime import row_sampling_seed


@pytest.fixture(scope="module")
def policy_prompts(tiny_qwen):
    policy = load_policy(ModelConfig(path=str(tiny_qwen), load_in_4bit=True, dtype="float32"), LoraConfig(r=8, alpha=16))
    samples = make_task("count_shapes", "train", 2, seed=4)
    return policy, [encode_prompt(policy, s, "structured", ResponseFormat()) for s in samples]


def test_tokens_do_not_depend_on_the_row_split(policy_prompts):
    policy, prompts = policy_prompts
    g = 4

    def run(rows: int, batch_prompts: int = 0):
        return generate(policy, prompts, g, max_new_tokens=12, batch_prompts=batch_prompts, batch_rows=rows,
                        seed_of=lambda i: 123 + i, row_seed_of=lambda i, j: row_sampling_seed(0, 7, i, j))

    ref = run(g)  # one generate call per prompt
    assert ref.size == 2 * g and ref.prompt_of == [0] * g + [1] * g
    # the G samples of a prompt are different draws, not copies
    assert len({tuple(r.tolist()) for r in ref.response_ids[:g]}) > 1
    for rows, bp in ((3, 0), (1, 0), (8, 0), (3, 1)):  # 3 rows: calls that mix two prompts' samples
        other = run(rows, bp)
        width = min(ref.response_ids.shape[1], other.response_ids.shape[1])
        assert torch.equal(ref.response_mask.sum(1), other.response_mask.sum(1)), (rows, bp)
        assert torch.equal(ref.response_ids[:, :width], other.response_ids[:, :width]), (rows, bp)
        assert ref.texts == other.texts and torch.equal(ref.truncated, other.truncated)
    # today's path (no row cap) keeps its per-call stream: untouched by the new seeding
    plain = generate(policy, prompts, g, max_new_tokens=12, seed_of=lambda i: 123 + i)
    again = generate(policy, prompts, g, max_new_tokens=12, seed_of=lambda i: 123 + i)
    assert torch.equal(plain.response_ids, again.response_ids)


def test_hf_sampler_with_row_cap_is_refused(policy_prompts):
    policy, prompts = policy_prompts
    with pytest.raises(ValueError, match="generation_rows"):
        generate(policy, prompts, 2, max_new_tokens=4, top_p=0.9, batch_rows=1)


def test_a_training_step_is_the_same_with_any_row_split(tiny_qwen, tmp_path):
    """One RL step (2 prompts x G=2) with 3 rows per call (the second prompt split across calls) and with 1:
    same rewards, lengths, loss and adapter."""
    out = {}
    for rows in (3, 1):
        cfg = config_from_dict(tiny_recipe(tiny_qwen, tmp_path / f"r{rows}", train__steps=1, train__save_every=1,
                                           rollout__generation_rows=rows))
        run = train(cfg, quiet=True)
        metrics = next(e for e in read_events(run.run_dir / "events.jsonl") if e["type"] == "metrics")
        adapter = load_file(str(latest_checkpoint(run.run_dir) / "adapter" / "adapter_model.safetensors"))
        out[rows] = (metrics, adapter)
    (m3, a3), (m1, a1) = out[3], out[1]
    for key in ("reward/mean", "accuracy", "format_rate", "completion/len_mean", "loss/total"):
        assert m3[key] == m1[key], key
    assert all(torch.equal(a3[k], a1[k]) for k in a3)
