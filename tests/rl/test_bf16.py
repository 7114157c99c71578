"""bf16, the dtype `dtype: auto` gives on CUDA, against fp32 on one fixed batch of the warm model.

The rollout is sampled once (fp32); both precisions then score it: the no-grad passes and every
algorithm's token shaping. Roles come from the response text, so on one batch they are the same by
construction; what bf16 can move is the log-probs and everything computed from them. Tolerances, about
3x what was measured when written (seed 0, 2-core EPYC, 16 rows x 40 tokens):
- per-token log-probs of the four passes: mean |Δ logp| 0.0032-0.0044 (max 0.11) -> `LOGP_MEAN_TOL`;
- shaped token advantages, mean |Δ| / mean |A|: SRPO 0.0023, VPPO 0.0020, VGPO 0.0054, and exactly 0
  where the shaping does not read log-probs (GRPO, DAPO, Dr.GRPO, PAPO) -> `ADV_REL_TOL`; no sign flips.
The fp32 step and a bf16 step of every algorithm also run end to end in `test_train.py`.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_recipe
from lite_srpo.config import ALGORITHMS, config_from_dict
from lite_srpo.model.policy import load_policy
from lite_srpo.rl.algorithms import ALGORITHM_SPECS, ShapeInputs
from lite_srpo.rl.passes import run_passes
from lite_srpo.rl.rollout import encode_prompt, generate
from lite_srpo.rl.step_parts import corruption_params
from lite_srpo.rl.train import batch_roles, prompts_for_step, setup

LOGP_MEAN_TOL = 0.015
ADV_REL_TOL = 0.02
PASSES = ("old_logp", "ref_logp", "corrupted_logp", "removed_logp")


@pytest.fixture(scope="module")
def scored(warm_qwen, tmp_path_factory):
    recipe = tiny_recipe(warm_qwen, tmp_path_factory.mktemp("bf16"), name="bf16", model__gradient_checkpointing=False,
                         data__n_train=64, data__n_test=4, rollout__group_size=4, rollout__prompts_per_step=4,
                         rollout__max_new_tokens=40, train__save_every=0, algorithm__name="srpo",
                         algorithm__dynamic_sampling=False)
    cfg = config_from_dict(recipe)
    run = setup(cfg)
    torch.manual_seed(0)
    samples = prompts_for_step(run.train_set, 1, cfg.rollout.prompts_per_step, cfg.train.seed)
    batch = generate(run.policy, [encode_prompt(run.policy, s, cfg.data.template, run.fmt) for s in samples],
                     cfg.rollout.group_size, cfg.rollout.max_new_tokens)
    roles, _ = batch_roles(run, batch)
    bf16 = load_policy(dataclasses.replace(cfg.model, dtype="bfloat16"), cfg.lora)
    assert bf16.dtype == torch.bfloat16 and run.policy.dtype == torch.float32
    corruption = dict(kind=cfg.algorithm.corruption.kind, per_response=True, params=corruption_params(cfg))
    out = {}
    for name, policy in (("fp32", run.policy), ("bf16", bf16)):
        with torch.no_grad():
            out[name] = run_passes(policy, batch, micro_batch=16, chunk=256, temperature=1.0, need_ref=True,
                                   need_corrupted=True, need_removed=True, need_focus=True, roles=roles,
                                   corruption=corruption, seed=7).with_focus(batch.response_mask)
    return cfg, batch, roles, out


def test_bf16_passes_match_fp32(scored):
    _, batch, _, out = scored
    valid = batch.response_mask.bool()
    for field in PASSES:
        a, b = getattr(out["fp32"], field), getattr(out["bf16"], field)
        assert torch.isfinite(b[valid]).all(), field
        diff = (a - b)[valid].abs()
        assert float(diff.mean()) < LOGP_MEAN_TOL, (field, float(diff.mean()))
        assert float(diff.mean()) > 0, field  # bf16 really ran: its rounding shows


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_bf16_token_advantages_match_fp32(scored, algorithm):
    cfg, batch, roles, out = scored
    algo = dataclasses.replace(cfg.algorithm, name=algorithm)
    mask = batch.response_mask.float()
    adv = torch.linspace(-1, 1, batch.size)
    shaped = {k: ALGORITHM_SPECS[algorithm].shape(ShapeInputs(adv_seq=adv, mask=mask, roles=roles, passes=p,
                                                                 group_size=4, cfg=algo, step=1, total_steps=1))
              for k, p in out.items()}
    valid = mask.bool()
    a, b = shaped["fp32"].advantages[valid], shaped["bf16"].advantages[valid]
    assert torch.isfinite(b).all()
    rel = float((a - b).abs().mean() / a.abs().mean())
    assert rel < ADV_REL_TOL, (algorithm, rel)
    assert torch.equal(torch.sign(a), torch.sign(b))  # no token's advantage changes sign
