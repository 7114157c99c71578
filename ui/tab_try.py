"""Try the model: upload an image, ask, read the structured answer of the base or a checkpoint."""
from __future__ import annotations

import gradio as gr

from lite_srpo.errors import LiteSrpoError

from .infer import BASE, ask, model_choices
from .tokens import ROLE_COLOR_MAP


def build(ctx, run_select: gr.Dropdown) -> None:
    with gr.Row():
        model = gr.Dropdown(label="Model", info="the base this run trained from, or one of its checkpoints",
                            elem_id="try-model", scale=3)
        max_tokens = gr.Slider(16, 1024, value=256, step=16, label="Max new tokens", elem_id="try-max-tokens")
    with gr.Row():
        image = gr.Image(type="pil", label="Image", height=280, elem_id="try-image")
        with gr.Column():
            question = gr.Textbox(label="Question", lines=3, elem_id="try-question")
            ask_btn = gr.Button("Ask", variant="primary", elem_id="try-btn")
            status = gr.Markdown(elem_id="try-status")
    answer = gr.Markdown(elem_id="try-answer")
    tokens = gr.HighlightedText(label="Response tokens by role", color_map=ROLE_COLOR_MAP, show_legend=True,
                                show_inline_category=False, elem_id="try-tokens")
    raw = gr.Textbox(label="Raw response", lines=4, interactive=False, elem_id="try-raw")

    def choices(run_path: str | None):
        opts = model_choices(run_path)
        return gr.update(choices=opts, value=opts[0][1] if opts else None)

    def run(run_path: str | None, choice: str | None, img, q: str, n: float):
        if not run_path:
            yield "select a run first (the model comes from its recipe)", gr.skip(), gr.skip(), gr.skip()
            return
        yield "⏳ loading the model (first question only) and generating …", "", [], ""
        try:
            result = ask(run_path, choice or BASE, img, q, int(n))
        except (LiteSrpoError, OSError, ValueError, RuntimeError) as exc:
            yield f"❌ {exc}", "", [], ""
            return
        yield ("✅ done" if result.valid else "✅ done (response is not in the structured format)",
               result.structured, result.highlights, result.text)

    run_select.change(choices, run_select, model)
    ask_btn.click(run, [run_select, model, image, question, max_tokens], [status, answer, tokens, raw],
                  concurrency_limit=1)
    ctx.on_page_load(choices, run_select, model)
