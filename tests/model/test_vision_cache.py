"""Vision features once per image per step: same log-probs as the uncached path, one encode per image."""
from __future__ import annotations

import pytest
import torch

from lite_srpo.config import LoraConfig, ModelConfig
from lite_srpo.data.prompts import ResponseFormat
from lite_srpo.data.tasks import make_task
from lite_srpo.model.policy import load_policy
from lite_srpo.model.vision_cache import KEY, VisionFeatureCache, supports_cache
from lite_srpo.rl.passes import corrupted_visuals, rows_logprobs, run_passes
from lite_srpo.rl.rollout import encode_prompt, generate

FMT = ResponseFormat()
CORRUPTION = {"kind": "patch", "per_response": True, "params": {"patch": 14, "prob": 0.6}}


def policy_for(path, vision_lora=False):
    return load_policy(ModelConfig(path=str(path), load_in_4bit=True, dtype="float32", gradient_checkpointing=True),
                       LoraConfig(r=8, alpha=16, vision=vision_lora))


def rollout(policy, n_prompts=2, group=2, tokens=8):
    samples = make_task("count_shapes", "train", n_prompts, seed=3)
    prompts = [encode_prompt(policy, s, "structured", FMT) for s in samples]
    torch.manual_seed(0)
    return generate(policy, prompts, group_size=group, max_new_tokens=tokens)


def count_images(policy):
    """A forward pre-hook that adds the rows of each call's grid_thw (one row per image)."""
    counter = {"images": 0, "calls": 0}

    def hook(module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        counter["images"] += int(grid.shape[0])
        counter["calls"] += 1

    handle = policy.hf.model.visual.register_forward_pre_hook(hook, with_kwargs=True)
    return counter, handle


@pytest.fixture(scope="module")
def policy(tiny_qwen):
    p = policy_for(tiny_qwen)
    for n, prm in p.model.named_parameters():  # a non-trivial adapter, so adapter on/off differ
        if "lora_B" in n:
            torch.nn.init.normal_(prm, std=0.05)
    return p


def test_supported_for_qwen_with_a_frozen_tower_only(policy, tiny_qwen):
    assert supports_cache(policy)
    assert not supports_cache(policy_for(tiny_qwen, vision_lora=True))


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"])
def test_cached_logprobs_equal_uncached_in_every_pass(tiny_factory, arch):
    from lite_srpo.model.tiny import available_archs

    assert arch in available_archs(), f"{arch}: the pinned transformers must build it"
    policy = policy_for(tiny_factory(arch))
    for n, prm in policy.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(prm, std=0.05)
    assert supports_cache(policy)
    batch = rollout(policy)
    rows = list(range(batch.size))
    visuals = corrupted_visuals(policy, batch, seed=5, **CORRUPTION)
    with torch.no_grad():
        for ctx in (policy.policy, policy.reference):
            with ctx():
                for override in (None, visuals):
                    plain = rows_logprobs(policy, batch, rows, 8, 1.0, visual_override=override, vision_cache=False)
                    cached = rows_logprobs(policy, batch, rows, 8, 1.0, visual_override=override)
                    err = float((plain - cached).abs().max())
                    assert err <= 1e-5, (ctx.__name__, override is None, err)  # fp32 round-off of ~6-nat values
                    assert (plain != 0).any()
    assert isinstance(batch.extras[KEY], VisionFeatureCache)
    # with gradients (the update): same values and the same LoRA gradients
    grads = []
    for flag in (False, None):
        policy.model.zero_grad(set_to_none=True)
        logp = rows_logprobs(policy, batch, rows, 8, 1.0, vision_cache=flag)
        (logp * batch.response_mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n
    policy.model.zero_grad(set_to_none=True)


def test_the_tower_runs_once_per_image_per_step(policy):
    """SRPO's passes (old, reference, corrupted per response, perception removed) and the update forward:
    2 prompts x 1 image + 4 corrupted copies = 6 images encoded; without the cache, every pass re-encodes."""
    from lite_srpo.data.prompts import token_roles

    batch = rollout(policy, n_prompts=2, group=2)
    roles = torch.zeros_like(batch.response_ids)
    for i in range(batch.size):
        n = int(batch.response_mask[i].sum())
        roles[i, :n] = torch.tensor(token_roles(policy.tokenizer, batch.response_ids[i, :n].tolist(), FMT)[0])
    roles[:, :2] = 1  # make sure the perception-removed pass has something to remove
    counter, handle = count_images(policy)
    try:
        run_passes(policy, batch, micro_batch=2, chunk=8, temperature=1.0, need_ref=True, need_corrupted=True,
                   need_removed=True, need_focus=False, roles=roles, corruption=CORRUPTION, seed=1)
        for rows in ([0, 1], [2, 3]):  # the update's forwards
            rows_logprobs(policy, batch, rows, 8, 1.0).sum().backward()
        policy.model.zero_grad(set_to_none=True)
    finally:
        handle.remove()
    n_images = len(batch.prompts) + batch.size  # originals + one corrupted copy per response
    assert counter["images"] == n_images == batch.extras[KEY].encoded_images

    fresh = rollout(policy, n_prompts=2, group=2)
    counter, handle = count_images(policy)
    try:
        with torch.no_grad():
            for _ in range(3):  # three passes over the batch without the cache
                for rows in ([0, 1], [2, 3]):
                    rows_logprobs(policy, fresh, rows, 8, 1.0, vision_cache=False)
    finally:
        handle.remove()
    assert counter["images"] == 3 * fresh.size  # every row's image, every pass


def test_families_without_precomputed_features_keep_the_pixel_path(tiny_factory):
    from lite_srpo.model.tiny import available_archs

    assert "idefics3" in available_archs(), "idefics3: the pinned transformers must build it"
    policy = policy_for(tiny_factory("idefics3"))
    assert not supports_cache(policy)
    batch = rollout(policy, n_prompts=1, group=2, tokens=4)
    with torch.no_grad():
        a = rows_logprobs(policy, batch, [0, 1], 8, 1.0)
        b = rows_logprobs(policy, batch, [0, 1], 8, 1.0, vision_cache=False)
    assert batch.extras[KEY] is None and torch.equal(a, b)
