"""The lite-srpo Gradio app (DESIGN.md §6): Launch, Monitor, Tokens, Runs, Export, Try the model.

`python ui/app.py [--host H] [--port P] [--auth user:password] [--runs-dir D] [--recipes-dir D]` or
`lite-srpo ui`. Training runs as a separate process; the app only starts, watches and signals it.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # `python ui/app.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradio as gr

from lite_srpo.errors import ConfigError
from ui import tab_export, tab_launch, tab_monitor, tab_runs, tab_tokens, tab_try
from ui.runs import find_runs, summarize
from ui.serve import AUTH_ENV, add_arguments, check_exposure, parse_auth, resolve_address, resolve_dir
from ui.views import pick_default, run_choices

POLL_SECONDS = 2.0
CSS = """
.ls-status {font-size: 1.05em; padding: 6px 2px;}
.ls-name {font-weight: 700; font-size: 1.15em; margin-right: 8px;}
.ls-badge {color: white; padding: 2px 10px; border-radius: 10px; font-weight: 600;}
.ls-step {margin: 6px 0 4px 0;}
.ls-msg {color: #6b7280; font-size: 0.9em;}
.ls-field-error input, .ls-field-error textarea {border-color: #dc2626 !important;}
.ls-field-error [data-testid="block-info"], .ls-field-error .info {color: #dc2626 !important;}
#form-error {color: #b91c1c;}
"""


class AppContext:
    """Where runs and recipes are, and the page-load hooks the tabs register."""

    def __init__(self, runs_dir: str | Path = "runs", recipes_dir: str | Path = "recipes", cwd: str | Path | None = None):
        self.cwd = Path(cwd or os.getcwd())
        self.runs_dir = Path(runs_dir)
        self.recipes_dir = Path(recipes_dir)
        self.roots: list[Path] = [self.runs_dir]
        self._loads: list[tuple[Callable, Any, Any]] = []

    def add_root(self, path: str | Path) -> None:
        path = Path(path)
        if all(path.resolve() != r.resolve() for r in self.roots):
            self.roots.append(path)

    def run_paths(self) -> list[Path]:
        return find_runs(self.roots)

    def choices(self) -> list[tuple[str, str]]:
        return run_choices([summarize(p) for p in self.run_paths()])

    @staticmethod
    def name_of(path: str | Path | None) -> str:
        return Path(path).name if path else ""

    def on_page_load(self, fn: Callable, inputs: Any, outputs: Any) -> None:
        self._loads.append((fn, inputs, outputs))


def build_app(runs_dir: str | Path = "runs", recipes_dir: str | Path = "recipes") -> gr.Blocks:
    ctx = AppContext(runs_dir, recipes_dir)
    with gr.Blocks(title="lite-srpo") as demo:
        gr.Markdown("## lite-srpo — RLVR for vision-language models, with a per-token view of roles")
        with gr.Row():
            run_select = gr.Dropdown(label="Run", info=f"runs under {ctx.runs_dir}/ (closing this page never stops one)",
                                     elem_id="run-select", scale=4)
            find_btn = gr.Button("Find runs", elem_id="find-runs", scale=1)
        timer = gr.Timer(POLL_SECONDS)
        with gr.Tabs() as tabs:
            with gr.Tab("Launch", id="launch"):
                tab_launch.build(ctx, run_select, tabs)
            with gr.Tab("Monitor", id="monitor"):
                tab_monitor.build(ctx, run_select, timer)
            with gr.Tab("Tokens", id="tokens"):
                tab_tokens.build(ctx, run_select, timer)
            with gr.Tab("Runs", id="runs"):
                tab_runs.build(ctx, run_select)
            with gr.Tab("Export", id="export"):
                tab_export.build(ctx, run_select, timer)
            with gr.Tab("Try the model", id="try"):
                tab_try.build(ctx, run_select)

        def find_runs_now(current: str | None):
            summaries = [summarize(p) for p in ctx.run_paths()]
            return gr.update(choices=run_choices(summaries), value=pick_default(summaries, current))

        find_btn.click(find_runs_now, run_select, run_select)
        chain = demo.load(find_runs_now, run_select, run_select)
        for fn, inputs, outputs in ctx._loads:
            chain = chain.then(fn, inputs, outputs)
    demo.lite_srpo_context = ctx  # for tests and the launcher
    return demo


def launch(host: str | None = None, port: int | None = None, share: bool = False,
           auth: str | tuple[str, str] | None = None, runs_dir: str | Path = "runs",
           recipes_dir: str | Path = "recipes", block: bool = True):
    """Build and serve the app; returns the Blocks (already closed again if `block`)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    credentials = parse_auth(auth if auth is not None else os.environ.get(AUTH_ENV))
    host, port = resolve_address(host, port)
    check_exposure(host, share, credentials)
    demo = build_app(runs_dir=runs_dir, recipes_dir=resolve_dir(recipes_dir, "recipes"))
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_name=host, server_port=port, share=share, auth=credentials, prevent_thread_lock=not block,
                css=CSS, ssr_mode=False, show_error=True, footer_links=[], quiet=not block)
    return demo


def run_from_args(a: argparse.Namespace) -> int:
    launch(host=a.host, port=a.port, share=a.share, auth=a.auth, runs_dir=a.runs_dir, recipes_dir=a.recipes_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python ui/app.py [--host H] [--port P] [--auth user:password] ...`: serve until interrupted."""
    parser = argparse.ArgumentParser(prog="lite-srpo ui", description="the lite-srpo web UI")
    add_arguments(parser)
    try:
        return run_from_args(parser.parse_args(argv))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
