"""Export tab: adapter-only or merged export of a checkpoint, with progress and the output path."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from lite_srpo.run.checkpoint import checkpoint_dirs

from .export_job import MODES, default_out_dir, export_status, start_export

LAST = "last"
MERGED_NOTE = ("**merged** loads the base as in training, dequantizes a 4-bit base (bf16 on a GPU, fp32 on the CPU), merges the adapter and "
               "saves a full HF model with its processor (needs about 2 bytes × parameters of RAM). **adapter** "
               "writes only the LoRA weights (peft format), small and quick.")


def build(ctx, run_select: gr.Dropdown, timer: gr.Timer) -> None:
    with gr.Row():
        source = gr.Dropdown(label="Checkpoint", elem_id="export-ckpt")
        mode = gr.Radio(list(MODES), value="adapter", label="Mode", elem_id="export-mode")
    gr.Markdown(MERGED_NOTE)
    with gr.Row():
        out_dir = gr.Textbox(label="Output directory", elem_id="export-out", scale=3)
        force = gr.Checkbox(False, label="overwrite", elem_id="export-force", scale=0)
    start = gr.Button("Export", variant="primary", elem_id="export-btn")
    status = gr.Markdown(elem_id="export-status")
    log = gr.Textbox(label="Export log", lines=8, max_lines=8, interactive=False, autoscroll=True,
                     elem_id="export-log")

    def sources(run_path: str | None, current_mode: str):
        if not run_path:
            return gr.update(choices=[], value=None), ""
        ckpts = [(p.name, str(p)) for p in reversed(checkpoint_dirs(run_path))]
        choices = [("latest checkpoint", LAST)] + ckpts
        return gr.update(choices=choices, value=LAST), str(default_out_dir(run_path, LAST, current_mode))

    def retarget(run_path: str | None, src: str | None, current_mode: str):
        return str(default_out_dir(run_path, src or LAST, current_mode)) if run_path else ""

    def go(run_path: str | None, src: str | None, current_mode: str, out: str, overwrite: bool) -> str:
        if not run_path:
            return "select a run first"
        if not checkpoint_dirs(run_path):
            return "this run has no checkpoint yet"
        target = run_path if src in (None, LAST) else src
        return start_export(run_path, target, current_mode, out or default_out_dir(run_path, src or LAST, current_mode),
                            force=overwrite)

    def poll(run_path: str | None):
        if not run_path or not Path(run_path).is_dir():
            return gr.skip(), gr.skip()
        return export_status(run_path)

    run_select.change(sources, [run_select, mode], [source, out_dir])
    gr.on([source.input, mode.input], retarget, [run_select, source, mode], out_dir)
    start.click(go, [run_select, source, mode, out_dir, force], status, concurrency_limit=1)
    timer.tick(poll, run_select, [status, log], show_progress="hidden", concurrency_limit=4)
    ctx.on_page_load(sources, [run_select, mode], [source, out_dir])
