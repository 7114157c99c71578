"""The CLI's progress line: the pure ETA with periodic evals, the first line naming where the run's files
go, and both on stderr from a real short training run."""
from __future__ import annotations

import pytest

from lite_srpo.run.progress import Progress, eta, eta_text, evals_from, outputs_line


def test_evals_from_counts_the_evals_still_to_run_after_a_step():
    # the loop evaluates after the step's update, so at step 15 the eval at 15 is still to come
    assert [evals_from(s, 60, 15) for s in (1, 14, 15, 16, 45, 59, 60)] == [4, 4, 4, 3, 2, 1, 1]
    assert evals_from(10, 60, 0) == 0 and evals_from(61, 60, 15) == 0
    assert evals_from(7, 10, 3) == 1  # only step 9 is left


def test_eta_adds_the_remaining_evals_at_their_measured_length():
    # 10 steps in 50 s since step 0: 5 s/step x 40 left = 200 s, + 2 evals x mean(10, 14) s = 224 s
    assert eta(10, 0, 50, 50.0, 2, [10.0, 14.0]) == (pytest.approx(224.0), 0)
    # resumed at step 20: 5 steps in 10 s = 2 s/step x 25 left; no eval timed yet -> 2 evals unknown
    assert eta(25, 20, 50, 10.0, 2) == (pytest.approx(50.0), 2)
    assert eta(20, 20, 50, 0.0, 3) == (None, 3)  # no step done since the (re)start
    assert eta(50, 0, 50, 100.0, 0, [5.0]) == (0.0, 0)
    assert eta_text(224.0, 0, 2) == "ETA 3m44s incl. 2 evals"
    assert eta_text(50.0, 2, 2) == "ETA 0m50s + 2 evals (not yet timed)"
    assert eta_text(None, 1, 1) == "ETA ?" and eta_text(9.0, 0, 0) == "ETA 0m09s"


def test_progress_line_smooths_reward_and_accuracy_and_times_evals(monkeypatch):
    clock = iter([0.0, 10.0, 10.0, 16.0, 20.0])  # t0, step 1, eval start, eval end, step 2
    monkeypatch.setattr("lite_srpo.run.progress.time.perf_counter", lambda: next(clock))
    p = Progress(total=4, eval_every=1, smoothing=0.5, quiet=True)
    first = p.line(1, {"reward/mean": 1.0, "accuracy": 0.5, "format_rate": 1.0})
    assert "reward(ema) 1.000" in first and "accuracy(ema) 0.500" in first and "format_rate 1.000" in first
    assert first.endswith("ETA 0m30s + 4 evals (not yet timed)")  # 10 s/step x 3 left; 4 evals unknown
    with p.timing_eval():
        pass
    second = p.line(2, {"reward/mean": 0.0, "accuracy": float("nan")})
    # EMA 0.5 of rewards [1, 0] = 1/3; accuracy keeps its last EMA; 14 s over 2 steps (the 6 s eval left out)
    # = 7 s/step x 2 left + 3 evals x 6 s = 32 s
    assert "reward(ema) 0.333" in second and "accuracy(ema) 0.500" in second
    assert second.endswith("ETA 0m32s incl. 3 evals")


def test_outputs_line_names_every_destination(tmp_path):
    line = outputs_line(tmp_path / "r", ["tensorboard", "wandb"], save_every=30)
    for part in ("events.jsonl", "checkpoints/ every 30 steps", "curves.png", f"lite-srpo plot {tmp_path / 'r'}",
                 f"{tmp_path / 'r' / 'tensorboard'}/ (tensorboard)", f"{tmp_path / 'r' / 'wandb'}/ (wandb)"):
        assert part in line, part
    assert "trackers none (train.report_to is empty)" in outputs_line("runs/x")


def test_a_real_run_prints_where_its_files_go_first_then_a_smoothed_bar_with_the_eval_eta(tiny_qwen, tmp_path, capfd):
    from lite_srpo.config import config_from_dict
    from lite_srpo.rl.train import train
    from tests.conftest import tiny_recipe

    cfg = config_from_dict(tiny_recipe(tiny_qwen, tmp_path, train__steps=2, train__save_every=0,
                                       train__eval_every=1, train__eval_samples=2))
    train(cfg)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    run_dir = tmp_path / "t"
    assert lines[0].startswith(f"[run] {run_dir}: events {run_dir / 'events.jsonl'}"), lines[0]
    bars = {part.split(" [")[0]: part for part in err.split("\r") if part.startswith("step ")}
    assert "reward(ema)" in bars["step 1/2"] and "+ 2 evals (not yet timed)" in bars["step 1/2"]
    assert "incl. 1 eval" in bars["step 2/2"]  # the eval after step 1 was timed
