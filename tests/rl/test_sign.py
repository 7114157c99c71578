"""The sign test, end to end, for every algorithm: one real update (4-bit tiny Qwen2.5-VL, LoRA, the
algorithm's own no-grad passes and advantage shaping, `train.policy_update` with AdamW) must raise the
summed log-prob of the responses with a positive advantage and lower it for those with a negative one."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_recipe
from lite_srpo.config import ALGORITHMS, config_from_dict
from lite_srpo.data.prompts import render_reference_response
from lite_srpo.rl import train as train_mod
from lite_srpo.rl.algorithms import ShapeInputs
from lite_srpo.rl.passes import rows_logprobs, run_passes
from lite_srpo.rl.rollout import RolloutBatch, eos_token_ids, pad_token_id

# Sequence advantages of the four rows [prompt 0: +, -; prompt 1: +, -] (G = 2).
ADV = torch.tensor([1.0, -1.0, 1.0, -1.0])
WRONG = [("nothing is drawn here at all", "so I just guess a number"),
         ("I cannot see any picture", "guessing without looking")]


def hand_batch(run) -> RolloutBatch:
    """Two prompts × G=2 well-formed responses ending in EOS: row 2p is the sample's reference trace,
    row 2p+1 a wrong trace in other words, so the two signs pull on different tokens."""
    samples = run.train_set[:2]
    prompts = train_mod.encode_prompts(run, samples)
    tok, eos, pad = run.policy.tokenizer, eos_token_ids(run.policy)[0], pad_token_id(run.policy)
    texts, ids = [], []
    for s, (wrong_p, wrong_r) in zip(samples, WRONG):
        for text in (render_reference_response(s.meta["perception"], s.meta["reasoning"], s.answer, run.fmt),
                     render_reference_response(wrong_p, wrong_r, "7", run.fmt)):
            texts.append(text)
            ids.append(tok(text, add_special_tokens=False)["input_ids"] + [eos])
    width = max(map(len, ids))
    resp = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        resp[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    return RolloutBatch(prompts=prompts, prompt_of=[0, 0, 1, 1], response_ids=resp, response_mask=mask,
                        texts=texts, truncated=torch.zeros(len(ids), dtype=torch.bool))


@torch.no_grad()
def summed_logprobs(run, batch) -> torch.Tensor:
    with run.policy.policy():
        logp = rows_logprobs(run.policy, batch, list(range(batch.size)), run.cfg.train.logprob_chunk,
                             run.cfg.rollout.temperature)
    return (logp.float().cpu() * batch.response_mask).sum(dim=1)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_one_update_raises_positive_and_lowers_negative_rows(tiny_qwen, tmp_path, algorithm):
    cfg = config_from_dict(tiny_recipe(
        tiny_qwen, tmp_path, train__steps=1, train__micro_batch_size=2, train__mini_batches=1,
        algorithm__name=algorithm, algorithm__beta=0.0, algorithm__dynamic_sampling=False, optim__lr=1e-3,
        rollout__max_new_tokens=48))
    run = train_mod.setup(cfg)
    spec = run.spec
    batch = hand_batch(run)
    roles, violations = train_mod.batch_roles(run, batch)
    assert violations == 0  # well-formed, so SRPO's role weights are in play
    corruption = dict(kind=cfg.algorithm.corruption.kind, per_response=cfg.algorithm.corruption.per_response,
                      params=train_mod.corruption_params(cfg))
    passes = run_passes(run.policy, batch, micro_batch=run.micro_batch, chunk=cfg.train.logprob_chunk,
                        temperature=cfg.rollout.temperature, need_ref=False, need_corrupted=spec.needs_corrupted,
                        need_removed=spec.needs_removed(cfg.algorithm), need_focus=spec.needs_focus, roles=roles,
                        corruption=corruption, seed=1)
    x = ShapeInputs(adv_seq=ADV.clone(), mask=batch.response_mask.float(), roles=roles, passes=passes,
                    group_size=2, cfg=cfg.algorithm, step=1, total_steps=1)
    shaping = spec.shape(x)  # the algorithm's own token advantages (weights, masks, scales)
    assert ((shaping.advantages * x.mask).sum(dim=1) * ADV > 0).all(), "shaping flipped a sign"

    before = summed_logprobs(run, batch)
    assert torch.allclose(before, (passes.old_logp * batch.response_mask).sum(dim=1), atol=1e-4)
    metrics = train_mod.policy_update(run, batch, shaping, x)
    assert metrics["update/skipped_nonfinite"] == 0.0
    after = summed_logprobs(run, batch)
    delta = after - before
    pos, neg = ADV > 0, ADV < 0
    assert delta[pos].sum() > 0, f"{algorithm}: positive rows fell: {delta.tolist()}"
    assert delta[neg].sum() < 0, f"{algorithm}: negative rows rose: {delta.tolist()}"
    assert (delta[pos] > 0).all() and (delta[neg] < 0).all(), f"{algorithm}: {delta.tolist()}"
