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

