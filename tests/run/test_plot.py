"""Learning curves as a PNG: real events written with EventWriter, the picture checked with PIL, the
reasons for empty panels checked without pixels, and the `lite-srpo plot` command."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lite_srpo.cli import main
from lite_srpo.errors import LiteSrpoError
from lite_srpo.run.events import EventWriter, read_events
from lite_srpo.run.plot import auto_window, ema, moving_average, panel_notes, series, write_curves

C0, C1 = (31, 119, 180), (255, 127, 14)  # matplotlib's first two colours: run 1, run 2
KL_OFF = "KL not computed: algorithm.beta = 0"
EVAL_OFF = "no held-out eval: train.eval_every = 0"


def make_run(run_dir: Path, beta: float, eval_every: int, steps: int = 30, sft: int = 0, seed: int = 0) -> Path:
    """A run's events as train.py and sft.py write them: sft losses, a running status with the recipe,
    one metrics event per step (kl/k3 only when beta > 0), eval events every `eval_every` steps."""
    rng = random.Random(seed)
    w = EventWriter(run_dir / "events.jsonl")
    for s in range(1, sft + 1):
        w.write("sft", s, loss=3.0 / s ** 0.5, total_steps=sft)
    w.write("status", 0, status="running", total_steps=steps, message="srpo on m",
            config={"algorithm": {"name": "srpo", "beta": beta}, "train": {"steps": steps, "eval_every": eval_every}})
    for s in range(1, steps + 1):
        m = {"reward/mean": 0.3 + 0.5 * s / steps + rng.gauss(0, 0.1), "accuracy": 0.2 + 0.5 * s / steps,
             "format_rate": 0.9 + 0.1 * rng.random(), "completion/len_mean": 40 + rng.gauss(0, 5),
             "completion/truncated_frac": 0.2 * rng.random(), "loss/total": rng.gauss(0, 1)}
        if beta > 0:
            m["kl/k3"] = 0.001 * s
        w.write("metrics", s, **m)
        if eval_every and s % eval_every == 0:
            w.write("eval", s, protocol="greedy", accuracy=0.4 + s / 100, format_rate=1.0, mean_length=40.0)
    w.write("status", steps, status="finished", message="done")
    return run_dir


@pytest.fixture
def runs(tmp_path):
    return (make_run(tmp_path / "with_kl", beta=0.01, eval_every=10, sft=25),
            make_run(tmp_path / "no_kl", beta=0.0, eval_every=0, steps=20, seed=1))


def _colours(path: Path) -> dict[tuple[int, int, int], int]:
    image = Image.open(path).convert("RGB")
    return {rgb: n for n, rgb in image.getcolors(1 << 20)}


def test_panel_notes_give_the_reason_exactly_when_a_panel_is_empty(runs, tmp_path):
    with_kl, no_kl = [panel_notes(read_events(r / "events.jsonl")) for r in runs]
    assert with_kl == {}  # every panel has data, the warm-up loss included
    assert no_kl == {"kl": KL_OFF, "eval": EVAL_OFF, "sft": "no SFT warm-up events in this log"}
    assert set(panel_notes([])) == {"reward", "accuracy", "eval", "kl", "length", "sft"}
    assert set(panel_notes([]).values()) == {"no data yet", "no SFT warm-up events in this log"}
    early = make_run(tmp_path / "early", beta=0.05, eval_every=50, steps=10)  # KL on, eval not reached yet
    notes = panel_notes(read_events(early / "events.jsonl"))
    assert notes["eval"] == "no held-out eval yet: the first is at step 50" and "kl" not in notes
    started = read_events(early / "events.jsonl")[:1]  # only the running status: the recipe says KL is on, no step yet
    assert panel_notes(started)["kl"] == "no data yet"


def test_series_sorted_last_value_wins_nulls_skipped():
    events = [{"type": "eval", "step": 10, "accuracy": 0.5}, {"type": "eval", "step": 5, "accuracy": 0.4},
              {"type": "eval", "step": 10, "accuracy": 0.6}, {"type": "metrics", "step": 3, "accuracy": None},
              {"type": "metrics", "step": 4, "accuracy": 0.9}]
    assert series(events, "eval:accuracy") == [(5, 0.4), (10, 0.6)]
    assert series(events, "accuracy") == [(4, 0.9)]


def test_moving_average_never_looks_ahead():
    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert moving_average([2.0, 4.0], 5) == [2.0, 3.0]
    assert (auto_window(19), auto_window(20), auto_window(40), auto_window(1000)) == (0, 3, 4, 25)


def test_ema_is_tensorboards_debiased_smoothing():
    # weight 0.5 on [1, 0, 1]: running 0.5, 0.25, 0.625; debiased by 1 - 0.5**n = 0.5, 0.75, 0.875
    assert ema([1.0, 0.0, 1.0], 0.5) == pytest.approx([1.0, 1 / 3, 5 / 7])
    # weight 0.6 on [2, 4]: 0.8 / 0.4 = 2; (0.48 + 1.6) / 0.64 = 3.25
    assert ema([2.0, 4.0], 0.6) == pytest.approx([2.0, 3.25])
    assert ema([0.3, 0.9], 0.0) == [0.3, 0.9]  # weight 0: raw
    assert ema([0.1] * 5, 0.99) == [0.1] * 5  # a constant stays exact (no rounding drift)
    out = ema([1.0, float("nan"), 3.0], 0.5)  # a gap passes through and does not reset the average
    assert out[0] == 1.0 and out[1] != out[1] and out[2] == pytest.approx((0.5 * 0.5 + 1.5) / 0.75)
    assert ema([], 0.6) == []
    with pytest.raises(ValueError):
        ema([1.0], 1.0)


def test_one_run_png_default_path_size_and_content(runs):
    path = write_curves([runs[0]])
    assert path == runs[0] / "curves.png" and path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1500, 840)
    colours = _colours(path)
    assert len(colours) > 200  # lines, text, antialiasing: not a blank canvas
    assert colours.get(C0, 0) > 1000 and C1 not in colours  # one run, one colour


def test_two_runs_overlay_one_colour_each(runs, tmp_path):
    out = write_curves(list(runs), tmp_path / "sub" / "both.png", labels=["A", "B"])
    assert out == tmp_path / "sub" / "both.png" and out.is_file()
    assert not (runs[0] / "curves.png").exists()  # --out wins over the default
    colours = _colours(out)
    assert colours.get(C0, 0) > 1000 and colours.get(C1, 0) > 500
    with pytest.raises(LiteSrpoError, match="1 labels for 2 runs"):
        write_curves(list(runs), tmp_path / "x.png", labels=["A"])


def test_smooth_zero_draws_raw_values_only(runs, tmp_path):
    raw = _colours(write_curves([runs[0]], tmp_path / "raw.png", smooth=0))
    smoothed = _colours(write_curves([runs[0]], tmp_path / "smooth.png"))
    assert raw.get(C0, 0) < smoothed.get(C0, 0)  # the bold moving average adds full-colour pixels
    faint = tuple(round(255 - 0.35 * (255 - c)) for c in C0)  # the raw values under it: C0 at alpha 0.35

    def near_faint(colours: dict) -> int:
        return sum(n for rgb, n in colours.items() if all(abs(a - b) <= 2 for a, b in zip(rgb, faint)))

    assert near_faint(smoothed) > 3 * near_faint(raw)  # smoothing keeps the raw values, drawn faint


def test_cli_plot_writes_the_picture_and_prints_its_path(runs, tmp_path, capsys):
    out = tmp_path / "cli.png"
    assert main(["plot", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert Image.open(out).size == (1500, 840)


def test_missing_events_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LiteSrpoError, match="no events.jsonl"):
        write_curves([tmp_path / "empty"])
    assert main(["plot", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "nope" / "events.jsonl") in err
    assert not (tmp_path / "nope").exists()


def test_importing_lite_srpo_does_not_import_matplotlib():
    code = "import sys, lite_srpo, lite_srpo.cli, lite_srpo.run.plot; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
