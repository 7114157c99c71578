"""Runs tab: every run with its recipe, status and last metrics; two runs' curves side by side."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from .monitor import compare_frame, events_of, metric_keys
from .process import LAUNCH_RECIPE
from .runs import RUNS_COLUMNS, runs_table, summarize
from .tab_monitor import plot_value

DEFAULT_METRIC = "reward/mean"


def build(ctx, run_select: gr.Dropdown) -> None:
    with gr.Row():
        refresh = gr.Button("Refresh", elem_id="runs-refresh", scale=0)
        note = gr.Markdown("Click a row to select that run for Monitor, Tokens, Export and Try.")
    table = gr.Dataframe(headers=RUNS_COLUMNS, interactive=False, wrap=True, elem_id="runs-table")
    with gr.Accordion("Recipe of the selected run", open=False):
        recipe_box = gr.Code(language="yaml", lines=10, max_lines=30, interactive=False, elem_id="run-recipe")
    gr.Markdown("### Compare two runs")
    with gr.Row():
        run_a = gr.Dropdown(label="Run A", elem_id="compare-a")
        run_b = gr.Dropdown(label="Run B", elem_id="compare-b")
        metric = gr.Dropdown(choices=[DEFAULT_METRIC], value=DEFAULT_METRIC, label="Metric", allow_custom_value=True,
                             elem_id="compare-metric")
    plot = gr.LinePlot(x="step", y="value", color="series", height=300, x_title="step", y_title="",
                       x_axis_format="d", y_axis_format=".3~g",
                       elem_id="compare-plot")

    def refresh_table(a: str | None, b: str | None):
        summaries = [summarize(p) for p in ctx.run_paths()]
        choices = [(s.name, str(s.path)) for s in summaries]
        paths = [str(s.path) for s in summaries]
        a = a if a in paths else (paths[0] if paths else None)
        b = b if b in paths else (paths[1] if len(paths) > 1 else a)
        keys: dict[str, None] = {}
        for p in {a, b} - {None}:
            keys.update(dict.fromkeys(metric_keys(events_of(p))))
        return (runs_table(summaries), gr.update(choices=choices, value=a), gr.update(choices=choices, value=b),
                gr.update(choices=list(keys) or [DEFAULT_METRIC]))

    def compare(a: str | None, b: str | None, key: str | None):
        runs = [(f"A: {ctx.name_of(a)}", events_of(a))] if a else []
        if b and b != a:
            runs.append((f"B: {ctx.name_of(b)}", events_of(b)))
        return plot_value(compare_frame(runs, key or DEFAULT_METRIC))

    def select_row(rows, evt: gr.SelectData):
        try:
            row = evt.index[0]
            return rows.iloc[row][RUNS_COLUMNS.index("path")] if hasattr(rows, "iloc") else rows[row][-1]
        except (IndexError, KeyError, TypeError):
            return gr.skip()

    def show_recipe(run_path: str | None) -> str:
        for name in (LAUNCH_RECIPE, "recipe.yaml"):
            path = Path(run_path or "") / name
            if run_path and path.is_file():
                return f"# {path}\n" + path.read_text(encoding="utf-8")
        return ""

    run_select.change(show_recipe, run_select, recipe_box)
    refresh.click(refresh_table, [run_a, run_b], [table, run_a, run_b, metric]).then(
        compare, [run_a, run_b, metric], plot)
    gr.on([run_a.input, run_b.input, metric.input], compare, [run_a, run_b, metric], plot)
    table.select(select_row, table, run_select)
    ctx.on_page_load(refresh_table, [run_a, run_b], [table, run_a, run_b, metric])
    ctx.on_page_load(compare, [run_a, run_b, metric], plot)
