"""`lite-srpo plan`: the plan as a table with its verdict, and the command line."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ...config import load_config
from ...errors import ConfigError, LiteSrpoError
from .plan import CUDA_ALLOCATOR_SLACK, CUDA_CONTEXT_GIB, HOST_PINNED_FRACTION, HOST_PROCESS_GIB, machine_ram_gib, plan
from .terms import GIB


def format_plan(p: dict) -> str:
    """The plan as text: a header, the breakdown table (Markdown) and the verdict."""
    s = p["shape"]
    lines = [
        f"model: {p['model']} ({p['family']}, {p['params_b']:.2f}B params; V={p['dims']['vocab']}, "
        f"{p['dims']['layers']} layers, H={p['dims']['hidden']})",
        f"device: {p['device']} — predicts the {p['measures']}",
        f"step: {s['prompts_per_step']} prompt(s) x G={s['group_size']} = {s['responses']} responses; prompt "
        f"{s['prompt_tokens']} tokens ({s['prompt_how']}); responses {s['response_tokens']} tokens; micro-batch "
        f"{s['micro_batch']}; lm_head chunk {s['logprob_chunk']}{' (auto)' if s.get('logprob_chunk_setting') == 'auto' else ''}; "
        f"{'4-bit NF4' if s['load_in_4bit'] else 'unquantized'} base, {s['compute_bytes']}-byte compute",
        f"memory settings: at most {s['generation_rows']} rows per generate call; gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}; offload_activations {str(s['offload_activations']).lower()}; "
        f"recompute_chunk {s['recompute_chunk'] or 'off'}; attention {s['attn_implementation']}",
        *([f"ranks: {s['ranks']} processes (one per GPU); each samples {s['prompts_per_rank']} prompt(s) x G="
           f"{s['group_size']} = {s['responses_per_rank']} responses and holds the whole model: every figure "
           "below is per rank (NCCL's own buffers are not modelled)"] if s.get("ranks", 1) > 1 else []),
        "",
        "| term | phase | GiB | how |",
        "|---|---|---:|---|",
    ]
    for t in p["terms"]:
        lines.append(f"| {t['name']} | {t['phase']} | {t['gib']:.3f} | {t['how']} |")
    for phase, gib in p["phases"].items():
        mark = " (peak)" if phase == p["peak_phase"] else ""
        lines.append(f"| **fixed + {phase}{mark}** | {phase} | **{gib:.3f}** | |")
    lines.append("")
    if p["device"] == "cuda":
        lines.append(f"peak allocated {p['peak_gib']:.2f} GiB; needed on the card {p['needed_gib']:.2f} GiB "
                     f"(x{CUDA_ALLOCATOR_SLACK} allocator slack + {CUDA_CONTEXT_GIB} GiB CUDA context)")
    else:
        lines.append(f"peak RSS {p['peak_gib']:.2f} GiB")
    if p.get("host_gib"):
        line = f"pinned host memory for offloaded activations: {p['host_gib']:.2f} GiB (RAM, not on the card)"
        if p.get("host_mem_gib") is not None:
            line += (f"; {'fits' if p['host_fits'] else 'DOES NOT FIT'} {p['host_mem_gib']:.1f} GiB of RAM (pinned "
                     f"<= {HOST_PINNED_FRACTION:g} of RAM, + {HOST_PROCESS_GIB:g} GiB for the process)")
        lines.append(line)
    verdict = "FITS" if p["fits"] else "DOES NOT FIT"
    why = " (the card would; the machine's RAM would not hold the pinned buffers)" if (
        not p["fits"] and p["needed_gib"] <= p["budget_gib"]) else ""
    lines.append(f"{verdict} in {p['budget_gib']:.1f} GiB{why}")
    lines.append(f"streamed logits: {p['logits_gib']:.2f} GiB (full [tokens x vocab] fp32 logits would be "
                 f"{p['full_logits_gib']:.2f} GiB)")
    mg, mr = p["max_group_size"], p["max_response_tokens"]
    lines.append(f"largest group size that fits (other settings unchanged): {mg if mg is not None else 'none'}"
                 + (" (search capped at 4096)" if mg == 4096 else ""))
    lines.append(f"largest response length that fits: {mr if mr is not None else 'none'}"
                 + (" (search capped at 262144)" if mr == 262_144 else ""))
    return "\n".join(lines)


def parse_memory(text: str) -> float:
    """'24GiB', '24 GB', '24000MiB', '24' (GiB) -> GiB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|[KMGT])?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"--gpu-mem {text!r}: expected a size like 24GiB, 24GB or 24")
    value, unit = float(m.group(1)), (m.group(2) or "GiB").upper()
    binary = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit[0]]
    decimal = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[unit[0]]
    factor = binary if (unit.endswith("IB") or len(unit) == 1) else decimal
    return value * factor / GIB


def plan_main(argv: list[str] | None = None) -> int:
    """`lite-srpo plan RECIPE [key=value ...] [--gpu-mem 24GiB] [--device cuda|cpu] [--json] [--fit [--response-len N]]`."""
    ap = argparse.ArgumentParser(prog="lite-srpo plan",
                                 description="Predict the peak memory of a training step before launch.")
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for train")
    ap.add_argument("--gpu-mem", default=None, help="memory budget, e.g. 24GiB (implies --device cuda if not set)")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                    help="auto: cuda when --gpu-mem is given or a GPU is present, else cpu")
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="prompt length incl. image tokens (default: estimated)")
    ap.add_argument("--nproc", type=int, default=1, metavar="N",
                    help="data-parallel processes: plan the memory of one rank (prompts_per_step / N prompts each)")
    ap.add_argument("--host-mem", default=None,
                    help="the machine's RAM for pinned offload buffers, e.g. 32GiB (default: this machine's)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("--fit", action="store_true",
                    help="search the fastest memory settings that fit the card (generate calls and rows, micro-batch, "
                         "lm_head chunk, checkpointing, offload, recompute chunk) and print the overrides to paste")
    ap.add_argument("--response-len", type=int, default=None, metavar="N",
                    help="with --fit: fit rollout.max_new_tokens=N instead of the recipe's length")
    ap.add_argument("--trace", action="store_true",
                    help="run one step at the model's real shapes on meta tensors (from its config.json alone, "
                         "--config FILE) and compare it with the plan phase by phase (lite-srpo plan RECIPE --trace -h)")
    a = ap.parse_args(argv)
    if a.trace:
        raise SystemExit("--trace is handled by `lite-srpo plan` (lite_srpo.rl.trace_report)")
    try:
        cfg = load_config(a.recipe, a.overrides)
        device = a.device
        if device == "auto":
            device = "cuda" if a.gpu_mem is not None or _cuda_available() else "cpu"
        budget = parse_memory(a.gpu_mem) if a.gpu_mem is not None else (24.0 if device == "cuda" else machine_ram_gib())
        host = parse_memory(a.host_mem) if a.host_mem is not None else machine_ram_gib()
        if a.response_len is not None and not a.fit:
            raise ConfigError("--response-len needs --fit (to plan another length: rollout.max_new_tokens=N)")
        if a.fit:
            from .fit import fit, format_fit

            found = fit(cfg, budget, device=device, prompt_tokens=a.prompt_tokens, ranks=a.nproc,
                        response_tokens=a.response_len, host_mem_gib=host)
            print(json.dumps(found, indent=2) if a.json else f"lite-srpo plan --fit {a.recipe}\n"
                  + format_fit(found, " ".join([a.recipe, *a.overrides])))
            return 0 if found["fits"] else 1
        result = plan(cfg, budget, device=device, prompt_tokens=a.prompt_tokens, ranks=a.nproc, host_mem_gib=host)
    except LiteSrpoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if a.json else f"lite-srpo plan {a.recipe}\n" + format_plan(result))
    return 0 if result["fits"] else 1


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()
