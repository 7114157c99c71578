"""Sampling equals scoring with a real checkpoint's generation config in place.

The tiny model carries Qwen2.5-VL-7B-Instruct's published `generation_config.json` (repetition_penalty
1.05, temperature 0.1, top_p 0.001, top_k 1; `make_tiny(hub=...)`), and the real 152,064-token vocabulary.
transformers' `generate` merges such a file into every call, so unless rollouts build their own settings
(`rl/generation_settings.py`) tokens are drawn from a penalised distribution while the passes score the
plain softmax. The check is exact: the uniforms lite-srpo's sampler drew, put through the scoring pass's
distribution, give back every sampled token. The model is made to favour tokens it has seen (lm_head =
5 x the input embedding, the embedding scaled up), so a repetition penalty moves many draws. Broken by
hand (the swap and the explicit neutral settings removed from `rollout.generate`) it fails at the first
position.

The frequency check tests what the penalty moves: the probability mass of tokens already seen (prompt and
response so far). With lm_head = 10 x the embedding, the scoring distribution puts about half its mass
on seen tokens, and Qwen's 1.05 penalty would move it by about 0.11 per position (measured on this
model with transformers' own RepetitionPenaltyLogitsProcessor: an expected Z of -8.6 at 1,024 positions).
So the sampled share of seen tokens must match the share exp(logp) predicts, within 4 standard errors.
"""
from __future__ import annotations

import pytest
import torch

from lite_srpo.config import LoraConfig, ModelConfig
from lite_srpo.data.prompts import ResponseFormat
from lite_srpo.data.tasks import make_task
from lite_srpo.model.policy import load_policy
from lite_srpo.rl.passes import response_hidden
from lite_srpo.rl.rollout import collate, encode_prompt, generate, pad_token_id
from lite_srpo.rl.sampling import InverseCdfSampler, inverse_cdf_tokens
from lite_srpo.rl.step_parts import subset

HUB = "Qwen/Qwen2.5-VL-7B-Instruct"


@pytest.fixture(scope="module")
def repeating_policy(tmp_path_factory):
    from lite_srpo.model.tiny import make_tiny

    path = make_tiny("qwen2_5_vl", tmp_path_factory.mktemp("hub7b") / "m", hub=HUB)
    policy = load_policy(ModelConfig(path=str(path), load_in_4bit=True, dtype="float32"), LoraConfig(r=8, alpha=16))
    assert policy.hf.generation_config.repetition_penalty == 1.05  # the published file is what loaded
    embed = policy.hf.get_input_embeddings().weight
    policy.hf.get_output_embeddings().weight.data.copy_(embed.detach() * 5.0)
    embed.data.mul_(30.0)
    return policy


def scoring_logits(policy, batch) -> torch.Tensor:
    """Teacher-forced logits at every response position, vision tokens suppressed as in generate."""
    rows = [batch.prompts[p] for p in batch.prompt_of]
    inputs, plen = collate(rows, pad_token_id(policy), batch.response_ids, batch.response_mask, device=policy.device)
    with torch.no_grad():
        hidden = response_hidden(policy.hidden_states(inputs), plen, batch.response_ids.shape[1])
        logits = policy.hf.get_output_embeddings()(hidden).float()
    logits[..., policy.suppressed_token_ids()] = float("-inf")
    return logits


def test_each_draw_is_the_inverse_cdf_pick_of_the_scoring_distribution(repeating_policy):
    """Exact, for lite-srpo's sampler: the recorded uniforms and the scoring logits give back every token."""
    policy = repeating_policy
    prompts = [encode_prompt(policy, s, "structured", ResponseFormat()) for s in make_task("count_shapes", "train", 2, seed=2)]
    sampler = InverseCdfSampler(1.0, generator=torch.Generator().manual_seed(5), record=True)
    batch = generate(policy, prompts, group_size=8, max_new_tokens=12, sampler=sampler)
    logits = scoring_logits(policy, batch)
    mask = batch.response_mask.bool()
    for t, u in enumerate(sampler.uniforms):
        picks = inverse_cdf_tokens(logits[:, t], u)
        assert torch.equal(picks[mask[:, t]], batch.response_ids[mask[:, t], t]), t
    assert policy.hf.generation_config.repetition_penalty == 1.05  # the checkpoint's file is put back


@pytest.fixture(scope="module")
def copying_policy(tmp_path_factory):
    """Qwen2.5-VL-7B-Instruct's files on a tiny model that gives about half its mass to seen tokens."""
    from lite_srpo.model.tiny import make_tiny

    path = make_tiny("qwen2_5_vl", tmp_path_factory.mktemp("hub7b_copy") / "m", hub=HUB)
    policy = load_policy(ModelConfig(path=str(path), load_in_4bit=True, dtype="float32"), LoraConfig(r=8, alpha=16))
    embed = policy.hf.get_input_embeddings().weight
    policy.hf.get_output_embeddings().weight.data.copy_(embed.detach() * 10.0)
    embed.data.mul_(30.0)
    return policy


@pytest.mark.parametrize("top_p", [1.0, 0.999], ids=["lite_srpo_sampler", "hf_sampler"])
def test_sampled_share_of_seen_tokens_matches_the_scoring_distribution(copying_policy, top_p):
    """Frequencies, two-sided: observed draws of already-seen tokens against the mass exp(logp) gives them,
    for lite-srpo's full-distribution sampler and for HF's (top_p < 1, which truncates at most 0.001 of the
    mass per position: far below the check's resolution)."""
    policy = copying_policy
    prompts = [encode_prompt(policy, s, "structured", ResponseFormat()) for s in make_task("count_shapes", "train", 2, seed=2)]
    torch.manual_seed(0)
    # HF's sampler is slower over 152k tokens: half the rows (broken by hand at 64 rows it gave Z = -8.8,
    # so about -6 is expected at 32)
    batch = generate(policy, prompts, group_size=64 if top_p == 1.0 else 32, max_new_tokens=8, top_p=top_p)
    observed = expected = variance = 0.0
    for start in range(0, batch.size, 16):
        rows = list(range(start, min(start + 16, batch.size)))
        sub = subset(batch, rows)
        probs = torch.softmax(scoring_logits(policy, sub), dim=-1)  # [rows, R, V]
        for k, i in enumerate(rows):
            prompt = batch.prompts[batch.prompt_of[i]].input_ids
            for t in range(int(batch.response_mask[i].sum())):
                seen = torch.unique(torch.cat([prompt, batch.response_ids[i, :t]]))
                p = float(probs[k, t, seen].sum())
                observed += float(bool((seen == batch.response_ids[i, t]).any()))
                expected += p
                variance += p * (1 - p)
    z = (observed - expected) / variance ** 0.5
    assert expected > 100, "the check needs the scoring distribution to put real mass on seen tokens"
    assert abs(z) < 4.0, f"seen-token draws {observed:.0f} vs {expected:.1f} expected (Z = {z:.1f})"
