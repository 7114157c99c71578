"""Data parallelism on CPU: real torchrun, 2 gloo processes, the real CLI, against one process.

Each run is a fresh process (`python -m lite_srpo train …`, or torchrun over it) on the warm tiny model,
with the same global batch: 4 prompts × G = 4 per step, generated 2 prompts per call and updated 8 rows
per micro-batch, so the two ranks' halves are exactly the single process's generate calls and
micro-batches. After 2 steps the LoRA weights must agree within 1e-5 (the issue's bound).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import FakeCudaState, tiny_recipe

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
WORKER = str(Path(__file__).with_name("dist_worker.py"))


def write_recipe(warm_qwen, root: Path, algorithm: str, **over) -> Path:
    recipe = tiny_recipe(warm_qwen, root, algorithm__name=algorithm, train__steps=2, train__save_every=1,
                         train__micro_batch_size=8, train__logprob_chunk=256, train__keep_last=5,
                         rollout__prompts_per_step=4, rollout__group_size=4, rollout__generation_batch_size=2,
                         rollout__max_new_tokens=48, data__n_train=64, data__n_test=4,
                         reward__weights={"accuracy": 0.9, "format": 0.1}, **over)
    path = root / f"{algorithm}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def launch(args: list[str], fault: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("LITE_SRPO_TEST_FAULT", None)
    if fault:
        env["LITE_SRPO_TEST_FAULT"] = fault
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def torchrun(script_args: list[str], **kw) -> subprocess.CompletedProcess:
    return launch(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", WORKER, *script_args], **kw)


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def adapter(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step_{step:06d}" / "adapter" / "adapter_model.safetensors")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "events.jsonl").read_text(encoding="utf-8").splitlines()
    return [e for e in map(json.loads, lines) if e["type"] == kind]


@pytest.fixture(scope="module")
def grpo_runs(warm_qwen, tmp_path_factory):
    """GRPO: one process, and 2 ranks started by `lite-srpo train --nproc 2` (the shortcut over torchrun)."""
    root = tmp_path_factory.mktemp("ddp_grpo")
    # clipping off (a norm it never reaches): with the default clip, g and 2g give the same update, so a
    # gradient all-reduce that summed where it should not would still match; grad/norm is compared below
    recipe = write_recipe(warm_qwen, root, "grpo", optim__max_grad_norm=1e9)
    ok(launch(["-m", "lite_srpo", "train", str(recipe), "name=one", "--quiet"]))
    ok(launch(["-m", "lite_srpo", "train", str(recipe), "name=two", "--quiet", "--nproc", "2"]))
    return recipe, root / "one", root / "two"


def test_grpo_two_ranks_equal_one_process(grpo_runs):
    _, one, two = grpo_runs
    # the loss, the gradient's scale and the step's metrics are the single process's, step by step
    for m1, m2 in zip(events(one, "metrics"), events(two, "metrics"), strict=True):
        for key in STEP_KEYS:
            assert key in m1 and key in m2, key
            assert m1[key] == pytest.approx(m2[key], abs=1e-5, rel=1e-5), (m1["step"], key)
        assert m1["grad/norm"] > 1e-6  # a real gradient was compared
    start = adapter(one, 1)
    for step in (1, 2):
        assert max_diff(adapter(one, step), adapter(two, step)) <= 1e-5, f"step {step}"
    assert max_diff(adapter(one, 2), start) > 1e-4  # the second step moved the weights
    # rank 0 alone writes: one metrics event per step, and the checkpoint knows its world size
    assert [e["step"] for e in events(two, "metrics")] == [1, 2]
    state = torch.load(two / "checkpoints" / "step_000002" / "trainer_state.pt", weights_only=True)
    assert state["extra"]["world_size"] == 2 and len(state["extra"]["rng_by_rank"]) == 2


STEP_KEYS = ("grad/norm", "loss/total", "loss/pg", "reward/mean", "reward/std", "accuracy", "format_rate",
             "completion/len_mean", "ratio/mean", "clip/frac", "kl/k3")


SHAPE_KEYS = {
    "srpo": ("srpo/weight_perception", "srpo/weight_reasoning", "srpo/perception_score_mean",
             "srpo/reasoning_score_mean"),
    "vppo": ("vppo/alpha_min", "vppo/alpha_max", "vppo/kept_frac"),
    "vgpo": ("vgpo/token_factor_min", "vgpo/token_factor_max", "vgpo/traj_factor_mean"),
    "dapo": ("dynamic_sampling/kept_groups_frac", "reward/std"),
}


@pytest.mark.parametrize("algorithm,over", [
    ("srpo", {"algorithm__filter_on": "reward"}),  # per-role standardisation and renormalisation
    ("vppo", {}),  # the batch min/max and mean of the dependency scores
    ("vgpo", {}),  # the batch min-max of the visual focus
    ("dapo", {"algorithm__adv_scale": "batch"}),  # dynamic sampling on accuracy, reward std over the batch
])
def test_two_ranks_equal_one_process_under_plain_torchrun(warm_qwen, tmp_path, algorithm, over):
    """The objectives' batch statistics are taken over the whole step, not over each rank's share."""
    recipe = write_recipe(warm_qwen, tmp_path, algorithm, **over)
    ok(launch(["-m", "lite_srpo", "train", str(recipe), "name=one", "--quiet"]))
    ok(launch(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "lite_srpo", "train",
               str(recipe), "name=two", "--quiet"]))
    one, two = tmp_path / "one", tmp_path / "two"
    for step in (1, 2):
        assert max_diff(adapter(one, step), adapter(two, step)) <= 1e-5, f"step {step}"
    updated = [m for m in events(one, "metrics") if "update/skipped_no_signal" not in m]
    if algorithm != "dapo":
        assert len(updated) == 2 and max_diff(adapter(one, 2), adapter(one, 1)) > 1e-4
    for m1, m2 in zip(events(one, "metrics"), events(two, "metrics"), strict=True):
        skipped = "update/skipped_no_signal" in m1
        assert skipped == ("update/skipped_no_signal" in m2)
        keys = ("dynamic_sampling/kept_groups_frac",) if skipped else SHAPE_KEYS[algorithm] + ("grad/norm", "loss/total")
        for key in keys:
            assert key in m1 and key in m2, (m1["step"], key)
            assert m1[key] == pytest.approx(m2[key], abs=1e-5, rel=1e-5), (m1["step"], key)
    if algorithm == "dapo":  # dynamic sampling really dropped some groups and kept others
        assert any(0 < m["dynamic_sampling/kept_groups_frac"] < 1 for m in events(one, "metrics"))
    if algorithm == "srpo":
        assert all(m["srpo/perception_frac"] > 0 and m["srpo/reasoning_frac"] > 0 for m in updated)


def test_a_failing_rank_stops_every_rank_and_resume_is_exact(grpo_runs):
    recipe, _, two = grpo_runs
    run_dir = recipe.parent / "fault"
    result = torchrun([str(recipe), "name=fault", "--quiet"], fault="raise:1:2")
    assert result.returncode != 0
    assert "rank 1 failed: RuntimeError: injected fault on rank 1 at step 2" in result.stderr  # told on every rank
    assert result.stderr.count("error: rank 1 failed") == 2
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step_000001"]  # step 1 intact, nothing partial
    assert events(run_dir, "status")[-1]["status"] == "crashed"
    ok(torchrun([str(recipe), "name=fault", "--quiet", "--resume"]))
    assert max_diff(adapter(run_dir, 2), adapter(two, 2)) == 0.0  # exact: per-rank RNG, seeds per prompt


def test_a_dead_rank_stops_the_job_and_leaves_the_last_checkpoint(grpo_runs):
    recipe, _, _ = grpo_runs
    run_dir = recipe.parent / "dead"
    result = torchrun([str(recipe), "name=dead", "--quiet"], fault="die:1:2")
    assert result.returncode != 0
    assert "local_rank: 1" in result.stderr or "rank 1" in result.stderr  # torchrun names the dead rank
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000001"]


def test_out_of_memory_on_one_rank_halves_the_micro_batch_on_both(grpo_runs):
    recipe, _, two = grpo_runs
    run_dir = recipe.parent / "oom"
    ok(torchrun([str(recipe), "name=oom", "--quiet"], fault="oom:1:4"))
    warnings = [e["message"] for e in events(run_dir, "warning")]
    assert warnings == ["out of memory: retrying with train.micro_batch_size -> 4"]  # once, in step
    state = torch.load(run_dir / "checkpoints" / "step_000002" / "trainer_state.pt", weights_only=True)
    assert state["extra"]["micro_batch"] == 4  # rank 0 (which never ran out) halved too
    assert max_diff(adapter(run_dir, 2), adapter(two, 2)) <= 1e-5


def test_resume_with_another_world_size_is_refused(grpo_runs):
    recipe, _, _ = grpo_runs
    result = launch(["-m", "lite_srpo", "train", str(recipe), "name=two", "--resume", "--quiet"])
    assert result.returncode == 2
    assert "written by 2 process(es) but this run has 1" in result.stderr and "--nproc 2" in result.stderr


def test_accelerate_launch_runs_the_same_job(grpo_runs):
    """`accelerate launch --multi_gpu` starts the ranks through torch.distributed too (gloo here: no GPU)."""
    recipe, _, two = grpo_runs
    ok(launch(["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lite_srpo", "train", str(recipe),
               "name=accelerate", "--quiet"]))
    run_dir = recipe.parent / "accelerate"
    assert events(run_dir, "status")[0]["message"].endswith("(2 processes)")
    assert max_diff(adapter(run_dir, 2), adapter(two, 2)) <= 1e-5


def _exchange_worker(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo ranks: rank 0 keeps its first group (width 3), rank 1 its second (width 5)."""
    from lite_srpo.rl.data_parallel import StepShare, exchange
    from lite_srpo.run.distributed import init_from_env, shutdown

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    ctx = init_from_env(timeout_s=60)
    width = 3 if rank == 0 else 5
    kept = [0, 1] if rank == 0 else [2, 3]
    old = torch.full((2, width), float(rank + 1))
    share = StepShare(rewards=[10.0 * rank + i for i in range(4)], per_fn={"accuracy": [float(rank)] * 4},
                      lengths=torch.full((4,), width), truncated=torch.zeros(4, dtype=torch.bool), kept=kept,
                      response_mask=torch.ones(2, width, dtype=torch.long), roles=None,
                      passes={"old_logp": old, "ref_logp": None, "corrupted_logp": None, "removed_logp": None,
                              "focus_cos": None}, violations=rank, reward_metrics={"reward/x/failures": 1.0})
    g = exchange(ctx, share)
    torch.save({"kept": g.kept, "row_offset": g.row_offset, "width": g.width, "old": g.passes.old_logp,
                "mask": g.response_mask, "rewards": g.rewards, "violations": g.violations,
                "failures": g.reward_metrics["reward/x/failures"]}, Path(out_dir) / f"{rank}.pt")
    shutdown(ctx)


def test_exchange_with_uneven_kept_rows_and_widths(tmp_path):
    """Dynamic sampling kept different rows on each rank and their responses differ in width: the
    global view is rank 0's rows then rank 1's, padded to the widest, and each rank knows its offset."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_exchange_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    for r in (r0, r1):
        assert r["kept"] == [0, 1, 6, 7] and r["width"] == 5
        assert r["rewards"] == [0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0]
        assert r["violations"] == 1 and r["failures"] == 2.0
        expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [2, 2, 2, 2, 2], [2, 2, 2, 2, 2]], dtype=torch.float)
        assert torch.equal(r["old"], expected)
        assert torch.equal(r["mask"], (expected > 0).long())
    assert (r0["row_offset"], r1["row_offset"]) == (0, 2)


def test_bad_process_counts_are_refused_before_launch(tiny_qwen, tmp_path):
    from lite_srpo.config import config_from_dict
    from lite_srpo.errors import LiteSrpoError
    from lite_srpo.run.launch import check_nproc

    cfg = config_from_dict(tiny_recipe(tiny_qwen, tmp_path, rollout__prompts_per_step=6))
    with pytest.raises(LiteSrpoError, match="prompts_per_step=6 is not divisible by the 4 ranks"):
        check_nproc(cfg, 4, cuda_devices=0)
    with pytest.raises(LiteSrpoError, match="this machine has 2 GPU"):
        check_nproc(cfg, 3, cuda_devices=2)
    check_nproc(cfg, 3, cuda_devices=0)  # CPU: gloo, any count that divides the prompts
    result = launch(["-m", "lite_srpo", "train", "/nonexistent.yaml", "--nproc", "2"])
    assert result.returncode == 2 and "nonexistent.yaml" in result.stderr


def test_a_signal_to_one_rank_stops_both_after_the_same_step_with_a_checkpoint(grpo_runs):
    """SIGTERM reaches rank 1 only: the stop is agreed at the end of the step, rank 0 saves, both exit 0."""
    import signal
    import time

    import psutil

    recipe, _, _ = grpo_runs
    run_dir = recipe.parent / "signal"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            WORKER, str(recipe), "name=signal", "train.steps=500", "train.save_every=1000", "--quiet"],
                           env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((run_dir / "events.jsonl").exists() and events(run_dir, "metrics")):
            time.sleep(0.5)
        rank1 = [p for p in psutil.Process(job.pid).children(recursive=True)
                 if p.environ().get("RANK") == "1" and "dist_worker.py" in " ".join(p.cmdline())]
        assert len(rank1) == 1
        rank1[0].send_signal(signal.SIGTERM)
        _, err = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 0, err[-3000:]
    status = events(run_dir, "status")[-1]
    assert status["status"] == "stopped"
    step = status["step"]
    assert step < 500 and (run_dir / "checkpoints" / f"step_{step:06d}").is_dir()


@pytest.mark.parametrize("rank,local,expected", [(1, 1, 1), (3, 1, 1), (2, 0, 0)])
def test_each_rank_loads_its_model_on_its_own_gpu(monkeypatch, rank, local, expected):
    """torchrun's env for one rank of a 2-node x 2-GPU job: `init_from_env` must set the device from
    LOCAL_RANK (not RANK: rank 3 lives on its node's cuda:1), and `pick_device`, which places the model,
    must read it back, not fall to cuda:0 where every rank's copy would otherwise land. The process group
    itself is not joined here (NCCL needs the GPUs); `test_data_parallel_*` run real gloo groups."""
    from lite_srpo.model.policy import pick_device
    from lite_srpo.run import distributed

    cuda = FakeCudaState(count=2)
    cuda.install(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(local))
    joined = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: joined.append(backend))
    ctx = distributed.init_from_env()
    assert (ctx.rank, ctx.local_rank, ctx.world_size) == (rank, local, 4) and joined == ["nccl"]
    assert pick_device() == torch.device("cuda", expected)


def test_a_rank_beyond_the_nodes_gpus_is_refused_with_the_fix(monkeypatch):
    from lite_srpo.errors import LiteSrpoError
    from lite_srpo.run import distributed

    FakeCudaState(count=2).install(monkeypatch)
    for key, value in {"WORLD_SIZE": "3", "RANK": "2", "LOCAL_RANK": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    with pytest.raises(LiteSrpoError, match=r"rank 2 wants cuda:2 but this node has 2 GPU\(s\).*--nproc"):
        distributed.init_from_env()
