"""`lite-srpo export RUN_OR_CHECKPOINT --mode adapter|merged --out DIR`: the command line."""
from __future__ import annotations

import argparse

from .export import export
from .plan import DTYPES, dtype_name, make_plan
from .source import say


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lite-srpo export",
        description="Export a run's checkpoint as a peft adapter or a merged Hugging Face model, verified by "
                    "comparing logits with the trained adapter model.")
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="runs/<name> (its latest checkpoint) or runs/<name>/checkpoints/step_NNNNNN")
    p.add_argument("--mode", choices=["adapter", "merged"], default="adapter",
                   help="adapter: peft adapter + processor (default); merged: standalone model, no peft needed")
    p.add_argument("--out", required=True, help="output directory (must be empty or absent unless --force)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--quantize", choices=["4bit"], default=None,
                   help="merged only: also save a bitsandbytes NF4 copy in OUT/4bit (not bit-exact)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max |Δlogit| allowed in verification (× the logit scale when that exceeds 1); "
                        "default 1e-4 for float32, 5e-2 for bfloat16/float16")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="weights dtype of the merged model; auto = the recipe's compute dtype (bf16 for 'auto')")
    p.add_argument("--base", default=None, help="base model path, if it moved since training (default: the recipe's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size of the merged model")
    return p


def export_main(argv: list[str]) -> int:
    """`lite-srpo export RUN_OR_CHECKPOINT --mode adapter|merged --out DIR [...]`; raises LiteSrpoError."""
    args = build_parser().parse_args(argv)
    plan = make_plan(args.source, args.out, mode=args.mode, quantize=args.quantize, tolerance=args.tolerance,
                     dtype=args.dtype, base=args.base, device=args.device, force=args.force,
                     max_shard_size=args.max_shard_size)
    say(f"[export] {plan.source.checkpoint} (step {plan.source.step}) → {plan.out} "
        f"[{plan.mode}, {dtype_name(plan.dtype)}, {plan.device}]")
    export(plan)
    return 0
