"""Token role viewer: sampled responses with each token coloured by role and shaded by score, weight or advantage.

Follows the newest `tokens` event; moving the step slider goes back through earlier steps (and stops following).
"""
from __future__ import annotations

from pathlib import Path

import gradio as gr
from PIL import Image

from .monitor import events_of, tail_of
from .tokens import (COLOR_MAP, MODES, ORDERS, first_with_roles, roles_summary, sample_header, sample_label, sample_order,
                     shade_caption, token_events, token_highlights)


def load_image(run_path: str, rel: str | None) -> Image.Image | None:
    """A copy of the sample's image (returned as PIL so Gradio serves it from its own cache)."""
    if not rel:
        return None
    path = Path(run_path) / rel
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError:
        return None


def render(run_path: str | None, index: int, mode: str, sample_index: int | None, order: str = "as sampled") -> list:
    """[step label, sample choices, image, header, highlights, caption, raw response] for one tokens event.
    `sample_index` None (a new step) opens the first response that has roles."""
    events = token_events(events_of(run_path)) if run_path else []
    event = tail_of(run_path).load_full(events[max(0, min(int(index), len(events) - 1))]) if events else None
    if event is None or not event.get("samples"):
        return ["no token events yet (the run writes them every `train.tokens_every` steps)",
                gr.update(choices=[], value=None), None, "", [], "", ""]
    samples = event["samples"]
    k = first_with_roles(samples) if sample_index is None else max(0, min(int(sample_index), len(samples) - 1))
    sample = samples[k]
    tokens = sample.get("tokens") or []
    choices = [(sample_label(i, samples[i]), i) for i in sample_order(samples, order)]
    dropped = " · every group dropped by dynamic sampling: no update" if event.get("dropped") else ""
    return [f"step **{event.get('step')}** ({max(0, min(int(index), len(events) - 1)) + 1} of {len(events)} "
            f"recorded steps) · {roles_summary(samples)}{dropped}",
            gr.update(choices=choices, value=k),
            load_image(run_path, sample.get("image")), sample_header(event, sample),
            token_highlights(tokens, mode), shade_caption(tokens, mode), sample.get("response", "")]


def build(ctx, run_select: gr.Dropdown, timer: gr.Timer) -> None:
    seen = gr.State({})
    with gr.Row():
        mode = gr.Radio(list(MODES), value="weight", label="Shade by", elem_id="token-mode")
        order = gr.Radio(list(ORDERS), value="as sampled", label="List responses", elem_id="token-order")
        follow = gr.Checkbox(True, label="Follow the newest step", elem_id="token-follow")
    step_slider = gr.Slider(0, 1, value=0, step=1, label="Recorded step (drag to go back)", elem_id="token-step")
    step_label = gr.Markdown(elem_id="token-step-label")
    sample_pick = gr.Radio(choices=[], label="Sampled response", type="value", elem_id="token-sample")
    with gr.Row():
        image = gr.Image(type="pil", label="Image", height=240, interactive=False, scale=1, elem_id="token-image")
        with gr.Column(scale=3):
            header = gr.Markdown(elem_id="token-header")
            view = gr.HighlightedText(label="Tokens: blue = perception, amber = reasoning, grey = other; darker = higher",
                                      color_map=COLOR_MAP, show_legend=True, show_inline_category=False,
                                      combine_adjacent=False, elem_id="token-view")
            caption = gr.Markdown(elem_id="token-caption")
    with gr.Accordion("Raw response", open=False):
        raw = gr.Textbox(lines=4, interactive=False, show_label=False)
    view_outputs = [step_label, sample_pick, image, header, view, caption, raw]

    def tick(run_path: str | None, follow_on: bool, index: float, mode_v: str, order_v: str, last: dict) -> list:
        n = len(token_events(events_of(run_path))) if run_path else 0
        state = {"run": run_path, "n": n}
        if last == state:
            return [gr.skip()] * (1 + len(view_outputs)) + [last]
        target = n - 1 if follow_on or last.get("run") != run_path else int(index)
        slider = gr.update(maximum=max(n - 1, 1), value=max(target, 0), interactive=n > 1)
        if not follow_on and last.get("run") == run_path:
            return [slider, *[gr.skip()] * len(view_outputs), state]
        return [slider, *render(run_path, max(target, 0), mode_v, None, order_v), state]  # a new step: open on roles

    def on_slide(run_path: str | None, index: float, mode_v: str, order_v: str) -> list:
        return [False, *render(run_path, int(index), mode_v, None, order_v)]

    def on_change(run_path: str | None, index: float, mode_v: str, sample_v, order_v: str) -> list:
        return render(run_path, int(index), mode_v, sample_v, order_v)

    timer.tick(tick, [run_select, follow, step_slider, mode, order, seen], [step_slider, *view_outputs, seen],
               show_progress="hidden", concurrency_limit=4)
    gr.on([step_slider.release, step_slider.input], on_slide, [run_select, step_slider, mode, order],
          [follow, *view_outputs], show_progress="hidden", trigger_mode="always_last")
    gr.on([mode.input, sample_pick.input, order.input], on_change, [run_select, step_slider, mode, sample_pick, order],
          view_outputs, show_progress="hidden")
    run_select.change(lambda: {}, None, seen)
    follow.input(lambda: {}, None, seen)  # the next tick jumps back to the newest step
