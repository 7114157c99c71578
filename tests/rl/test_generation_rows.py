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


def calls_rows(policy, monkeypatch) -> list[int]:
    """Record the rows of every HF generate call (the KV cache holds that many rows)."""
    rows: list[int] = []
    real = policy.hf.generate

    def counted(*args, **kwargs):
        rows.append(int(kwargs["input_ids"].shape[0]))
        return real(*args, **kwargs)

    monkeypatch.setattr(policy.hf, "generate", counted)
    return rows


def test_evaluation_keeps_the_row_cap(policy_prompts, monkeypatch):
    """A run's periodic evaluation decodes at most rollout.generation_rows rows per call (before, it decoded
    a whole batch of prompts at once, a KV cache the plan never counted); results do not change."""
    from lite_srpo.rl.evaluate import Protocol, evaluate

    policy, _ = policy_prompts
    samples = make_task("count_shapes", "test", 5, seed=0)
    rows = calls_rows(policy, monkeypatch)
    whole = evaluate(policy, samples, "structured", ResponseFormat(), max_new_tokens=8)
    assert rows == [5]
    rows.clear()
    capped = evaluate(policy, samples, "structured", ResponseFormat(), max_new_tokens=8, batch_rows=2)
    assert rows == [2, 2, 1]
    assert capped["item_accuracy"] == whole["item_accuracy"] and capped["mean_length"] == whole["mean_length"]
    rows.clear()
    torch.manual_seed(0)
    evaluate(policy, samples[:2], "structured", ResponseFormat(), protocol=Protocol("avg@k", k=3), max_new_tokens=4,
             batch_rows=2)
    assert rows == [2, 2, 2]


def test_out_of_memory_at_one_prompt_halves_the_rows_per_call(tiny_qwen, tmp_path, monkeypatch):
    """Micro-batch 1 and one prompt per call still run out of memory (injected: no GPU here) while a call
    decodes more than 2 rows: the retry halves rollout.generation_rows (G = 4 -> 2), the step completes, and
    the checkpoint keeps the lowered setting for a resume."""
    from lite_srpo.rl import train as train_mod

    cfg = config_from_dict(tiny_recipe(tiny_qwen, tmp_path, train__steps=1, train__micro_batch_size=1,
                                       train__save_every=1, rollout__prompts_per_step=1, rollout__group_size=4,
                                       rollout__max_new_tokens=6))
    run = train_mod.setup(cfg)
    real = run.policy.hf.generate
    rows: list[int] = []

    def limited(*args, **kwargs):
        rows.append(int(kwargs["input_ids"].shape[0]))
        if rows[-1] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected: no GPU here)")
        return real(*args, **kwargs)

    monkeypatch.setattr(run.policy.hf, "generate", limited)
    metrics = train_mod.step_with_oom_retry(run, 1)
    assert rows == [4, 2, 2] and run.generation_rows == 2 and metrics["completion/len_mean"] > 0
    warnings = [e["message"] for e in read_events(cfg.run_dir / "events.jsonl") if e["type"] == "warning"]
    assert warnings == ["out of memory: retrying with rollout.generation_rows -> 2"]
    train_mod.save(run, 1)
    resumed = train_mod.setup(cfg, resume=True)
    assert resumed.generation_rows == 2
