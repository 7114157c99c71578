"""Monitor tab: status with step / total and ETA, Stop / Resume, crash error, live curves, log tail.

A 2 s timer polls the selected run; outputs that did not change are skipped so plots do not flicker.
Curves are smoothed by the slider's EMA over their faint raw values, as in TensorBoard; a chart with
nothing to show is hidden and one line in its place says why. The log tail is `train.log` for runs the
UI started, else a log rendered from the run's events (a run started from the CLI has no log file).
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from lite_srpo.run.plot import DEFAULT_SMOOTHING

from . import control
from .monitor import (PLOTS, POINT_PLOTS, RAW, chart_notes, colour_map, curve_frame, events_log, events_of,
                      log_tail)
from .process import LOG_FILE
from .runs import summarize
from .views import status_html


def plot_id(title: str) -> str:
    """'Reward, accuracy, format rate' -> 'plot-reward'; 'SFT warm-up loss' -> 'plot-sft'."""
    return "plot-" + title.split()[0].strip(",").lower()


def plot_value(frame):
    """None for no data: a LinePlot that first gets an empty frame does not draw the lines that come later."""
    return None if frame.empty else frame


def note_update(note: str | None, title: str = ""):
    """The line that stands in for a chart with nothing to show (KL off, eval off, ...); hidden otherwise."""
    text = f"{title} — {note}" if title and note else note
    return gr.update(value=f"*{text}*" if note else "", visible=bool(note))


def plot_update(frame, x_lim: list | None = None):
    """A chart is drawn only with data; its legend names the smoothed series, not their faint raw values."""
    if frame.empty:
        return gr.update(value=None, visible=False)
    labels = [label for label in dict.fromkeys(frame["series"]) if not label.endswith(RAW)]
    extra = {"x_lim": x_lim} if x_lim else {}
    return gr.update(value=frame, visible=True, colors_in_legend=labels, **extra)


def smoothing_of(value) -> float:
    """The slider's weight, kept inside [0, 0.99] whatever the browser sends."""
    try:
        return min(0.99, max(0.0, float(value)))
    except (TypeError, ValueError):
        return DEFAULT_SMOOTHING


def build(ctx, run_select: gr.Dropdown, timer: gr.Timer) -> None:
    seen = gr.State({})
    status = gr.HTML(status_html(None), elem_id="run-status")
    with gr.Row():
        stop_btn = gr.Button("Stop (finish step, checkpoint)", elem_id="stop-btn", interactive=False)
        stop_now_btn = gr.Button("Stop now", elem_id="stop-now-btn", variant="stop", interactive=False, size="sm")
        resume_btn = gr.Button("Resume from last checkpoint", elem_id="resume-btn", interactive=False)
    action_msg = gr.Markdown(elem_id="action-msg")
    error_box = gr.Textbox(label="Error", lines=8, max_lines=20, visible=False, elem_id="run-error",
                           interactive=False)
    smoothing = gr.Slider(0.0, 0.99, value=DEFAULT_SMOOTHING, step=0.01, label="Smoothing",
                          info="TensorBoard's EMA over each step series; the faint lines are the raw values",
                          elem_id="smoothing")
    plots, notes = [], []
    titles = list(PLOTS)
    for start in range(0, len(titles), 2):
        with gr.Row():
            for title in titles[start:start + 2]:
                with gr.Column():
                    kind = gr.ScatterPlot if title in POINT_PLOTS else gr.LinePlot
                    plots.append(kind(x="step", y="value", color="series", title=title, height=230, x_title="step",
                                      y_title="", x_axis_format="d", y_axis_format=".3~g", visible=False,
                                      color_map=colour_map(PLOTS[title]), elem_id=plot_id(title)))
                    notes.append(gr.Markdown(visible=False, elem_id=plot_id(title) + "-note"))
    log_box = gr.Textbox(label="Training log (tail)", lines=12, max_lines=12, interactive=False, autoscroll=True,
                         elem_id="log-tail")
    outputs = [status, stop_btn, stop_now_btn, resume_btn, error_box, *plots, *notes, log_box, seen]

    def tick(run_path: str | None, weight, last: dict) -> list:
        if not run_path or not Path(run_path).is_dir():
            return [status_html(None), *[gr.skip()] * (len(outputs) - 2), {}]
        s = summarize(run_path)
        events = events_of(run_path)
        log_path = Path(run_path) / LOG_FILE
        has_log = log_path.exists()
        weight = smoothing_of(weight)
        state = {"run": run_path, "n": len(events), "smooth": weight,
                 "log": [has_log, log_path.stat().st_size if has_log else len(events)],
                 "buttons": (s.alive, s.pid is not None, s.status == "stopping", s.resumable), "error": s.error}
        same_run = last.get("run") == run_path
        buttons = ([gr.skip()] * 3 if same_run and last.get("buttons") == list(state["buttons"]) else
                   [gr.update(interactive=s.alive and s.pid is not None and s.status != "stopping"),
                    gr.update(interactive=s.alive and s.pid is not None),
                    gr.update(interactive=s.resumable)])
        error = (gr.skip() if same_run and last.get("error") == s.error else
                 gr.update(value=s.error, visible=bool(s.error)))
        if same_run and last.get("n") == state["n"] and last.get("smooth") == weight:
            curves = [gr.skip()] * (len(plots) + len(notes))
        else:
            why = chart_notes(events)
            # eval points span the whole run (0 .. total steps): one point alone is not a chart's edge
            span = [0, s.total_steps + max(1, s.total_steps // 50)] if s.total_steps else None
            curves = ([plot_update(curve_frame(events, series, 0.0), span) if title in POINT_PLOTS else
                       plot_update(curve_frame(events, series, weight)) for title, series in PLOTS.items()] +
                      [note_update(why.get(title), title) for title in PLOTS])
        if same_run and last.get("log") == state["log"]:
            log = gr.skip()
        else:
            log = log_tail(log_path) if has_log else events_log(events)
        state["buttons"] = list(state["buttons"])
        return [status_html(s), *buttons, error, *curves, log, state]

    timer.tick(tick, [run_select, smoothing, seen], outputs, show_progress="hidden", concurrency_limit=4)
    run_select.change(tick, [run_select, smoothing, gr.State({})], outputs, show_progress="hidden")
    # The browser's plots keep their drawn paths when only the data changes: clear them, then redraw.
    smoothing.change(lambda: [gr.update(value=None)] * len(plots), None, plots, show_progress="hidden",
                     trigger_mode="always_last").then(
        tick, [run_select, smoothing, gr.State({})], outputs, show_progress="hidden")

    def do_stop(run_path: str | None) -> str:
        return control.stop(run_path).message if run_path else "select a run first"

    def do_stop_now(run_path: str | None) -> str:
        return control.stop(run_path, now=True).message if run_path else "select a run first"

    def do_resume(run_path: str | None) -> str:
        if not run_path:
            return "select a run first"
        outcome = control.resume(run_path, ctx.roots)
        return ("✅ " if outcome.ok else "**") + outcome.message + ("" if outcome.ok else "**")

    stop_btn.click(do_stop, run_select, action_msg)
    stop_now_btn.click(do_stop_now, run_select, action_msg)
    resume_btn.click(do_resume, run_select, action_msg, concurrency_limit=1)
