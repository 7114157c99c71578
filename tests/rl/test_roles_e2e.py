"""SRPO's roles, passes and weights on real role tokens, the peers' own signals, and dynamic sampling —
end to end on the warm-up fixture (a tiny model that writes the structured format), not on a random
model whose responses are all format violations."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_recipe
from lite_srpo.config import config_from_dict
from lite_srpo.rewards import builtin as rewards
from lite_srpo.rl.algorithms import ShapeInputs, shape_srpo
from lite_srpo.rl.objectives.srpo import PERCEPTION, REASONING
from lite_srpo.rl.optim import lr_multiplier
from lite_srpo.rl.passes import run_passes
from lite_srpo.rl.rollout import encode_prompt, generate
from lite_srpo.rl.train import batch_roles, prompts_for_step, rl_step, setup, train
from lite_srpo.run.events import read_events

LAM = 0.5


def warm_recipe(warm_qwen, tmp_path, **over):
    base = dict(name="e2e", model__gradient_checkpointing=False, reward__weights={"accuracy": 0.9, "format": 0.1},
                data__n_train=64, data__n_test=4, rollout__group_size=4, rollout__prompts_per_step=4,
                rollout__max_new_tokens=40, train__micro_batch_size=16, train__logprob_chunk=256,
                train__save_every=0, algorithm__dynamic_sampling=False)
    base.update(over)
    return tiny_recipe(warm_qwen, tmp_path, **base)


@pytest.fixture(scope="module")
def srpo_run(warm_qwen, tmp_path_factory):
    cfg = config_from_dict(warm_recipe(warm_qwen, tmp_path_factory.mktemp("srpo"), algorithm__name="srpo"))
    run = setup(cfg)
    torch.manual_seed(0)
    samples = prompts_for_step(run.train_set, 1, cfg.rollout.prompts_per_step, cfg.train.seed)
    prompts = [encode_prompt(run.policy, s, cfg.data.template, run.fmt) for s in samples]
    batch = generate(run.policy, prompts, cfg.rollout.group_size, cfg.rollout.max_new_tokens)
    roles, violations = batch_roles(run, batch)
    a = cfg.algorithm
    passes = run_passes(run.policy, batch, micro_batch=16, chunk=256, temperature=1.0, need_ref=False,
                        need_corrupted=True, need_removed=True, need_focus=False, roles=roles,
                        corruption=dict(kind=a.corruption.kind, per_response=True,
                                        params={"patch": a.corruption.patch_size, "prob": a.corruption.prob}),
                        seed=7)
    return run, batch, roles, violations, passes


def test_srpo_roles_occur_on_warm_model_responses(srpo_run):
    run, batch, roles, violations, _ = srpo_run
    valid = batch.response_mask.bool()
    assert int(((roles == PERCEPTION) & valid).sum()) > 0 and int(((roles == REASONING) & valid).sum()) > 0
    assert violations < batch.size  # some responses have the structure ...
    # ... and every structured row has both roles, while a violation row is all "other"
    for i in range(batch.size):
        row = roles[i][valid[i]]
        assert bool((row == PERCEPTION).any()) == bool((row == REASONING).any())


def test_removed_and_corrupted_passes_differ_where_they_should(srpo_run):
    _, batch, roles, _, passes = srpo_run
    valid = batch.response_mask.bool()
    reasoning = valid & (roles == REASONING)
    perception = valid & (roles == PERCEPTION)
    # removing the perception text changes the context of every reasoning token
    assert (passes.removed_logp[reasoning] - passes.old_logp[reasoning]).abs().max() > 1e-4
    # perception tokens are left out of the removed pass: their positions are never written (stay 0)
    assert torch.equal(passes.removed_logp[perception], torch.zeros(int(perception.sum())))
    # the corrupted image changes the log-probs of the tokens that read the image
    assert (passes.corrupted_logp[perception] - passes.old_logp[perception]).abs().max() > 1e-4


def test_srpo_weights_on_real_roles(srpo_run):
    run, batch, roles, _, passes = srpo_run
    mask = batch.response_mask.float()
    adv = torch.linspace(-1, 1, batch.size)
    x = ShapeInputs(adv_seq=adv, mask=mask, roles=roles, passes=passes, group_size=4, cfg=run.cfg.algorithm)
    shaping = shape_srpo(x)
    w, valid = shaping.weights, mask.bool()
    is_role = valid & (roles > 0)
    assert (w[is_role] - 1).abs().max() > 0.05  # the signal moves weights
    assert bool((w[valid] > 0).all())  # positive: no token's advantage changes sign
    assert torch.equal(w[valid & ~is_role], torch.ones(int((valid & ~is_role).sum())))  # tags, EOS stay 1
    for i in range(batch.size):  # renormalised over each trajectory's role tokens
        if is_role[i].any():
            assert float(w[i][is_role[i]].mean()) == pytest.approx(1.0, abs=1e-5)
    raw = shape_srpo(ShapeInputs(adv_seq=adv, mask=mask, roles=roles, passes=passes, group_size=4,
                                 cfg=_no_renorm(run.cfg.algorithm)))
    # 1 ± λ: open in exact arithmetic, but tanh of a large deviation rounds to ±1 in float32
    assert float(raw.weights[is_role].min()) >= 1 - LAM and float(raw.weights[is_role].max()) <= 1 + LAM
    assert torch.equal(torch.sign(shaping.advantages[valid]), torch.sign(adv[:, None].expand_as(w)[valid]))
    m = shaping.metrics
    assert m["srpo/perception_frac"] > 0 and m["srpo/reasoning_frac"] > 0
    assert m["srpo/perception_score_mean"] > 0 and m["srpo/reasoning_score_mean"] > 0
    assert m["srpo/weight_other"] == 1.0


def _no_renorm(algo):
    import dataclasses

    return dataclasses.replace(algo, srpo=dataclasses.replace(algo.srpo, renormalize=False))


@pytest.mark.parametrize("consistency", ["corrupted", "perception_only"])
def test_srpo_consistency_variants_score_reasoning_tokens(warm_qwen, tmp_path, consistency):
    cfg = config_from_dict(warm_recipe(warm_qwen, tmp_path, algorithm__name="srpo", train__steps=1,
                                       algorithm__srpo={"consistency": consistency}))
    run = setup(cfg)
    torch.manual_seed(0)
    metrics = rl_step(run, 1)
    assert metrics["srpo/reasoning_frac"] > 0
    assert metrics["srpo/reasoning_score_mean"] > 0
    assert metrics["srpo/variant"] == {"corrupted": 2.0, "perception_only": 3.0}[consistency]
    assert metrics["time/extra_passes"] > 0


@pytest.mark.parametrize("algorithm,check", [
    ("papo", lambda m: m["papo/kl_prcp"] != 0 and m["papo/extra_loss"] != 0),
    ("vppo", lambda m: 0.2 < m["vppo/kept_frac"] < 0.6 and m["vppo/alpha_max"] > m["vppo/alpha_min"]),
    # the token factor's mean over valid tokens is 1 by construction unless a clamp bites: its spread shows
    ("vgpo", lambda m: m["vgpo/token_factor_max"] - m["vgpo/token_factor_min"] > 0.1
     and m["vgpo/traj_factor_mean"] != 1.0),
])
def test_peer_signals_are_live_on_warm_model(warm_qwen, tmp_path, algorithm, check):
    cfg = config_from_dict(warm_recipe(warm_qwen, tmp_path, algorithm__name=algorithm, train__steps=1))
    run = setup(cfg)
    torch.manual_seed(0)
    metrics = rl_step(run, 1)
    assert check(metrics), {k: v for k, v in metrics.items() if k.startswith(algorithm)}


# ------------------------------------------------------------------------------------------ dynamic sampling


@pytest.fixture
def odd_prompts_constant(monkeypatch):
    """A reward that varies within the groups of even-indexed train items and is constant (0) for odd ones,
    so dynamic sampling must keep exactly the even groups."""
    def reward(response, sample, fmt):
        index = int(sample.source.rsplit("/", 1)[1])
        return 0.0 if index % 2 else len(response) / 50.0

    monkeypatch.setitem(rewards.REWARD_FUNCTIONS, "test_parity", reward)


def test_dynamic_sampling_keeps_the_groups_with_signal(warm_qwen, tmp_path, odd_prompts_constant):
    cfg = config_from_dict(warm_recipe(warm_qwen, tmp_path, algorithm__name="srpo", train__steps=1,
                                       algorithm__dynamic_sampling=True, algorithm__filter_on="reward",
                                       algorithm__overlong="none", reward__weights={"test_parity": 1.0}))
    run = setup(cfg)
    samples = prompts_for_step(run.train_set, 1, cfg.rollout.prompts_per_step, cfg.train.seed)
    even = [int(s.source.rsplit("/", 1)[1]) % 2 == 0 for s in samples]
    assert 0 < sum(even) < len(even), "the test needs both kinds of prompts in step 1"
    torch.manual_seed(0)
    metrics = rl_step(run, 1)
    assert metrics["dynamic_sampling/kept_groups_frac"] == pytest.approx(sum(even) / len(even))
    assert "update/skipped_no_signal" not in metrics
    # roles, passes and the update ran on the sub-batch: token shares are over the kept rows only
    assert metrics["srpo/perception_frac"] > 0 and metrics["time/extra_passes"] > 0
    assert metrics["loss/total"] != 0


def test_a_step_with_no_group_kept_still_advances_the_schedule(warm_qwen, tmp_path, monkeypatch):
    monkeypatch.setitem(rewards.REWARD_FUNCTIONS, "test_constant", lambda response, sample, fmt: 1.0)
    cfg = config_from_dict(warm_recipe(warm_qwen, tmp_path, algorithm__name="dapo", train__steps=4,
                                       algorithm__dynamic_sampling=True, algorithm__filter_on="reward",
                                       algorithm__overlong="none", reward__weights={"test_constant": 1.0},
                                       optim__schedule="linear", optim__warmup_steps=1, optim__lr=1e-3))
    run = train(cfg, quiet=True)
    metrics = [e for e in read_events(run.run_dir / "events.jsonl") if e["type"] == "metrics"]
    assert [e["update/skipped_no_signal"] for e in metrics] == [1.0] * 4
    # the LR follows the step number: after step s the scheduler has stepped s times
    expected = [1e-3 * lr_multiplier(s, 1, 4, "linear") for s in range(1, 5)]
    assert [e["optim/lr"] for e in metrics] == pytest.approx(expected)


def test_filter_on_accuracy_drops_all_wrong_groups_that_differ_only_in_format():
    from lite_srpo.rl.objectives.grpo import dynamic_sampling_keep
    from lite_srpo.rl.step_parts import filter_key

    cfg = config_from_dict({"model": {"path": "m"}, "data": {"task": "count_shapes"}, "algorithm": {"name": "dapo"}})
    per_fn = {"accuracy": [0, 0, 0, 0, 1, 0, 1, 0], "format": [1, 0, 1, 1, 1, 1, 0, 1]}
    total = torch.tensor([0.9 * a + 0.1 * f for a, f in zip(per_fn["accuracy"], per_fn["format"])])
    assert cfg.algorithm.filter_on == "accuracy"  # the default, as DAPO's and EasyR1's code
    assert dynamic_sampling_keep(filter_key(cfg, total, per_fn), 4).tolist() == [False, True]
    by_reward = config_from_dict({"model": {"path": "m"}, "data": {"task": "count_shapes"},
                                  "algorithm": {"name": "dapo", "filter_on": "reward"}})
    assert dynamic_sampling_keep(filter_key(by_reward, total, per_fn), 4).tolist() == [True, True]


@pytest.mark.parametrize("weighted", ["perception", "reasoning"])
def test_srpo_weighted_roles_leaves_the_other_role_at_one(warm_qwen, tmp_path, weighted):
    """The ablation keys run for real: the unweighted role's tokens keep weight exactly 1, the weighted
    role's weights move, and `perception` alone skips the removed-perception pass."""
    from lite_srpo.rl.algorithms import ALGORITHM_SPECS

    cfg = config_from_dict(warm_recipe(warm_qwen, tmp_path, algorithm__name="srpo", train__steps=1,
                                       algorithm__srpo={"weighted_roles": weighted}))
    run = setup(cfg)
    torch.manual_seed(0)
    metrics = rl_step(run, 1)
    fixed, moved = ("reasoning", "perception") if weighted == "perception" else ("perception", "reasoning")
    assert metrics[f"srpo/{fixed}_frac"] > 0 and metrics[f"srpo/{moved}_frac"] > 0
    assert metrics[f"srpo/weight_{fixed}"] == 1.0
    assert metrics["srpo/weight_max"] > 1.0 > metrics["srpo/weight_min"]  # the weighted role's weights spread
    assert ALGORITHM_SPECS["srpo"].needs_removed(cfg.algorithm) == (weighted == "reasoning")


def test_perception_only_removed_pass_runs_on_the_corrupted_images(srpo_run):
    """`consistency: perception_only` must score the perception-removed response with the corrupted image:
    its log-probs differ from the clean-image removed pass on reasoning tokens, and equal the removed pass
    recomputed by hand on the corrupted images of the same seed."""
    from lite_srpo.rl.passes import corrupted_visuals, perception_removed_logprobs

    run, batch, roles, _, clean = srpo_run
    a = run.cfg.algorithm
    corruption = dict(kind=a.corruption.kind, per_response=True,
                      params={"patch": a.corruption.patch_size, "prob": a.corruption.prob})
    po = run_passes(run.policy, batch, micro_batch=16, chunk=256, temperature=1.0, need_ref=False,
                    need_corrupted=True, need_removed=True, need_focus=False, roles=roles, corruption=corruption,
                    seed=7, removed_on_corrupted=True)
    reasoning = (roles == REASONING) & batch.response_mask.bool()
    assert int(reasoning.sum()) > 0
    assert (po.removed_logp[reasoning] - clean.removed_logp[reasoning]).abs().max() > 1e-3
    with run.policy.policy():
        visuals = corrupted_visuals(run.policy, batch, seed=7, **corruption)
        by_hand = perception_removed_logprobs(run.policy, batch, roles, 16, 256, 1.0, visual_override=visuals)
    assert torch.allclose(po.removed_logp[reasoning], by_hand[reasoning], atol=1e-5)
    assert torch.equal(po.corrupted_logp, clean.corrupted_logp)  # the same corrupted images in both runs
