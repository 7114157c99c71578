"""The shared 4-bit base: LoRA gradients after a no-grad generate, reference = base, one set of storages."""
import bitsandbytes as bnb
import pytest
import torch

from lite_srpo.config import LoraConfig, ModelConfig
from lite_srpo.data.prompts import ResponseFormat
from lite_srpo.data.tasks import make_task
from lite_srpo.model.policy import load_base, load_policy
from lite_srpo.rl.passes import rows_logprobs
from lite_srpo.rl.rollout import collate, encode_prompt, generate, pad_token_id

FMT = ResponseFormat()


def policy_for(path, four_bit=True, gc=True):
    return load_policy(ModelConfig(path=str(path), load_in_4bit=four_bit, dtype="float32", gradient_checkpointing=gc),
                       LoraConfig(r=8, alpha=16))


@pytest.fixture(scope="module")
def samples():
    return make_task("count_shapes", "train", 4, seed=0)


def lora_params(policy):
    return {n: p for n, p in policy.model.named_parameters() if "lora_" in n}


def test_4bit_layers_and_lora_placement(tiny_qwen):
    policy = policy_for(tiny_qwen)
    names = {n for n, m in policy.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert names, "no 4-bit layers"
    assert not any(".visual." in n or "lm_head" in n for n in names)
    loras = lora_params(policy)
    assert loras and all("language_model" in n for n in loras)
    assert all(p.requires_grad for p in loras.values())
    assert not any(p.requires_grad for n, p in policy.model.named_parameters() if "lora_" not in n)


def test_every_lora_param_gets_grad_after_no_grad_generate(tiny_qwen, samples):
    """The CPU repack trap (platform.md §3): an inference pass must not break later gradients."""
    policy = policy_for(tiny_qwen)
    prompts = [encode_prompt(policy, s, "structured", FMT) for s in samples[:2]]
    batch = generate(policy, prompts, group_size=2, max_new_tokens=6)
    with torch.no_grad():
        rows_logprobs(policy, batch, [0, 1], chunk=8, temperature=1.0)
    # make B non-zero so gradients reach A too
    for n, p in lora_params(policy).items():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    logp = rows_logprobs(policy, batch, list(range(batch.size)), chunk=8, temperature=1.0)
    (logp * batch.response_mask).sum().backward()
    missing = [n for n, p in lora_params(policy).items() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"LoRA params without gradient: {missing[:4]}"


def test_reference_equals_base_and_policy_differs_after_a_step(tiny_qwen, samples):
    policy = policy_for(tiny_qwen)
    prompts = [encode_prompt(policy, s, "structured", FMT) for s in samples[:2]]
    inputs, _ = collate(prompts, pad_token_id(policy), device=policy.device)
    base, _, _ = load_base(ModelConfig(path=str(tiny_qwen), load_in_4bit=True, dtype="float32"))
    with torch.no_grad():
        expected = base(**inputs).logits
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    batch = generate(policy, prompts, group_size=1, max_new_tokens=6, do_sample=False)
    loss = -(rows_logprobs(policy, batch, [0, 1], 8, 1.0) * batch.response_mask).sum()
    loss.backward()
    opt.step()
    with torch.no_grad():
        with policy.reference():
            ref = policy.hf(**inputs).logits
        with policy.policy():
            pol = policy.hf(**inputs).logits
    assert torch.allclose(ref, expected, atol=1e-5)
    assert (pol - ref).abs().max() > 1e-3


def test_one_base_storage_across_passes(tiny_qwen, samples):
    policy = policy_for(tiny_qwen)
    before = policy.base_parameter_pointers()
    prompts = [encode_prompt(policy, s, "structured", FMT) for s in samples[:2]]
    batch = generate(policy, prompts, group_size=2, max_new_tokens=5)
    with torch.no_grad():
        rows_logprobs(policy, batch, [0, 1], 8, 1.0)
        after_policy = policy.base_parameter_pointers()
        with policy.reference():
            rows_logprobs(policy, batch, [0, 1], 8, 1.0)
            after_ref = policy.base_parameter_pointers()
    assert before == after_policy == after_ref
    assert len(before) == len({p for p in before})  # no base tensor stored twice


def test_generate_logprobs_equal_teacher_forced(tiny_qwen, samples):
    policy = policy_for(tiny_qwen, four_bit=False, gc=False)
    prompts = [encode_prompt(policy, s, "structured", FMT) for s in samples[:3]]
    inputs, plen = collate(prompts, pad_token_id(policy), device=policy.device)
    torch.manual_seed(0)
    with torch.no_grad(), policy.generation_mode():
        out = policy.hf.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=1.0, top_k=None, top_p=None,
                                 num_return_sequences=2, output_logits=True, return_dict_in_generate=True,
                                 suppress_tokens=policy.suppressed_token_ids(), pad_token_id=pad_token_id(policy))
    resp = out.sequences[:, plen:]
    gen_logp = torch.stack([torch.log_softmax(l.float(), -1).gather(-1, resp[:, t:t + 1])[:, 0]
                            for t, l in enumerate(out.logits)], dim=1)
    from lite_srpo.rl.rollout import RolloutBatch, eos_token_ids, response_mask_from_ids
    mask, trunc = response_mask_from_ids(resp, eos_token_ids(policy))
    batch = RolloutBatch(prompts, [p for p in range(3) for _ in range(2)], resp, mask, [""] * 6, trunc)
    with torch.no_grad():
        tf = rows_logprobs(policy, batch, list(range(6)), chunk=5, temperature=1.0)
    m = mask.bool()
    assert (tf[m] - gen_logp[m]).abs().max() < 1e-4


def test_cpu_lm_head_is_column_major_and_changes_no_result(tiny_qwen, samples):
    """`load_policy` on CPU keeps the lm_head weight as the transpose of a contiguous [H, V] tensor (the faster
    decode layout, bench/lm_head_layout.py): same values as loaded; the same greedy tokens, log-probs and LoRA
    gradients as the row-major weight; a tied head is left alone."""
    from lite_srpo.model.policy import column_major_lm_head

    policy = policy_for(tiny_qwen)
    head = policy.hf.get_output_embeddings()
    vocab = head.weight.shape[0]
    assert head.weight.stride() == (1, vocab) and not head.weight.requires_grad
    base, _, _ = load_base(ModelConfig(path=str(tiny_qwen), load_in_4bit=True, dtype="float32"))
    assert base.get_output_embeddings().weight.is_contiguous()
    assert torch.equal(head.weight, base.get_output_embeddings().weight)
    for n, p in lora_params(policy).items():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    prompts = [encode_prompt(policy, s, "structured", FMT) for s in samples[:2]]
    results = {}
    for name, weight in (("column", head.weight), ("row", torch.nn.Parameter(head.weight.detach().contiguous(),
                                                                             requires_grad=False))):
        head.weight = weight
        batch = generate(policy, prompts, group_size=1, max_new_tokens=8, do_sample=False)
        policy.model.zero_grad(set_to_none=True)
        logp = rows_logprobs(policy, batch, [0, 1], chunk=4, temperature=1.0)
        (logp * batch.response_mask).sum().backward()
        results[name] = (batch.response_ids, logp.detach(), {n: p.grad.clone() for n, p in lora_params(policy).items()})
    assert torch.equal(results["column"][0], results["row"][0])
    assert (results["column"][1] - results["row"][1]).abs().max() < 1e-6
    assert max((results["column"][2][n] - g).abs().max() for n, g in results["row"][2].items()) < 1e-6
    base.get_output_embeddings().weight = base.get_input_embeddings().weight  # tied, as in Qwen2.5-VL-3B
    assert not column_major_lm_head(base) and base.get_output_embeddings().weight.is_contiguous()
    assert column_major_lm_head(load_base(ModelConfig(path=str(tiny_qwen), dtype="float32"))[0])


def test_missing_model_path_is_a_clear_error(tmp_path):
    from lite_srpo.errors import ModelError
    with pytest.raises(ModelError, match="does not exist"):
        load_base(ModelConfig(path=str(tmp_path / "nope")))
