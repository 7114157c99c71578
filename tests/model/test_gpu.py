"""Opt-in GPU checks (`pytest -m gpu tests/model/test_gpu.py`): the planner and the streamed logits on CUDA.

Deselected by default (pyproject: `-m 'not gpu'`); each test also skips with a reason when CUDA or
bitsandbytes is missing, so `-m gpu` on a CPU machine reports skips, not failures.
"""
from __future__ import annotations

import tempfile

import pytest

pytestmark = pytest.mark.gpu


def _need_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pytest.skip("needs bitsandbytes (see bench/gpu_wheels.md)")


@pytest.fixture(scope="module")
def bench_model(tmp_path_factory):
    _need_cuda()
    from bench.common import build_bench_model

    # two layers, H=512, the real vocabulary: the lm_head chunk is the largest transient
    return str(build_bench_model(tmp_path_factory.mktemp("gpu") / "bench", hidden=512, intermediate=2048, layers=2,
                                 heads=8, kv_heads=2))


def _step(model: str, r: int, g: int = 4, chunk: int = 1024) -> dict:
    from bench.common import lite_step_job

    return lite_step_job({"model": model, "algo": "srpo", "G": g, "R": r, "chunk": chunk, "micro_batch": 2})


def test_srpo_step_peak_matches_the_planner(bench_model):
    from bench.common import step_recipe
    from lite_srpo.config import config_from_dict
    from lite_srpo.model.memory.plan import plan

    job = {"model": bench_model, "algo": "srpo", "G": 4, "R": 512, "chunk": 1024, "micro_batch": 2}
    res = _step(bench_model, 512)
    measured = res["peak_step"]["peak_allocated_gib"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_dict(step_recipe(job, tmp))
    predicted = plan(cfg, 80.0, device="cuda", prompt_tokens=res["prompt_tokens"])["peak_gib"]
    assert abs(predicted - measured) / measured < 0.15, (predicted, measured)


def test_peak_stays_flat_while_full_logits_would_grow(bench_model):
    short = _step(bench_model, 256)["peak_step"]["peak_allocated_gib"]
    long = _step(bench_model, 2048)["peak_step"]["peak_allocated_gib"]
    # 4 responses x 1792 more tokens x 151,936 x 4 B = 4.1 GiB of fp32 logits alone; measured growth
    # must stay a small fraction of that (activations and KV cache only)
    full_growth = 4 * (2048 - 256) * 151_936 * 4 / 2**30
    assert long - short < 0.15 * full_growth, (short, long)


def test_memory_cap_turns_into_out_of_memory(bench_model):
    """The 24 GiB-card emulation: a cap below the weights must fail with OOM, not silently pass."""
    from bench.common import measure_in_subprocess

    res = measure_in_subprocess("bench.memory_scaling", {"model": bench_model, "algo": "grpo", "G": 2, "R": 64,
                                                          "chunk": 256, "micro_batch": 2, "cap_gib": 0.05})
    assert "error" in res and "out of memory" in res["error"].lower()



def test_offload_on_cuda_keeps_gradients_and_reuses_its_pinned_buffers(tmp_path):
    """The side-stream copies and pooled pinned buffers (host_buffers.py), where only a card runs them:
    the offloaded update's LoRA gradients equal the plain update's, and a second update makes no new buffer."""
    _need_cuda()
    import torch

    from lite_srpo.config import LoraConfig, ModelConfig
    from lite_srpo.data.prompts import ResponseFormat
    from lite_srpo.data.tasks import make_task
    from lite_srpo.model.policy import load_policy
    from lite_srpo.model.tiny import make_tiny
    from lite_srpo.rl.passes import rows_logprobs
    from lite_srpo.rl.rollout import encode_prompt, generate

    path = make_tiny("qwen2_5_vl", tmp_path / "m", size="test", seed=0)

    def policy(offload: bool):
        torch.manual_seed(0)
        p = load_policy(ModelConfig(path=str(path), load_in_4bit=True, dtype="bfloat16"), LoraConfig(r=8, alpha=16),
                        offload_activations=offload)
        for n, w in p.model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(w, std=0.02, generator=torch.Generator(device=w.device).manual_seed(1))
        return p

    plain, moved = policy(False), policy(True)
    assert moved.offload.pin and moved.offload.stream is not None
    prompts = [encode_prompt(plain, s, "structured", ResponseFormat()) for s in make_task("count_shapes", "train", 1)]
    batch = generate(plain, prompts, group_size=2, max_new_tokens=16)
    grads = []
    for p in (plain, moved, moved):
        p.model.zero_grad(set_to_none=True)
        rows_logprobs(p, batch, [0, 1], chunk=8, temperature=1.0).sum().backward()
        grads.append({n: w.grad.float().cpu() for n, w in p.model.named_parameters() if w.grad is not None})
    assert all(torch.equal(grads[0][k], grads[1][k]) and torch.equal(grads[1][k], grads[2][k]) for k in grads[0])
    layers = plain.config.text_config.num_hidden_layers
    assert moved.offload.pool.created == layers and moved.offload.pool.reused == layers
