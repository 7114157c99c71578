"""The separate no-grad old-log-prob pass is skipped only where it provably cannot differ (issue 13 §3).

With one mini-batch and no dropout (RL refuses LoRA dropout), the old policy is the policy of the
update's own forward, so `old = logp.detach()` (as TRL does) gives a ratio of exactly 1, as the old
pass does. The update must be bitwise the same with and without the pass, with the KL term on.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from test_accumulation import prepared, reset, trainable

from lite_srpo.rl import train as train_mod
from lite_srpo.rl.algorithms import ALGORITHM_SPECS, old_pass_needed


@pytest.mark.parametrize("algorithm", ["grpo", "dapo", "dr_grpo"])
def test_update_is_bitwise_the_same_without_the_old_pass(tiny_qwen, tmp_path, algorithm):
    run, batch, x, shaping = prepared(tiny_qwen, tmp_path, algorithm)
    assert run.cfg.algorithm.beta > 0 and x.passes.ref_logp is not None  # the reference pass still runs
    assert not old_pass_needed(run.spec, run.cfg.train.mini_batches)
    start = {n: p.detach().clone() for n, p in trainable(run).items()}
    results = []
    for passes in (x.passes, dataclasses.replace(x.passes, old_logp=None)):
        reset(run, start)
        metrics = train_mod.policy_update(run, batch, shaping, dataclasses.replace(x, passes=passes))
        results.append(({n: p.detach().clone() for n, p in trainable(run).items()}, metrics))
    (with_pass, m1), (without, m2) = results
    assert all(torch.equal(with_pass[n], without[n]) for n in with_pass)
    assert any(not torch.equal(with_pass[n], start[n]) for n in start)  # a real step was taken
    assert m1["loss/total"] == m2["loss/total"] and m1["grad/norm"] == m2["grad/norm"]


def test_the_old_pass_runs_where_it_can_differ_or_is_read():
    for name in ("grpo", "dapo", "dr_grpo"):
        assert not old_pass_needed(ALGORITHM_SPECS[name], mini_batches=1)
        assert old_pass_needed(ALGORITHM_SPECS[name], mini_batches=2)  # a step lands before the 2nd forward
    for name in ("srpo", "papo", "vppo", "vgpo"):  # their scores are computed from the old log-probs
        assert old_pass_needed(ALGORITHM_SPECS[name], mini_batches=1)


def test_a_grpo_step_runs_no_old_pass_and_an_srpo_step_does(tiny_qwen, tmp_path, monkeypatch):
    from conftest import tiny_recipe
    from lite_srpo.config import config_from_dict

    seen: list[bool] = []
    real = train_mod.run_passes

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out.old_logp is not None)
        return out

    monkeypatch.setattr(train_mod, "run_passes", spy)
    for algorithm in ("grpo", "srpo"):
        cfg = config_from_dict(tiny_recipe(tiny_qwen, tmp_path / algorithm, algorithm__name=algorithm,
                                           algorithm__dynamic_sampling=False, train__steps=1))
        train_mod.rl_step(train_mod.setup(cfg), 1)
    assert seen == [False, True]
