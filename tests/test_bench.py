"""The benchmark scripts run on minimal configurations and write well-formed results.

Each script's `main` runs with its workers called in this process (the fresh-process runner is
replaced by a JSON round trip, so the worker code is still what runs); one slow-marked test goes
through a real child process. The figures themselves come from running the benches, not from here.
"""
from __future__ import annotations

import json

import pytest

from bench import common
from bench.common import GIB, table

TINY = common.QUICK_DIMS


@pytest.fixture(scope="module")
def tiny_bench_model(tmp_path_factory):
    return str(common.build_bench_model(tmp_path_factory.mktemp("bench") / "model", **TINY))


@pytest.fixture
def in_process(monkeypatch, tiny_bench_model):
    """Run workers in this process; every script builds its bench model at the tiny dims."""
    from bench import gpu_7b, memory_scaling, planner_accuracy, srpo_overhead, vs_trl

    workers = {"bench.memory_scaling": memory_scaling.worker, "bench.planner_accuracy": common.lite_step_job,
               "bench.vs_trl": vs_trl.run_job, "bench.srpo_overhead": srpo_overhead.overhead_job,
               "bench.gpu_7b": gpu_7b.run_job}

    def run(module, job, timeout=0, env=None):
        return json.loads(json.dumps(workers[module](job)))

    for mod in (memory_scaling, planner_accuracy, srpo_overhead, vs_trl, gpu_7b):
        monkeypatch.setattr(mod, "measure_in_subprocess", run)
    for mod in (memory_scaling, srpo_overhead, vs_trl):
        monkeypatch.setattr(mod, "build_bench_model", lambda **kw: tiny_bench_model)
    return tiny_bench_model


def read(path):
    data = json.loads(path.read_text())
    assert data["machine"]["device"] and data["machine"]["torch"]
    assert data["command"].startswith("python ")
    return data


def test_memory_scaling_minimal(in_process, tmp_path):
    from bench import memory_scaling

    assert memory_scaling.main(["--lengths", "8", "16", "--groups", "2", "--base-length", "8", "--algos", "grpo",
                                "--chunk", "16", "--results-dir", str(tmp_path), "--name", "ms"]) == 0
    data = read(tmp_path / "ms.json")
    assert [(r["G"], r["R"]) for r in data["rows"]] == [(2, 8), (2, 16)]
    row = data["rows"][0]
    assert 0.1 < row["peak_step_gib"] < 8 and row["prompt"] > 4
    assert row["planned_gib"] > 0 and "plan_error" not in row
    # a full [2 x 8, 4096] fp32 logits tensor: 2 * 8 * 4096 * 4 B
    assert row["full_logits_gib"] == pytest.approx(2 * 8 * 4096 * 4 / GIB)
    assert data["growth"][0]["from_R"] == 8 and data["growth"][0]["to_R"] == 16


def test_memory_scaling_features_minimal(in_process, tmp_path):
    from bench import memory_scaling

    assert memory_scaling.main(["--features", "--lengths", "16", "--feature-sets", "off", "both", "--recompute-chunk", "4",
                                "--chunk", "16", "--results-dir", str(tmp_path), "--name", "mf"]) == 0
    data = read(tmp_path / "mf.json")
    off, both = data["rows"]
    assert (off["features"], both["features"]) == ("off", "both") and off["R"] == both["R"] == 16
    assert both["job"]["recompute_chunk"] == 4 and both["job"]["feature_sets"] == ["off", "both"]
    assert 0.1 < off["peak_update_gib"] < 8 and off["update_s"] > 0 and both["slowdown"] > 0
    # the hooks' count: without offload every layer input stays (2 layers), with it about one layer's worth
    assert off["offload_moved_mib"] == 0 and both["offload_moved_mib"] > 0
    assert both["offload_kept_mib"] == pytest.approx(off["offload_kept_mib"] / 2)
    # measured against planned: RSS against the update phase, allocated bytes against the update terms
    for row in (off, both):
        assert row["planned_update_gib"] > row["planned_allocated_gib"] > 0 and row["allocated_gib"] > 0
        assert row["alloc_error"] == pytest.approx(row["allocated_gib"] / row["planned_allocated_gib"] - 1)
    # --replan recomputes the planner's columns of a saved feature sweep with the current planner
    assert memory_scaling.main(["--replan", "--results-dir", str(tmp_path), "--name", "mf"]) == 0
    again = json.loads((tmp_path / "mf.json").read_text())["rows"]
    assert [r["planned_update_gib"] for r in again] == pytest.approx([off["planned_update_gib"], both["planned_update_gib"]])


def test_allocated_peak_counts_live_tensor_bytes_by_hand():
    """The profiler-summed peak: a 4 MB tensor, then a second 4 MB one while the first lives, then
    both freed: 8 MB at the peak (within the allocator's rounding), nothing live at the end."""
    import torch

    from bench.common import allocated_peak_gib

    def work():
        a = torch.ones(1024, 1024)  # 4 MiB
        b = a * 2  # 4 MiB more while a lives
        return float(b.sum())

    peak, out = allocated_peak_gib(work)
    assert out == 2 * 1024 * 1024
    assert 8 * 2**20 <= peak * GIB < 8.1 * 2**20


def test_memory_scaling_sweep_and_slopes():
    from bench.memory_scaling import slopes, sweep_points

    assert sweep_points([256, 512], [2, 4, 8], base_g=2, base_len=256) == [(2, 256), (2, 512), (4, 256), (8, 256)]
    rows = [{"algo": "grpo", "G": 2, "R": 256, "peak_step_gib": 1.0}, {"algo": "grpo", "G": 2, "R": 1280,
                                                                      "peak_step_gib": 1.5}]
    s = slopes(rows, "grpo", 2)
    # 0.5 GiB over 1024 more tokens x 2 responses = 256 KiB per response token
    assert s["growth_kib_per_response_token"] == pytest.approx(256.0)


def test_planner_accuracy_minimal(in_process, tmp_path, monkeypatch):
    from bench import planner_accuracy

    small = [("quick_grpo", TINY, {"algo": "grpo", "G": 2, "R": 8, "chunk": 16})]
    monkeypatch.setattr(planner_accuracy, "QUICK", small)
    monkeypatch.setattr(planner_accuracy, "build_bench_model", lambda **kw: in_process)
    assert planner_accuracy.main(["--quick", "--results-dir", str(tmp_path), "--name", "pa"]) == 0
    data = read(tmp_path / "pa.json")
    row = data["rows"][0]
    assert row["config"] == "quick_grpo" and row["predicted_phase"] in ("generation", "passes", "update")
    assert row["error_pct"] == pytest.approx(100 * (row["predicted_gib"] - row["measured_gib"]) / row["measured_gib"])
    assert data["configs"] == 1 and data["target_pct"] == 15


def test_srpo_overhead_minimal(in_process, tmp_path):
    from bench import srpo_overhead

    assert srpo_overhead.main(["--quick", "--variants", "srpo", "--results-dir", str(tmp_path), "--name", "so"]) == 0
    data = read(tmp_path / "so.json")
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"grpo", "srpo"} and rows["grpo"]["step_vs_grpo"] == 1.0
    # SRPO runs the corrupted-image and perception-removed passes; GRPO (beta 0) none
    assert rows["srpo"]["extra_passes_s"] > 0 and rows["grpo"]["extra_passes_s"] == 0
    assert rows["srpo"]["step_s"] == pytest.approx(rows["srpo"]["generation_s"] + rows["srpo"]["own_s"])


def test_vs_trl_minimal(in_process, tmp_path):
    from bench import vs_trl

    assert vs_trl.main(["--quick", "--results-dir", str(tmp_path), "--name", "vt"]) == 0
    data = read(tmp_path / "vt.json")
    systems = {r["system"] for r in data["rows"]}
    assert systems == {"lite-srpo (defaults)", "TRL GRPOTrainer"}
    assert data["rows"][0]["logprob_chunk"] == 128  # auto on the tiny bench model: the floor
    s = data["summary"][0]
    assert s["system"] == "lite-srpo (defaults)" and s["step_s"] >= s["generation_s"] > 0
    assert s["memory_ratio"] == pytest.approx(s["peak_gib"] / s["trl_peak_gib"])
    assert data["rows"][1]["trl_adapter_dtypes"]


def test_vs_trl_ablation_rows_and_effects(in_process, tmp_path):
    """--ablate: each change of issue 13 alone and all together, against the defaults (--no-trl: lite-srpo only)."""
    from bench import vs_trl

    assert vs_trl.main(["--quick", "--ablate", "--no-trl", "--results-dir", str(tmp_path), "--name", "va"]) == 0
    data = read(tmp_path / "va.json")
    assert not any(r["system"].startswith("TRL") for r in data["rows"]) and "memory_ratio" not in data["summary"][0]
    assert [r["system"] for r in data["summary"]] == [
        "lite-srpo (defaults)", "lite-srpo (chunk 1024)",
        "lite-srpo (chunk 1024, no vision cache, HF sampler, old-logp pass)", "lite-srpo (defaults, HF sampler)",
        "lite-srpo (defaults, no vision cache)", "lite-srpo (defaults, old-logp pass)"]
    effects = {e["defaults_vs"]: e for e in data["effects"]}
    base = data["summary"][0]
    for s in data["summary"][1:]:
        assert effects[s["system"]]["step_ratio"] == pytest.approx(base["step_s"] / s["step_s"])
    from lite_srpo.model import vision_cache
    from lite_srpo.rl import algorithms, sampling, train
    assert vision_cache.ENABLED and sampling.ENABLED  # the switches are restored after an ablation job
    assert train.old_pass_needed is algorithms.old_pass_needed
    undone = next(r for r in data["rows"] if r["job"].get("old_pass") == "always")
    assert undone["passes_s"] > 0


def test_gpu_7b_dry_run(in_process, tmp_path, monkeypatch):
    from bench import gpu_7b

    monkeypatch.setenv("LITE_SRPO_GPU_MODELS", str(tmp_path / "models"))
    monkeypatch.setattr(gpu_7b, "DRY_RUN", {**gpu_7b.DRY_RUN, "prompt_tokens": 200, "R": 8})
    monkeypatch.setattr(gpu_7b, "DRY_LADDER", [8, 16])
    assert gpu_7b.main(["--dry-run", "--results-dir", str(tmp_path)]) == 0
    data = json.loads(next(tmp_path.glob("gpu_tiny_*_dryrun.json")).read_text())
    assert data["ours"]["fits"] and data["ours"]["prompt_tokens"] == 200
    assert data["trl"]["target"]["fits"]
    assert data["max_length"]["largest_fitting_R"] == 16
    assert data["peak_allocated_gib"] is None  # CPU dry run: no CUDA figure


def test_gpu_7b_shapes_are_the_published_configs():
    from bench.gpu_7b import SHAPES
    from lite_srpo.model.dims import dims_from_config

    for shape, total in (("7b", 8.29e9), ("3b", 3.75e9)):
        s = SHAPES[shape]
        config = {"model_type": "qwen2_5_vl", "tie_word_embeddings": s["tie"], "text_config": s["text"],
                  "vision_config": {**s["vision"], "out_hidden_size": s["text"]["hidden_size"], "in_channels": 3}}
        assert dims_from_config(config).total_params == pytest.approx(total, rel=0.01)


def test_bench_samples_pad_prompts_to_the_target(tiny_bench_model):
    from lite_srpo.model.processors import load_processor

    processor = load_processor(tiny_bench_model)
    samples = common.bench_samples(processor, 2, 112, prompt_tokens=300)
    assert [common.prompt_length(processor, s) for s in samples] == [300, 300]


@pytest.mark.slow
def test_fresh_process_runner_reports_failures_instead_of_raising():
    res = common.measure_in_subprocess("bench.memory_scaling", {"model": "/nonexistent", "algo": "grpo", "G": 2,
                                                                 "R": 4})
    assert "error" in res and res["job"]["model"] == "/nonexistent"


def test_table_and_result_file(tmp_path):
    text = table([{"a": 1, "b": 0.123456}, {"a": 22}], ["a", "b"])
    assert text.splitlines()[0] == "| a  | b     |" and "| 22 |       |" in text
    path = common.write_result("x", {"rows": [1]}, tmp_path)
    data = json.loads(path.read_text())
    assert data["benchmark"] == "x" and data["rows"] == [1] and "torch" in data["machine"]


def test_profile_generation_minimal(tiny_bench_model, tmp_path, monkeypatch):
    """The generation profile runs a real rollout with hooks and the profiler; its split adds up."""
    from bench import profile_generation

    monkeypatch.setattr(profile_generation, "build_bench_model", lambda **kw: tiny_bench_model)
    assert profile_generation.main(["--quick", "--group-size", "2", "--results-dir", str(tmp_path), "--name", "pg"]) == 0
    data = read(tmp_path / "pg.json")
    t = data["timed_rollout"]
    assert t["responses"] == 2 and t["new_tokens_per_row"] == 8 and t["decode_steps"] == 7
    assert t["prefill_s"] + t["decode_forward_s"] + t["between_forwards_s"] <= t["generate_s"]
    assert t["lm_head_calls"] == t["model_forwards"] and t["vision_calls"] == 1
    assert data["profiler_top_ops"] and data["dequant_microbench"]["linear4bit_ms"] > 0


def test_logprob_chunk_speed_minimal(tmp_path):
    from bench import logprob_chunk_speed

    assert logprob_chunk_speed.main(["--quick", "--results-dir", str(tmp_path), "--name", "lc"]) == 0
    data = read(tmp_path / "lc.json")
    assert [s["chunk"] for s in data["summary"]] == [64, 16]
    assert all(s["grad_s"] > 0 and s["nograd_s"] > 0 for s in data["summary"])


def test_lm_head_layout_minimal(tmp_path):
    """The layout bench: both layouts timed at each row count, and the alternating rollouts sample the same
    tokens with either layout (same seed)."""
    from bench import lm_head_layout

    assert lm_head_layout.main(["--quick", "--length", "6", "--repeats", "1", "--rows", "1", "2",
                                "--results-dir", str(tmp_path), "--name", "lh"]) == 0
    data = read(tmp_path / "lh.json")
    assert [m["rows"] for m in data["matmul"]] == [1, 2]
    assert all(m["row_major_ms"] > 0 and m["column_major_ms"] > 0 for m in data["matmul"])
    assert data["rollouts"]["same_tokens_per_repeat"] == [True]
    assert {r["layout"] for r in data["rollouts"]["runs"]} == {"row_major", "column_major"}
