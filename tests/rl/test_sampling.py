"""Inverse-CDF sampling in `generate`: the same distribution as softmax sampling, and the tokens it picks
in a real rollout are the ones teacher forcing's distribution gives for the same uniform draws."""
from __future__ import annotations

import torch

from lite_srpo.config import LoraConfig, ModelConfig
from lite_srpo.data.prompts import ResponseFormat
from lite_srpo.data.tasks import make_task
from lite_srpo.model.policy import load_policy
from lite_srpo.rl.passes import rows_logprobs
from lite_srpo.rl.rollout import encode_prompt, generate
from lite_srpo.rl.sampling import InverseCdfSampler, inverse_cdf_tokens

FMT = ResponseFormat()


def test_frequencies_match_softmax_including_tiny_and_zero_probabilities():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0, float("-inf"), 0.5, 1.5]])
    temperature = 0.7
    sampler = InverseCdfSampler(temperature, generator=g)
    n = 200_000
    draws = sampler.sample(logits.expand(n, -1))
    freq = torch.bincount(draws, minlength=logits.shape[1]).double() / n
    p = torch.softmax(logits[0].double() / temperature, dim=-1)
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * se + 1e-12).all(), (freq, p)
    assert freq[5] == 0  # a suppressed token (-inf) is never drawn
    onehot = sampler(None, logits)
    assert torch.isinf(onehot).sum() == logits.shape[1] - 1 and onehot.argmax() == (onehot == 0).nonzero()[0, 1]


def test_rollout_tokens_are_inverse_cdf_draws_of_the_teacher_forced_distribution(tiny_qwen):
    """Each sampled token equals the inverse-CDF pick, under the teacher-forced log-probs (with the
    vision tokens suppressed, as in generate), for the uniform the sampler drew at that step."""
    policy = load_policy(ModelConfig(path=str(tiny_qwen), load_in_4bit=True, dtype="float32"), LoraConfig(r=8, alpha=16))
    samples = make_task("count_shapes", "train", 2, seed=1)
    prompts = [encode_prompt(policy, s, "structured", FMT) for s in samples]
    temperature = 0.8
    sampler = InverseCdfSampler(temperature, generator=torch.Generator().manual_seed(3), record=True)
    batch = generate(policy, prompts, group_size=3, max_new_tokens=10, temperature=temperature, sampler=sampler)
    assert batch.size == 6 and batch.prompt_of == [0, 0, 0, 1, 1, 1]
    assert len(sampler.uniforms) == batch.response_ids.shape[1]
    suppressed = policy.suppressed_token_ids()
    # teacher-forced log-probs of every vocabulary entry at every response position
    from lite_srpo.rl.passes import response_hidden
    from lite_srpo.rl.rollout import collate, pad_token_id

    rows = [batch.prompts[p] for p in batch.prompt_of]
    inputs, plen = collate(rows, pad_token_id(policy), batch.response_ids, batch.response_mask, device=policy.device)
    with torch.no_grad():
        hidden = response_hidden(policy.hidden_states(inputs), plen, batch.response_ids.shape[1])
        raw_logits = policy.hf.get_output_embeddings()(hidden).float()
    logits = raw_logits.clone()
    logits[..., suppressed] = float("-inf")
    mask = batch.response_mask.bool()
    checked = 0
    for t, u in enumerate(sampler.uniforms):
        live = mask[:, t]
        picks = inverse_cdf_tokens(logits[:, t], u, temperature)
        assert torch.equal(picks[live], batch.response_ids[live, t]), t
        checked += int(live.sum())
    assert checked == int(mask.sum()) > 0
    # and the training pass scores them at the same temperature, over the unsuppressed vocabulary (the
    # trainer never suppresses): two-sided, so a wrong temperature or a stray suppression fails
    with torch.no_grad():
        logp = rows_logprobs(policy, batch, list(range(batch.size)), 16, temperature)
    ref = torch.log_softmax(raw_logits / temperature, dim=-1).gather(-1, batch.response_ids[..., None]).squeeze(-1)
    assert torch.allclose(logp[mask], ref[mask], atol=1e-5, rtol=0)
    wrong_t = torch.log_softmax(raw_logits, dim=-1).gather(-1, batch.response_ids[..., None]).squeeze(-1)
    assert not torch.allclose(logp[mask], wrong_t[mask], atol=1e-5, rtol=0)  # T matters at these logits


def test_hf_sampler_is_kept_for_truncated_sampling_and_on_request(tiny_qwen):
    policy = load_policy(ModelConfig(path=str(tiny_qwen), load_in_4bit=True, dtype="float32"), LoraConfig(r=8, alpha=16))
    prompts = [encode_prompt(policy, s, "structured", FMT) for s in make_task("count_shapes", "train", 1, seed=2)]
    sampler = InverseCdfSampler(1.0, record=True)
    generate(policy, prompts, group_size=2, max_new_tokens=4, top_p=0.9, sampler=sampler)
    assert sampler.uniforms == []  # top_p < 1: HF's own sampler ran
    batch = generate(policy, prompts, group_size=2, max_new_tokens=4, sampler=False)
    assert batch.size == 2


def test_suppressed_ids_are_never_drawn_and_the_rest_keeps_its_distribution():
    """The sampler's own suppression (a few -inf columns) equals HF's vocabulary-wide processor."""
    scores = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]]).repeat(4000, 1)
    suppressed = InverseCdfSampler(1.0, generator=torch.Generator().manual_seed(0), suppress=[1, 3]).sample(scores)
    masked = scores.clone()
    masked[:, [1, 3]] = float("-inf")
    reference = InverseCdfSampler(1.0, generator=torch.Generator().manual_seed(0)).sample(masked)
    assert torch.equal(suppressed, reference)  # same draws, same tokens
    assert not torch.isin(suppressed, torch.tensor([1, 3])).any()
