"""`lite-srpo train|demo|make-tiny|...`: thin argument parsing over the library; errors print one line."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable

from .errors import LiteSrpoError

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def command(name: str, help_text: str):
    def register(fn_pair):
        add_args, run = fn_pair()
        COMMANDS[name] = (add_args, run, help_text)
        return fn_pair
    return register


@command("train", "train with a recipe: lite-srpo train RECIPE [key.sub=value ...] [--resume]")
def _train():
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("recipe", help="YAML recipe (see recipes/)")
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=10")
        p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--nproc", type=int, default=1, metavar="N",
                       help="data-parallel processes (GPUs), started with torchrun for you; 1 = this process")

    def run(a: argparse.Namespace) -> int:
        from .config import load_config
        from .rl.pipeline import run_training

        cfg = load_config(a.recipe, a.overrides)
        if a.nproc != 1:
            from .run.launch import launch_torchrun

            return launch_torchrun(cfg, a.nproc, [a.recipe, *a.overrides], resume=a.resume, quiet=a.quiet)
        run_training(cfg, resume=a.resume, quiet=a.quiet)
        return 0
    return add, run


@command("demo", "tiny model → SFT warm-up → RL → held-out accuracy table (CPU, minutes)")
def _demo():
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides on recipes/demo_cpu.yaml")
        p.add_argument("--recipe", default=None, help="recipe to use instead of the bundled demo recipe")

    def run(a: argparse.Namespace) -> int:
        from .eval.demo import run_demo

        run_demo(a.recipe, a.overrides)
        return 0
    return add, run


@command("make-tiny", "write a tiny random VLM (real HF architecture, tokenizer, processor) to OUT_DIR")
def _make_tiny():
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("out_dir")
        p.add_argument("--arch", required=True, help="qwen2_5_vl | qwen2_vl | idefics3 | qwen3_vl")
        p.add_argument("--size", default="test", choices=["test", "demo"])
        p.add_argument("--seed", type=int, default=0)

    def run(a: argparse.Namespace) -> int:
        from .model.tiny import make_tiny

        print(make_tiny(a.arch, a.out_dir, size=a.size, seed=a.seed))
        return 0
    return add, run


@command("compare", "train GRPO, DAPO, SRPO, PAPO, VPPO, VGPO from one warm-up checkpoint and tabulate")
def _compare():
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("overrides", nargs="*", help="key.sub=value overrides on the demo recipe (all arms)")
        p.add_argument("--recipe", default=None)
        p.add_argument("--arms", default="grpo,dapo,srpo,papo,vppo,vgpo", help="comma-separated algorithms")
        p.add_argument("--arm", action="append", default=[], metavar="NAME=OVERRIDES",
                       help="a named arm with its own overrides, e.g. "
                            "srpo_po='algorithm.name=srpo algorithm.srpo.consistency=perception_only' (repeatable)")
        p.add_argument("--seeds", type=int, default=1, help="seeds per arm (train.seed, +1, ...); CIs need >= 3")
        p.add_argument("--first-seed", type=int, default=0,
                       help="start at train.seed + N: more seeds for an earlier comparison, merged by --report")
        p.add_argument("--out", default="runs/compare")
        p.add_argument("--report", nargs="+", metavar="COMPARE_JSON", default=None,
                       help="no training: re-analyse saved compare.json files (same warm-up and items; merged), "
                            "print every contrast, write report.json and report.png beside the first")
        p.add_argument("--report-out", default=None, metavar="JSON",
                       help="with --report: write the report here (and its figure beside it, .png)")

    def run(a: argparse.Namespace) -> int:
        if a.report:
            from .eval.compare_report import report

            report(a.report, out=a.report_out)
            return 0
        from .eval.compare import run_compare

        arms = tuple(x for x in a.arms.split(",") if x) + tuple(a.arm)
        run_compare(a.recipe, a.overrides, arms, a.out, seeds=a.seeds, first_seed=a.first_seed)
        return 0
    return add, run


@command("plot", "learning curves of one or more runs as a PNG (default RUN/curves.png); prints its path")
def _plot():
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (with events.jsonl); overlaid")
        p.add_argument("--out", default=None, help="PNG path (default: FIRST_RUN/curves.png)")
        p.add_argument("--smooth", type=int, default=None,
                       help="moving-average window drawn on the raw values (default: automatic; 0 = raw only)")

    def run(a: argparse.Namespace) -> int:
        from .run.plot import write_curves

        print(write_curves(a.runs, a.out, smooth=a.smooth))
        return 0
    return add, run


def _delegate(module: str, function: str):
    """Commands whose parser lives with their logic (export, eval, plan) get the raw argv."""
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("args", nargs=argparse.REMAINDER)

    def run(a: argparse.Namespace) -> int:
        import importlib

        args = a.args[1:] if a.args[:1] == ["--"] else a.args
        return getattr(importlib.import_module(module), function)(args)
    return add, run


DELEGATED = {"export", "eval", "plan"}
command("export", "export a run/checkpoint: --mode adapter|merged --out DIR (see lite-srpo export -h)")(
    lambda: _delegate("lite_srpo.model.export.cli", "export_main"))
command("eval", "evaluate a model/run/checkpoint under a named protocol (see lite-srpo eval -h)")(
    lambda: _delegate("lite_srpo.eval.eval_cli", "eval_main"))
command("plan", "predict a recipe's peak memory on a GPU before launch; --trace runs the step at real shapes on "
        "meta tensors (see lite-srpo plan -h)")(
    lambda: _delegate("lite_srpo.rl.trace_report", "plan_or_trace_main"))


def _ui_serve():
    """`ui.serve`; from a source checkout whose `ui/` is not installed, the checkout goes on the path first."""
    try:
        from ui import serve
    except ModuleNotFoundError as exc:
        if exc.name not in ("ui", "ui.serve"):
            raise
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from ui import serve
    return serve


@command("ui", "start the Gradio UI on 127.0.0.1")
def _ui():
    def add(p: argparse.ArgumentParser) -> None:
        _ui_serve().add_arguments(p)  # no Gradio import: every command builds this parser

    def run(a: argparse.Namespace) -> int:
        from ui.app import run_from_args

        return run_from_args(a)
    return add, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lite-srpo", description="RLVR for vision-language models on one GPU.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_args, _, help_text) in COMMANDS.items():
        # delegated commands parse their own arguments, -h included
        add_args(sub.add_parser(name, help=help_text, description=help_text, add_help=name not in DELEGATED))
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:  # these parse their own arguments (-h included)
        argv = [argv[0], "--", *argv[1:]]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "bitsandbytes", "peft", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return COMMANDS[args.command][1](args)
    except LiteSrpoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: stopped at once; the last checkpoint is intact (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
