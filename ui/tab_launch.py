"""Launch tab: recipe → editable form → live validation, command and YAML preview, memory plan → start."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import gradio as gr
import psutil

from lite_srpo.errors import LiteSrpoError

from . import control
from .form import (FIELDS, FormField, Validation, errors_for_field, fit_to_card, list_recipes, load_form, preview,
                   recipe_from_form, validate)
from .process import child_env
from .views import plan_as_markdown

ERROR_CLASS = "ls-field-error"


def memory_planner():
    """`lite_srpo.model.memory` (plan, format_plan) if this install has it; the panel is hidden otherwise."""
    try:
        from lite_srpo.model.memory.plan import plan
        from lite_srpo.model.memory.report import format_plan
    except ImportError:
        return None
    return plan, format_plan


def make_field(f: FormField) -> gr.components.Component:
    common = dict(label=f.label, info=f.info, elem_id=f.elem_id)
    if f.kind == "bool":
        return gr.Checkbox(**common)
    if f.kind == "choice":
        labels = [("(none — use the train file)" if c == "" else c, c) for c in f.choices]
        return gr.Dropdown(choices=labels, **common)
    if f.kind == "int":
        return gr.Number(precision=0, **common)
    if f.kind == "float":
        return gr.Number(**common)
    return gr.Textbox(lines=1, max_lines=1, **common)


def field_updates(v: Validation) -> list[dict]:
    """Each field's info line shows its own problem (in red) or its help text."""
    out = []
    for f in FIELDS:
        problems = errors_for_field(v.errors, f.key)
        out.append(gr.update(info="⚠ " + "; ".join(problems) if problems else f.info,
                             elem_classes=[ERROR_CLASS] if problems else []))
    return out


def error_markdown(v: Validation) -> str:
    if v.ok:
        return ""
    lines = [f"- {m}" for msgs in v.errors.values() for m in msgs]
    return "**Nothing will start until these are fixed:**\n" + "\n".join(lines)


def processes(value: float | None) -> int:
    """The form's processes field (data-parallel ranks, one per GPU); empty means 1."""
    return max(1, int(value or 1))


def plan_text(v: Validation, gpu_mem: float | None, device: str = "cuda", nproc: int = 1) -> str:
    planner = memory_planner()
    if planner is None or not v.ok:
        return ""
    plan, format_plan = planner
    budget = float(gpu_mem or 24) if device == "cuda" else psutil.virtual_memory().total / 2**30
    try:
        result = plan(v.cfg, budget, device=device, ranks=nproc)
    except (LiteSrpoError, ValueError, TypeError) as exc:
        return f"memory plan unavailable for this recipe: {exc}"
    return plan_as_markdown(format_plan(result))


def build(ctx, run_select: gr.Dropdown, tabs: gr.Tabs) -> None:
    recipes = list_recipes(ctx.recipes_dir)
    default = next((r for r in recipes if Path(r).name == "demo_cpu.yaml"), recipes[0] if recipes else None)
    base_state = gr.State({})
    with gr.Row():
        recipe_dd = gr.Dropdown(choices=[(Path(r).name, r) for r in recipes], value=default, label="Recipe",
                                info=f"from {ctx.recipes_dir}/", elem_id="recipe-select", scale=3)
        plan_device = gr.Radio(["cuda", "cpu"], value="cuda", label="Plan memory for", scale=1,
                               visible=memory_planner() is not None, elem_id="plan-device")
        gpu_mem = gr.Number(24, label="GPU memory (GiB)", visible=memory_planner() is not None, scale=1)
        nproc_box = gr.Number(1, precision=0, minimum=1, label="Processes", elem_id="f-processes", scale=1,
                              info="data-parallel ranks, one per GPU (torchrun); must divide prompts per step")
    fields: list[gr.components.Component] = []
    for start in range(0, len(FIELDS), 4):
        with gr.Row():
            fields += [make_field(f) for f in FIELDS[start:start + 4]]
    overrides = gr.Textbox(label="More settings (key.sub=value, one per line)", lines=2, elem_id="f-overrides",
                           info="any recipe key, e.g. algorithm.srpo.lam=0.3 or data.n_train=256")
    form_error = gr.Markdown(elem_id="form-error")
    with gr.Row():
        tiny_btn = gr.Button("Build a tiny model here", elem_id="build-tiny-btn", size="sm", scale=0)
        preview_btn = gr.Button("Preview", elem_id="preview-btn")
        start_btn = gr.Button("Start training", variant="primary", elem_id="start-btn")
    launch_msg = gr.Markdown(elem_id="launch-msg")
    with gr.Accordion("Predicted peak memory before launch (lite_srpo.model.memory)", open=False,
                      visible=memory_planner() is not None):
        with gr.Row():
            fit_btn = gr.Button("Fit to card", elem_id="fit-btn", size="sm", scale=0)
            fit_msg = gr.Markdown(elem_id="fit-msg")
        plan_md = gr.Markdown(elem_id="plan-md")
    command = gr.Code(label="Command that will run", language="shell", lines=1, interactive=False,
                      elem_id="cmd-preview")
    yaml_box = gr.Code(label="YAML that will be saved", language="yaml", lines=14, max_lines=30, interactive=False,
                       elem_id="yaml-preview")
    preview_outputs = [form_error, *fields, command, yaml_box, plan_md]

    def do_preview(base: dict, *args: Any) -> list:
        *values, extra, mem, device, nproc = args
        v = validate(recipe_from_form(base, list(values), extra))
        if not v.ok:
            return [error_markdown(v), *field_updates(v), "", "", ""]
        cmd, text, yaml_path = preview(v.cfg, processes(nproc))
        notes = []
        if (v.cfg.run_dir / "events.jsonl").exists():
            notes.append(f"⚠ `{v.cfg.run_dir}` already holds a run: pick another run name, or select it in the run "
                         "list and press Resume.")
        if not Path(v.cfg.model.path).exists():
            notes.append(f"ℹ model `{v.cfg.model.path}` is not a local directory: it will be loaded as a hub id. "
                         "For the CPU demo press **Build a tiny model here** first.")
        note = "\n\n".join(notes)
        if v.cfg.rollout.prompts_per_step % processes(nproc):
            notes.append(f"⚠ {processes(nproc)} processes do not divide rollout.prompts_per_step="
                         f"{v.cfg.rollout.prompts_per_step}: each process samples whole groups.")
            note = "\n\n".join(notes)
            return [note, *field_updates(v), f"{cmd}\n# YAML saved to {yaml_path}", text, ""]
        return [note, *field_updates(v), f"{cmd}\n# YAML saved to {yaml_path}", text,
                plan_text(v, mem, device, processes(nproc))]

    def do_load(path: str | None, mem: float | None, device: str, nproc: float | None) -> list:
        if not path:
            return [{}, *[gr.skip()] * len(fields), *[gr.skip()] * len(preview_outputs)]
        try:
            base, values = load_form(path)
        except LiteSrpoError as exc:
            return [{}, *[gr.skip()] * len(fields), f"**Cannot read the recipe:** {exc}",
                    *[gr.skip()] * (len(preview_outputs) - 1)]
        return [base, *values, *do_preview(base, *values, "", mem, device, nproc)]

    def do_start(base: dict, *args: Any) -> list:
        *values, extra, mem, device, nproc = args
        v = validate(recipe_from_form(base, list(values), extra))
        shown = do_preview(base, *args)
        if not v.ok:
            return [*shown, "**Not started:** fix the fields marked in red.", gr.skip(), gr.skip()]
        outcome = control.launch(v.cfg, ctx.roots, cwd=ctx.cwd, nproc=processes(nproc))
        if not outcome.ok:
            return [*shown, f"**{outcome.message}**", gr.skip(), gr.skip()]
        ctx.add_root(v.cfg.output_dir)
        choices = ctx.choices()
        return [*shown, f"✅ {outcome.message}", gr.update(choices=choices, value=str(outcome.run_dir)),
                gr.Tabs(selected="monitor")]

    def do_tiny(path: str) -> str:
        path = (path or "").strip()
        if not path:
            return "**set the model path first**"
        if Path(path).exists():
            return f"`{path}` already exists; nothing built"
        cmd = [sys.executable, "-m", "lite_srpo", "make-tiny", path, "--arch", "qwen2_5_vl", "--size", "demo"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=child_env("cpu"), cwd=ctx.cwd)
        if done.returncode != 0:
            return f"**building the tiny model failed:** {(done.stderr or done.stdout).strip()[-800:]}"
        return f"✅ built a tiny random Qwen2.5-VL in `{path}` (fine for the CPU demo; it learns with SFT warm-up)"

    def do_fit(base: dict, *args: Any) -> list:
        *values, extra, mem, device, nproc = args
        if device != "cuda":
            return [gr.skip(), "**Fit to card** plans a GPU: set *Plan memory for* to cuda."]
        return list(fit_to_card(base, list(values), extra, mem, processes(nproc)))

    inputs = [base_state, *fields, overrides, gpu_mem, plan_device, nproc_box]
    fit_btn.click(do_fit, inputs, [overrides, fit_msg])  # the overrides' change event refreshes the plan
    model_field = fields[[f.key for f in FIELDS].index("model.path")]
    tiny_btn.click(do_tiny, model_field, launch_msg).then(do_preview, inputs, preview_outputs, show_progress="hidden")
    recipe_dd.change(do_load, [recipe_dd, gpu_mem, plan_device, nproc_box], [base_state, *fields, *preview_outputs],
                     show_progress="hidden")
    gr.on([f.change for f in fields] + [overrides.change, preview_btn.click, gpu_mem.change, plan_device.change,
           nproc_box.change],
          do_preview, inputs, preview_outputs,
          show_progress="hidden", trigger_mode="always_last")
    start_btn.click(do_start, inputs, [*preview_outputs, launch_msg, run_select, tabs], concurrency_limit=1)
    ctx.on_page_load(do_load, [recipe_dd, gpu_mem, plan_device, nproc_box], [base_state, *fields, *preview_outputs])
