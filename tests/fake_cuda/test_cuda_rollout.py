"""The rollout and the no-grad scoring passes on (emulated) CUDA, for the four families: the project's loader
puts a bf16 base with fp32 adapters on cuda:0, `rollout.generate` decodes there with the KV cache (HF
generate, lite-srpo's sampler), and the passes keep their inputs, hidden states and log-probs on the card
until they hand `[N, R]` fp32 vectors back to the host. Any CPU tensor that meets a cuda one in an op fails
the way it fails on a GPU ("Expected all tensors to be on the same device"), so a missing `.to(device)` is a
test failure here and not a crash on the first GPU run."""
from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_flatten

from lite_srpo.data.prompts import ResponseFormat
from lite_srpo.model.policy import PolicyModel, resolve_dtype
from lite_srpo.model.streaming import token_logprobs
from lite_srpo.rl.passes import rows_logprobs, run_passes
from lite_srpo.rl.rollout import RolloutBatch, encode_prompt, generate
from lite_srpo.rl.sampling import InverseCdfSampler

from .conftest import CUDA0, FAMILIES
from .cuda_emulation import fake_cuda, is_emulated_cuda

pytestmark = pytest.mark.fake_cuda
FMT = ResponseFormat()
GROUP, NEW_TOKENS = 2, 4


class ScoreSpy(InverseCdfSampler):
    """lite-srpo's sampler, noting the device, dtype and width of the scores generate hands it."""

    def __init__(self) -> None:
        super().__init__(temperature=1.0)
        self.seen: list[tuple[torch.device, torch.dtype, int]] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.seen.append((scores.device, scores.dtype, scores.shape[-1]))
        return super().__call__(input_ids, scores)


def rollout(policy: PolicyModel, samples: list, sampler: InverseCdfSampler | None = None) -> RolloutBatch:
    prompts = [encode_prompt(policy, s, "structured", FMT) for s in samples]
    return generate(policy, prompts, group_size=GROUP, max_new_tokens=NEW_TOKENS, sampler=sampler)


def test_auto_dtype_is_bf16_on_cuda_and_fp32_on_cpu():
    assert resolve_dtype("auto", CUDA0) is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda", 3)) is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("float32", CUDA0) is torch.float32  # an explicit dtype wins


@pytest.mark.parametrize("arch", FAMILIES)
def test_load_policy_puts_a_bf16_base_and_fp32_adapters_on_the_card(cuda_policy, cpu_policy, arch):
    policy = cuda_policy(arch)
    assert policy.device == CUDA0 and policy.dtype is torch.bfloat16
    params = dict(policy.model.named_parameters())
    assert all(is_emulated_cuda(p) and p.device == CUDA0 for p in params.values())
    base = {p.dtype for n, p in params.items() if "lora_" not in n and p.is_floating_point()}
    lora = [p for n, p in params.items() if "lora_" in n]
    assert base == {torch.bfloat16}
    assert lora and all(p.dtype is torch.float32 and p.requires_grad for p in lora)
    assert not any(p.requires_grad for n, p in params.items() if "lora_" not in n)
    # the CPU-only decode layout (column-major lm_head, load_policy's `device.type == "cpu"` branch) is not used
    assert policy.hf.get_output_embeddings().weight.is_contiguous()
    # the same weights and buffers (rotary tables included) as the CPU load: nothing is lost on the way
    on_cpu = cpu_policy(arch).hf
    with fake_cuda(), torch.no_grad():
        for (name, a), (_, b) in zip([*policy.hf.named_parameters(), *policy.hf.named_buffers()],
                                     [*on_cpu.named_parameters(), *on_cpu.named_buffers()]):
            if "lora_A" not in name:  # A is drawn at random, B is 0
                assert a.shape == b.shape and torch.equal(a.cpu().to(b.dtype), b), name


@pytest.mark.parametrize("arch", FAMILIES)
def test_rollout_prefills_then_decodes_with_the_kv_cache_on_the_card(cuda_policy, samples, arch):
    policy = cuda_policy(arch)
    calls: list[dict] = []

    def note(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("past_key_values")
        layers = getattr(cache, "layers", None) or []
        keys = [layer.keys for layer in layers if getattr(layer, "keys", None) is not None]
        visual = (kwargs.get("pixel_values"), kwargs.get("mm_encoder_outputs"))  # generate encodes images first
        calls.append({"ids": kwargs["input_ids"], "cache": cache,
                      "visual": [t for t in tree_flatten(visual)[0] if isinstance(t, torch.Tensor)],
                      "cache_len": cache.get_seq_length() if cache is not None else 0,
                      "keys": {(k.device, k.dtype) for k in keys}})

    sampler = ScoreSpy()
    handle = policy.hf.register_forward_pre_hook(note, with_kwargs=True)
    try:
        with fake_cuda():
            batch = rollout(policy, samples, sampler)
    finally:
        handle.remove()
    n = GROUP * len(samples)
    steps = batch.response_ids.shape[1]
    assert batch.response_ids.device.type == "cpu" and batch.response_ids.shape[0] == n and 1 <= steps <= NEW_TOKENS
    assert batch.response_mask.shape == batch.response_ids.shape and len(batch.texts) == n
    # one prefill over the whole prompt (with the images, on the card), then one token per step from the cache
    assert len(calls) == steps
    prefill, decode = calls[0], calls[1:]
    assert prefill["ids"].device == CUDA0 and prefill["ids"].shape[0] == n and prefill["ids"].shape[1] > 1
    assert prefill["visual"] and {t.device for t in prefill["visual"]} == {CUDA0}
    assert torch.bfloat16 in {t.dtype for t in prefill["visual"]}  # the image features, from the bf16 tower
    prompt_len = prefill["ids"].shape[1]
    for k, step in enumerate(decode, start=1):
        assert step["ids"].shape == (n, 1) and step["ids"].device == CUDA0 and not step["visual"]
        assert step["cache"] is decode[0]["cache"] and step["cache_len"] == prompt_len + k - 1
        assert step["keys"] == {(CUDA0, torch.bfloat16)}  # the KV cache lives on the card, in bf16
    # the sampler draws from fp32 scores over the whole vocabulary, on the card
    assert sampler.seen and {(d, t) for d, t, _ in sampler.seen} == {(CUDA0, torch.float32)}
    assert len(sampler.seen) == steps


@pytest.mark.parametrize("arch", FAMILIES)
def test_scoring_passes_run_on_the_card_and_return_host_vectors(cuda_policy, cpu_policy, samples, arch):
    policy = cuda_policy(arch)
    with fake_cuda(), torch.no_grad():
        batch = rollout(policy, samples)
        n, r = batch.response_ids.shape
        rows = list(range(n))
        logp, hidden, inputs, prompt_len = rows_logprobs(policy, batch, rows, chunk=3, temperature=1.0,
                                                         keep_hidden=True)
        assert logp.shape == (n, r) and logp.device == CUDA0 and logp.dtype is torch.float32
        host_logp = logp.cpu()
        assert hidden.device == CUDA0 and hidden.dtype is torch.bfloat16
        assert inputs["input_ids"].device == CUDA0 and inputs["input_ids"].shape[1] == prompt_len + r
        with policy.reference():
            ref = rows_logprobs(policy, batch, rows, chunk=5, temperature=0.7)
        assert ref.device == CUDA0 and ref.shape == (n, r) and torch.isfinite(ref).all()
        roles = torch.zeros(n, r, dtype=torch.long)
        roles[:, 0] = 1  # the first token of every response is "perception": the removed pass drops it
        passes = dict(micro_batch=3, chunk=4, temperature=1.0, need_ref=True, need_corrupted=True,
                      need_removed=True, need_focus=True, roles=roles, seed=0,
                      corruption={"kind": "noise", "per_response": False, "params": {}})
        out = run_passes(policy, batch, **passes)
    with torch.no_grad():
        cache = batch.extras.pop("vision_cache", None)  # the step's cache belongs to the card's policy
        on_cpu = run_passes(cpu_policy(arch), batch, **passes)
    for name in ("old_logp", "ref_logp", "corrupted_logp", "removed_logp", "focus_cos", "focus"):
        v = getattr(out, name)
        assert v is not None and not is_emulated_cuda(v), name
        assert v.device.type == "cpu" and v.dtype is torch.float32 and v.shape == (n, r), name
        assert torch.isfinite(v[batch.response_mask.bool()]).all(), name
        # the CUDA branch computes what the CPU branch does (the same kernels here): any difference is a bug
        assert torch.allclose(v, getattr(on_cpu, name), atol=1e-5), name
    # the old pass is rows_logprobs over micro-batches: the same numbers as the one-batch call above
    assert torch.allclose(out.old_logp, host_logp, atol=2e-2)
    assert (out.removed_logp[:, 0] == 0).all()  # removed perception tokens get no log-prob
    if arch != "idefics3":  # vision_cache.py: each image encoded once per step, features kept on the card
        assert cache is not None and cache.encoded_images > 0
        features = [t for _, f in cache._store.values() for t in f.pooler]
        assert features and {(t.device, t.dtype) for t in features} == {(CUDA0, torch.bfloat16)}


def test_streamed_logprobs_keep_the_card_and_upcast_to_fp32(cuda_policy):
    policy = cuda_policy("qwen2_5_vl")
    weight, bias = policy.lm_head()
    with fake_cuda(), torch.no_grad():
        hidden = torch.randn(2, 5, weight.shape[1], device="cuda", dtype=torch.bfloat16)
        targets = torch.randint(0, weight.shape[0], (2, 5), device="cuda")
        targets[1, 4] = -100  # ignore index: log-prob 0
        logp = token_logprobs(hidden, weight, targets, chunk=3, lm_head_bias=bias)
        assert logp.device == CUDA0 and logp.dtype is torch.float32 and logp.shape == (2, 5)
        assert logp[1, 4].item() == 0.0 and (logp[0] < 0).all()
        # what the emulation is for: targets left on the host fail as they would on a GPU
        with pytest.raises(RuntimeError, match="same device"):
            token_logprobs(hidden, weight, targets.cpu(), chunk=3)
