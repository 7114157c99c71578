"""Fast UI tests without a browser: token shading, event parsing → status and curves, form validation,
process management (detached start, stop signal, re-attach, crash detection), the exposure guard."""
from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from lite_srpo.config import config_from_dict, load_recipe_dict
from lite_srpo.errors import ConfigError
from lite_srpo.run.events import EventWriter

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ui import control, form, monitor, process, runs, tokens  # noqa: E402
from ui.export_job import default_out_dir, export_command  # noqa: E402

DEMO = REPO / "recipes" / "demo_cpu.yaml"


# ---------------------------------------------------------------------------------------------------------------
# tokens → HighlightedText


def test_shade_bucket_edges_and_middle():
    # n=4 on [0, 2]: 0 -> 1; 0.6 -> 1 + int(0.3*4)=2; 1.0 -> 1 + int(0.5*4)=3; 2 -> 1 + min(3, 4)=4
    assert [tokens.shade_bucket(v, 0.0, 2.0) for v in (0.0, 0.6, 1.0, 2.0)] == [1, 2, 3, 4]
    assert tokens.shade_bucket(1.0, 1.0, 1.0) == 2  # constant range: middle shade
    assert tokens.shade_bucket(None, 0.0, 1.0) == 1


def test_token_highlights_role_and_shade_per_mode():
    toks = [
        {"t": "<perception>", "role": 0, "score": 0.0, "weight": 1.0, "adv": 0.5},
        {"t": "red", "role": 1, "score": 0.9, "weight": 1.5, "adv": 0.75},
        {"t": " so", "role": 2, "score": 0.1, "weight": 0.5, "adv": 0.25},
        {"t": "x", "role": 7, "score": None, "weight": 1.0, "adv": 0.5},  # unknown role, missing score
    ]
    hl = tokens.token_highlights(toks, "weight")
    # weights range [0.5, 1.5]: 1.0 -> 1+int(0.5*4)=3, 1.5 -> 4, 0.5 -> 1
    assert hl == [("<perception>", "other ▮▮▮"), ("red", "perception ▮▮▮▮"), (" so", "reasoning ▮"),
                  ("x", "other ▮▮▮")]
    # scores range [0, 0.9] over the finite ones: 0 -> 1, 0.9 -> 4, 0.1 -> 1+int(0.111*4)=1, None -> 1
    assert [label for _, label in tokens.token_highlights(toks, "score")] == [
        "other ▮", "perception ▮▮▮▮", "reasoning ▮", "other ▮"]
    assert [label for _, label in tokens.token_highlights(toks, "advantage")][1] == "perception ▮▮▮▮"
    assert all(label in tokens.COLOR_MAP for _, label in hl)
    assert len(set(tokens.COLOR_MAP.values())) == 12  # 3 roles x 4 distinct shades


def test_shade_caption_states_range_and_role_means():
    toks = [{"t": "a", "role": 1, "weight": 1.2}, {"t": "b", "role": 1, "weight": 0.8}, {"t": "c", "role": 2, "weight": 1.0}]
    cap = tokens.shade_caption(toks, "weight")
    assert "0.800" in cap and "1.200" in cap
    assert "perception mean 1.000 (2 tokens)" in cap and "reasoning mean 1.000 (1 tokens)" in cap
    assert tokens.shade_caption([{"t": "a", "role": 0}], "score") == "no score values in this response"


# ---------------------------------------------------------------------------------------------------------------
# events → status, ETA, curves


def _events():
    return [
        {"type": "status", "step": 0, "time": 100.0, "status": "running", "total_steps": 10, "message": "srpo on m",
         "config": {"algorithm": {"name": "srpo"}, "model": {"path": "m"}}},
        {"type": "metrics", "step": 1, "time": 110.0, "reward/mean": 0.5, "accuracy": 0.25, "srpo/weight_perception": 1.2},
        {"type": "metrics", "step": 2, "time": 120.0, "reward/mean": 0.75, "loss/total": None, "kl/k3": 0.01},
        {"type": "metrics", "step": 3, "time": 130.0, "reward/mean": 1.0, "srpo/weight_perception": 1.4},
    ]


def test_run_state_step_total_and_eta():
    st = monitor.run_state(_events())
    assert (st["status"], st["step"], st["total_steps"], st["algorithm"]) == ("running", 3, 10, "srpo")
    assert st["eta_s"] == pytest.approx(70.0)  # (130-100)/3 = 10 s/step x 7 steps left
    stopped = _events() + [{"type": "status", "step": 3, "time": 131.0, "status": "stopped", "message": "m"}]
    assert monitor.run_state(stopped)["eta_s"] is None
    resumed = stopped + [{"type": "status", "step": 3, "time": 200.0, "status": "running", "total_steps": 10},
                         {"type": "metrics", "step": 5, "time": 210.0, "reward/mean": 0.0}]
    assert monitor.run_state(resumed)["eta_s"] == pytest.approx(25.0)  # (210-200)/(5-3) = 5 s/step x 5 left



def test_eta_counts_the_evals_to_come_at_their_measured_length():
    run = [{**_events()[0], "config": {"train": {"eval_every": 2}}}, *_events()[1:3],
           {"type": "eval", "step": 2, "time": 126.0, "accuracy": 0.5},  # 6 s after step 2's metrics
           {**_events()[3], "time": 136.0}]
    # steps 1-3 took 36 s, less the 6 s eval = 10 s/step x 7 left = 70 s, + evals after 4, 6, 8, 10 x 6 s = 94 s
    assert monitor.run_state(run)["eta_s"] == pytest.approx(94.0)
    # after step 4, its eval not yet written: it still counts (5 evals would be wrong, 4 are left)
    at4 = run + [{"type": "metrics", "step": 4, "time": 146.0}]
    assert monitor.run_state(at4)["eta_s"] == pytest.approx(40.0 / 4 * 6 + 4 * 6.0)


def test_curve_frame_long_format_skips_missing_and_matches_suffix():
    df = monitor.curve_frame(_events(), [("reward", "reward/mean"), ("loss", "loss/total"),
                                         ("perception", "*/weight_perception")])
    assert list(df.columns) == ["step", "value", "series"]
    assert df[df.series == "reward"].value.tolist() == [0.5, 0.75, 1.0]
    assert df[df.series == "loss"].empty  # null (non-finite) values are not plotted
    assert df[df.series == "perception"].step.tolist() == [1, 3]
    cmp = monitor.compare_frame([("A", _events()), ("B", _events()[:2])], "reward/mean")
    assert cmp.groupby("series").size().to_dict() == {"A": 3, "B": 1}
    assert monitor.metric_keys(_events())[:3] == ["reward/mean", "accuracy", "srpo/weight_perception"]


EVAL_TITLE, KL_TITLE = "Held-out eval accuracy, format rate", "KL to reference (k3)"


def _recipe_status(beta: float, eval_every: int) -> dict:
    return {"type": "status", "step": 0, "time": 100.0, "status": "running", "total_steps": 10, "message": "m",
            "config": {"algorithm": {"name": "srpo", "beta": beta}, "train": {"eval_every": eval_every}}}


def test_eval_curve_frame_reads_eval_events_not_sampled_accuracy():
    events = _events() + [{"type": "eval", "step": 2, "time": 121.0, "protocol": "greedy", "accuracy": 0.6,
                           "format_rate": 1.0, "per_task": {"all": 0.6}},
                          {"type": "eval", "step": 4, "time": 141.0, "protocol": "greedy", "accuracy": 0.7,
                           "format_rate": 0.9}]
    df = monitor.curve_frame(events, monitor.PLOTS[EVAL_TITLE])
    assert df[df.series == "eval accuracy"][["step", "value"]].values.tolist() == [[2, 0.6], [4, 0.7]]
    assert df[df.series == "eval format rate"].value.tolist() == [1.0, 0.9]
    assert monitor.curve_frame(_events(), monitor.PLOTS[EVAL_TITLE]).empty  # metrics' accuracy is not eval
    from ui.tab_monitor import plot_id

    assert plot_id(EVAL_TITLE) == "plot-held-out"


def test_empty_chart_says_why():
    metrics = [{"type": "metrics", "step": 1, "time": 110.0, "reward/mean": 0.5}]
    off = monitor.chart_notes([_recipe_status(0.0, 0), *metrics])
    assert off[KL_TITLE] == "KL not computed: algorithm.beta = 0"
    assert off[EVAL_TITLE] == "no held-out eval: train.eval_every = 0"
    assert off["Loss"] == "not logged by this run" and "Reward, accuracy, format rate" not in off
    on = [_recipe_status(0.01, 1), {**metrics[0], "kl/k3": 0.02},
          {"type": "eval", "step": 1, "time": 111.0, "accuracy": 0.5, "format_rate": 1.0}]
    assert KL_TITLE not in monitor.chart_notes(on) and EVAL_TITLE not in monitor.chart_notes(on)
    waiting = monitor.chart_notes([_recipe_status(0.01, 5)])  # KL on, no step yet
    assert waiting[KL_TITLE] == "no data yet" and waiting["Loss"] == "no data yet"
    assert waiting[EVAL_TITLE] == "no held-out eval yet: the first is at step 5"
    from ui.tab_monitor import note_update

    assert note_update("why")["visible"] is True and note_update("why")["value"] == "*why*"
    assert note_update(None)["visible"] is False


def test_smoothed_curves_come_over_their_faint_raw_values():
    events = _events()  # rewards 0.5, 0.75, 1.0 at steps 1-3
    df = monitor.curve_frame(events, [("reward", "reward/mean")], smoothing=0.5)
    # EMA 0.5, debiased: 0.5; (0.125 + 0.375) / 0.75 = 2/3; (0.25 + 0.5) / 0.875 = 6/7
    assert df[df.series == "reward"].value.tolist() == pytest.approx([0.5, 2 / 3, 6 / 7])
    assert df[df.series == "reward (raw)"].value.tolist() == [0.5, 0.75, 1.0]
    assert df.series.tolist()[:3] == ["reward (raw)"] * 3  # raw rows first: drawn behind the smoothed line
    assert set(monitor.curve_frame(events, [("reward", "reward/mean")], 0.0).series) == {"reward"}
    assert monitor.faint("#2563eb") == "#bed0f9"  # 255 - (255 - c) * 0.3 per channel
    colours = monitor.colour_map(monitor.PLOTS["Throughput (tokens/s)"])
    assert colours == {"generation": "#2563eb", "generation (raw)": "#bed0f9",
                       "update": "#ea580c", "update (raw)": monitor.faint("#ea580c")}
    from ui.tab_monitor import plot_update, smoothing_of

    shown = plot_update(df)
    assert shown["visible"] is True and shown["colors_in_legend"] == ["reward"]
    assert plot_update(df.iloc[:0])["visible"] is False and plot_update(df.iloc[:0])["value"] is None
    assert (smoothing_of(2), smoothing_of(-1), smoothing_of(None)) == (0.99, 0.0, 0.6)


def test_role_chart_of_another_algorithm_says_only_srpo_weights_roles():
    events = [{**_events()[0], "config": {"algorithm": {"name": "grpo", "beta": 0.0}}}, *_events()[1:]]
    events = [{k: v for k, v in e.items() if not k.startswith("srpo/")} for e in events]
    assert monitor.chart_notes(events)["Mean token weight per role"] == \
        "only SRPO weights tokens by role (this run: grpo)"


def test_events_log_is_the_log_tail_of_a_run_without_train_log():
    events = _events() + [
        {"type": "tokens", "step": 3, "time": 131.0, "n_samples": 2},
        {"type": "eval", "step": 3, "time": 132.0, "protocol": "greedy", "accuracy": 0.5, "format_rate": 1.0},
        {"type": "checkpoint", "step": 3, "time": 133.0, "path": "runs/x/checkpoints/step_000003"},
        {"type": "status", "step": 3, "time": 134.0, "status": "finished", "message": "done"}]
    lines = monitor.events_log(events).splitlines()
    assert lines[0] == monitor.EVENTS_LOG_NOTE and len(lines) == 1 + 7  # the tokens record is not a line
    assert lines[1].endswith("running at step 0: srpo on m")
    assert lines[3].endswith("step 2  reward 0.750  accuracy -  format -  no-spread groups -  loss -  (- s)")
    assert lines[-3].endswith("eval at step 3: accuracy 0.500, format rate 1.000 (greedy)")
    assert lines[-1].endswith("finished at step 3: done")
    assert monitor.events_log(events, max_lines=2).splitlines()[1:] == lines[-2:]
    assert monitor.events_log([]) == ""


def test_event_tail_is_incremental_and_resets_on_rewrite(tmp_path):
    w = EventWriter(tmp_path / "events.jsonl")
    tail = monitor.EventTail(tmp_path / "events.jsonl")
    assert tail.refresh() == []
    for step in (1, 2, 3):
        w.write("metrics", step, **{"reward/mean": step / 10})
    assert [e["step"] for e in tail.refresh()] == [1, 2, 3]
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"type": "metrics", "step": 4')  # half-written line waits
    assert len(tail.refresh()) == 3
    w.truncate_after(2)  # what a resume does: the file is replaced
    assert [e["step"] for e in tail.refresh()] == [1, 2]
    sample = {"question": "q", "tokens": [{"t": "a", "role": 1, "weight": 1.0}] * 50}
    w.write("tokens", 3, algorithm="srpo", samples=[sample, sample])
    w.write("metrics", 3, **{"reward/mean": 0.3})
    stub, last = tail.refresh()[-2:]
    assert stub["n_samples"] == 2 and "samples" not in stub and last["step"] == 3  # bulk stays on disk
    full = tail.load_full(stub)
    assert full["samples"][1]["tokens"][49]["t"] == "a" and tokens.token_events(tail.events) == [stub]


def test_tokens_tab_opens_on_a_response_with_roles_and_sorts_by_reward_or_advantage(tmp_path):
    """A format failure (every token role 0) comes first in the step; the tab opens on the next response,
    says how many responses have roles, and lists them by reward or advantage on request."""
    from ui import tab_tokens

    def sample(reward, adv, roles):
        return {"question": "q", "reward": reward, "advantage": adv, "response": "r",
                "tokens": [{"t": "x", "role": r, "weight": 1.0, "adv": adv} for r in roles]}

    samples = [sample(0.0, -0.5, [0, 0]), sample(1.0, 0.9, [1, 2]), sample(0.5, 0.1, [2, 0]), sample(None, None, [0])]
    assert tokens.first_with_roles(samples) == 1 and tokens.first_with_roles(samples[:1]) == 0
    assert tokens.sample_order(samples, "reward") == [1, 2, 0, 3]
    assert tokens.sample_order(samples, "advantage") == [1, 2, 0, 3]
    assert tokens.sample_order(samples, "as sampled") == [0, 1, 2, 3]
    assert tokens.roles_summary(samples) == "2 of 4 recorded responses have perception/reasoning roles"
    assert tokens.sample_label(0, samples[0]) == "#1 reward 0.000 adv -0.500 (no roles)"
    assert tokens.has_roles({"has_roles": False, "tokens": [{"role": 1}]}) is False  # the recorded flag wins

    w = EventWriter(tmp_path / "events.jsonl")
    w.write("tokens", 1, algorithm="srpo", samples=samples, dropped=True)
    label, pick, _, _, highlights, _, _ = tab_tokens.render(str(tmp_path), 0, "weight", None, "reward")
    assert pick["value"] == 1 and [v for _, v in pick["choices"]] == [1, 2, 0, 3]
    assert "2 of 4 recorded responses have" in label and "dropped by dynamic sampling" in label
    assert [shade.split()[0] for _, shade in highlights] == ["perception", "reasoning"]
    assert tab_tokens.render(str(tmp_path), 0, "weight", 3)[1]["value"] == 3  # a chosen response stays chosen


def test_log_tail_keeps_last_carriage_return_state(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("loading\nstep 1/3 a\rstep 2/3 b\rstep 3/3 c\ndone\n")
    assert monitor.log_tail(log).splitlines() == ["loading", "step 3/3 c", "done"]
    assert monitor.format_duration(3725) == "1h02m" and monitor.format_duration(75) == "1m15s"


# ---------------------------------------------------------------------------------------------------------------
# the Launch form


def test_form_roundtrip_and_yaml_is_the_config():
    base, values = form.load_form(DEMO)
    assert values[form.FIELD_KEYS.index("rollout.group_size")] == 8
    v = form.validate(form.recipe_from_form(base, values, ""))
    assert v.ok
    cmd, text, yaml_path = form.preview(v.cfg)
    assert cmd.endswith(f"-m lite_srpo train {yaml_path}") and yaml_path.name == "launch_recipe.yaml"
    assert config_from_dict(yaml.safe_load(text)) == v.cfg


def test_fit_to_card_fills_the_settings_box_with_the_fastest_fit():
    from lite_srpo.model.memory.plan import plan

    base, values = form.load_form(DEMO.parent / "qwen2_5_vl_7b_srpo_24gb.yaml")
    values[form.FIELD_KEYS.index("rollout.max_new_tokens")] = 32768
    extra = "algorithm.srpo.lam=0.3 train.micro_batch_size=2  # mine\ntrain.recompute_chunk=4"
    assert not plan(form.validate(form.recipe_from_form(base, values, extra)).cfg, 24.0)["fits"]
    text, message = form.fit_to_card(base, values, extra, 24, 1)
    assert message.startswith("✅ fitted to 24 GiB") and "longest response" in message
    assert "algorithm.srpo.lam=0.3" in text and "train.micro_batch_size=2" not in text
    assert "train.recompute_chunk=4" not in text.split()  # the user's line gave way to the fit's choice
    v = form.validate(form.recipe_from_form(base, values, text))
    assert v.ok and v.cfg.algorithm.srpo.lam == 0.3 and plan(v.cfg, 24.0)["fits"]
    same, message = form.fit_to_card(base, values, extra, 4, 1)
    assert same == extra and "Nothing fits 4 GiB" in message


def test_processes_field_becomes_nproc_and_must_divide_the_prompts(tmp_path, monkeypatch):
    """The form's Processes field: the command gets `--nproc N`, a count that does not divide the
    prompts per step is refused before anything is written, and a multi-process run records N (resume)."""
    base, values = form.load_form(DEMO)
    v = form.validate(form.recipe_from_form(base, values, ""))
    cmd, _, yaml_path = form.preview(v.cfg, nproc=2)
    assert cmd.endswith(f"-m lite_srpo train {yaml_path} --nproc 2")
    assert process.train_command("r.yaml", resume=True, nproc=4)[-4:] == ["r.yaml", "--nproc", "4", "--resume"]
    data = load_recipe_dict(DEMO)
    data.update(name="split", output_dir=str(tmp_path))
    cfg = config_from_dict(data)
    bad = cfg.rollout.prompts_per_step + 1
    out = control.launch(cfg, [tmp_path], nproc=bad)
    assert not out.ok and f"processes={bad}" in out.message and "prompts_per_step" in out.message
    assert not cfg.run_dir.exists()
    # the slots a machine reports (`process.device_slots`, which reads torch.cuda) stood in for each kind of
    # machine, since this one has no GPU: on the CPU N gloo processes share the one slot; GPUs are one each
    for slots, expected in ((["cpu"], ("cpu", "")), (["0", "1"], ("0,1", "")), (["3", "5", "6"], ("3,5", ""))):
        monkeypatch.setattr(control, "device_slots", lambda slots=slots: slots)
        assert control.free_slot([tmp_path], nproc=2) == expected, slots
    monkeypatch.setattr(control, "device_slots", lambda: ["0"])
    slot, why = control.free_slot([tmp_path], nproc=2)
    assert slot is None and "2 processes need 2 GPUs; this machine has 1" in why


def test_form_out_of_range_value_is_reported_on_its_field():
    base, values = form.load_form(DEMO)
    values[form.FIELD_KEYS.index("rollout.group_size")] = 1.0  # Gradio Numbers come back as floats
    values[form.FIELD_KEYS.index("optim.lr")] = -1.0
    v = form.validate(form.recipe_from_form(base, values, "train.micro_batch_size=4"))
    assert not v.ok
    assert any("needs >= 2" in m for m in form.errors_for_field(v.errors, "rollout.group_size"))
    assert form.errors_for_field(v.errors, "optim.lr") and not form.errors_for_field(v.errors, "lora.r")


def test_form_algorithm_change_applies_that_preset_and_overrides_win():
    base, values = form.load_form(DEMO)
    values[form.FIELD_KEYS.index("algorithm.name")] = "grpo"
    cfg = form.validate(form.recipe_from_form(base, values, "data.n_train=32\nalgorithm.beta=0.05  # comment")).cfg
    # grpo preset: symmetric clip 0.2/0.2 (srpo's DAPO arm would be 0.28); the override beats the preset's 0.01
    assert (cfg.algorithm.clip_high, cfg.algorithm.beta, cfg.data.n_train) == (0.2, 0.05, 32)
    assert form.parse_overrides("a.b=1 c=2\n# x\n d='e f'") == ["a.b=1", "c=2", "d=e f"]


def test_split_errors_maps_keys():
    errs = form.split_errors("form: 2 problem(s):\n  - rollout.group_size: 1 is out of range\n"
                             "  - reward.weights.acc: 'x' is not a number")
    assert set(errs) == {"rollout.group_size", "reward.weights.acc"}
    assert form.errors_for_field(errs, "reward.weights") == ["reward.weights.acc: 'x' is not a number"]


# ---------------------------------------------------------------------------------------------------------------
# processes: detached start, stop signal, re-attach, crash

TRAPPER = textwrap.dedent("""
    import signal, sys, time, pathlib
    out = pathlib.Path(sys.argv[1])
    def handler(sig, frame):
        out.write_text("stopped cleanly")
        sys.exit(0)
    signal.signal(signal.SIGINT, handler)
    out.write_text("ready")
    while True:
        time.sleep(0.05)
""")


def _spawn_trapper(run_dir: Path) -> process.ProcessRecord:
    script = run_dir / "trap.py"
    script.write_text(TRAPPER)
    _, record = process.spawn([sys.executable, str(script), str(run_dir / "flag")], run_dir / process.LOG_FILE, run_dir)
    process.write_record(run_dir, record)
    deadline = time.time() + 10
    while not (run_dir / "flag").exists() and time.time() < deadline:
        time.sleep(0.05)
    return record


def test_detached_process_stop_and_reattach(tmp_path):
    run_dir = tmp_path / "r1"
    run_dir.mkdir()
    record = _spawn_trapper(run_dir)
    try:
        assert process.is_alive(record)
        assert os.getsid(record.pid) != os.getsid(0)  # own session: closing the UI's terminal does not reach it
        reread = process.read_record(run_dir)  # what a restarted UI sees
        assert reread.pid == record.pid and process.is_alive(reread)
        restarted_ui = {}  # a new UI process has no Popen for it: liveness and stop go through psutil and kill
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(process, "_children", restarted_ui)
            assert process.is_alive(reread) and process.exit_code(reread) is None
            forged = process.ProcessRecord(**{**reread.__dict__, "create_time": reread.create_time - 100})
            assert not process.is_alive(forged)  # a recycled pid is not our process
        msg = process.request_stop(run_dir)
        assert "finishes its current step" in msg
        assert process.wait_exit(record, 10)
        assert (run_dir / "flag").read_text() == "stopped cleanly"
        assert process.exit_code(record) == 0 and process.read_record(run_dir).stop_requests == 1
        assert process.request_stop(run_dir) == "no training process is running for this run"
    finally:
        if process.is_alive(record):
            os.kill(record.pid, signal.SIGKILL)


def test_one_run_per_device_and_no_second_run_in_a_directory(tmp_path, monkeypatch):
    roots = [tmp_path]
    busy_dir = tmp_path / "busy"
    busy_dir.mkdir()
    record = _spawn_trapper(busy_dir)
    try:
        data = load_recipe_dict(DEMO)
        data.update(name="second", output_dir=str(tmp_path))
        cfg = config_from_dict(data)
        monkeypatch.setattr(control, "device_slots", lambda: ["cpu"])  # the trapper holds the CPU slot
        out = control.launch(cfg, roots)
        assert not out.ok and "'busy'" in out.message and "one run at a time" in out.message
        assert not (tmp_path / "second").exists()  # nothing started, nothing written
    finally:
        os.kill(record.pid, signal.SIGKILL)
        process.wait_exit(record, 5)
    existing = tmp_path / "old"
    EventWriter(existing / "events.jsonl").write("status", 0, status="stopped")
    data = load_recipe_dict(DEMO)
    data.update(name="old", output_dir=str(tmp_path))
    out = control.launch(config_from_dict(data), roots)
    assert not out.ok and "already holds a run" in out.message
    assert not (existing / process.PROCESS_FILE).exists()


def test_dead_process_without_final_status_is_a_resumable_crash(tmp_path):
    run_dir = tmp_path / "crashy"
    run_dir.mkdir()
    w = EventWriter(run_dir / "events.jsonl")
    w.write("status", 0, status="running", total_steps=5, message="srpo on m")
    _, record = process.spawn([sys.executable, "-c", "import sys; print('Traceback: boom'); sys.exit(3)"],
                              run_dir / process.LOG_FILE, run_dir)
    process.write_record(run_dir, record)
    assert process.wait_exit(record, 10)
    s = runs.summarize(run_dir)
    assert s.status == "crashed" and "code 3" in s.message and "boom" in s.error
    assert s.resumable and not s.alive
    assert runs.runs_table([s])[0][:3] == ["crashy", "crashed", "0/5"]
    recipe = {"rollout": {"group_size": 8, "prompts_per_step": 4, "max_new_tokens": 64}, "optim": {"lr": 1e-5},
              "lora": {"r": 16}, "model": {"load_in_4bit": True}}
    assert runs.recipe_brief(recipe) == "G=8 x 4 prompts, 64 tok, lr 1e-05, LoRA r16, 4-bit"
    assert runs.find_runs([tmp_path]) == [run_dir.resolve()]
    nested = tmp_path / "compare" / "compare_srpo"  # `lite-srpo compare` puts its arms one level down
    EventWriter(nested / "events.jsonl").write("status", 0, status="finished")
    assert set(runs.find_runs([tmp_path])) == {run_dir.resolve(), nested.resolve()}


def test_real_training_process_crash_shows_error_and_resume_restarts(tmp_path):
    """The real `lite_srpo train` with a model that cannot load: the UI reports the crash and its message."""
    data = load_recipe_dict(DEMO)
    data.update(name="nomodel", output_dir=str(tmp_path))
    data["model"]["path"] = str(tmp_path / "no_such_model")
    data["data"].update(n_train=8, n_test=2)
    data["sft"]["steps"] = 0
    cfg = config_from_dict(data)
    out = control.launch(cfg, [tmp_path])
    assert out.ok, out.message
    record = process.read_record(cfg.run_dir)
    assert process.wait_exit(record, 60)
    s = runs.summarize(cfg.run_dir)
    assert s.status == "crashed" and "no_such_model" in s.error and s.resumable
    again = control.resume(cfg.run_dir, [tmp_path])  # no checkpoint: restarts from step 0
    assert again.ok and "restarted" in again.message
    second = process.read_record(cfg.run_dir)
    assert second.pid != record.pid and not second.resume
    os.kill(second.pid, signal.SIGKILL)  # it would only crash the same way
    assert process.wait_exit(second, 10)


def test_export_command_shape():
    cmd = export_command("runs/a/checkpoints/step_000004", "merged", "out", force=True)
    assert cmd[1:] == ["-m", "lite_srpo", "export", "runs/a/checkpoints/step_000004", "--mode", "merged", "--out",
                       "out", "--force"]
    assert default_out_dir("runs/a", "runs/a/checkpoints/step_000004", "adapter") == Path("runs/a/exports/step_000004_adapter")
    with pytest.raises(ValueError):
        export_command("x", "gguf", "out")


# ---------------------------------------------------------------------------------------------------------------
# exposure guard and app construction


def test_exposure_guard_needs_auth_off_localhost():
    from ui.serve import check_exposure, parse_auth

    check_exposure("127.0.0.1", False, None)
    with pytest.raises(ConfigError, match="refusing to listen on 0.0.0.0"):
        check_exposure("0.0.0.0", False, None)
    with pytest.raises(ConfigError, match="share link"):
        check_exposure("127.0.0.1", True, None)
    check_exposure("0.0.0.0", True, parse_auth("me:secret"))
    assert parse_auth(("a", "b:c")) == ("a", "b:c") and parse_auth("a:b:c") == ("a", "b:c")
    for bad in ("nopassword", "user:", ":pw"):
        with pytest.raises(ConfigError):
            parse_auth(bad)


def test_launch_refuses_public_address_before_building(monkeypatch):
    from ui import app as ui_app
    from ui import serve

    monkeypatch.delenv(serve.AUTH_ENV, raising=False)
    with pytest.raises(ConfigError):
        ui_app.launch(host="0.0.0.0", port=0, block=False)


def test_build_app_has_the_controls(tmp_path):
    from ui.app import build_app

    demo = build_app(tmp_path / "runs", REPO / "recipes")
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    for elem in ("run-select", "recipe-select", "start-btn", "stop-btn", "resume-btn", "run-status", "plot-reward",
                 "plot-held-out", "plot-kl-note",
                 "token-view", "token-step", "export-btn", "try-btn", "runs-table", "compare-plot", "f-rollout-group-size"):
        assert elem in ids, elem


def test_try_the_model_answers_from_the_base(tmp_path, tiny_qwen):
    """Load the run's model in-process, answer one uploaded image, parse the structure, colour tokens by role."""
    from PIL import Image

    from ui import infer

    data = load_recipe_dict(DEMO)
    data.update(name="try", output_dir=str(tmp_path))
    data["model"]["path"] = str(tiny_qwen)
    cfg = config_from_dict(data)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "recipe.yaml").write_text(yaml.safe_dump(data))
    assert infer.model_choices(cfg.run_dir) == [(f"base model ({tiny_qwen})", infer.BASE)]
    cache = infer.ModelCache()
    answer = infer.ask(cfg.run_dir, infer.BASE, Image.new("RGB", (64, 48), "red"), "How many shapes?", 8, cache=cache)
    assert answer.text in "".join(t for t, _ in answer.highlights)  # token pieces cover the decoded answer
    assert 1 <= len(answer.highlights) <= 8 and all(label in tokens.ROLE_COLOR_MAP for _, label in answer.highlights)
    assert "**Answer:**" in answer.structured
    with pytest.raises(Exception, match="upload an image"):
        infer.ask(cfg.run_dir, infer.BASE, None, "q", 8, cache=cache)
    good = "<perception>3 red circles</perception><think>3 is the count</think>\\boxed{3}"
    md, valid = infer.structured_markdown(good, cfg)
    assert valid and "**Perception:** 3 red circles" in md and "**Reasoning:** 3 is the count" in md and "`3`" in md


def test_form_edits_reward_weights_including_a_user_function(tmp_path):
    """The launch form shows the rewards as one line of YAML; a user reward `file.py:fn` is accepted and a
    bad one is reported on that field."""
    from ui.form import FIELDS, errors_for_field, form_values, recipe_from_form, validate

    (tmp_path / "my_rewards.py").write_text("def brevity(response, sample):\n    return 1.0 - len(response) / 200\n")
    base = {"model": {"path": "m"}, "data": {"task": "count_shapes"}}
    values = form_values(base)
    i = [f.key for f in FIELDS].index("reward.weights")
    assert values[i] == "{accuracy: 0.9, format: 0.1}"
    values[i] = f'{{accuracy: 0.9, format: 0.1, "{tmp_path / "my_rewards.py"}:brevity": 0.05}}'
    v = validate(recipe_from_form(base, values))
    assert v.ok, v.message
    assert v.cfg.reward.weights[f"{tmp_path / 'my_rewards.py'}:brevity"] == 0.05
    values[i] = f'{{"{tmp_path / "my_rewards.py"}:nope": 1.0}}'
    bad = validate(recipe_from_form(base, values))
    assert not bad.ok and errors_for_field(bad.errors, "reward.weights")
