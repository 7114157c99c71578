"""Export a run's checkpoint as a peft adapter or as a standalone merged model, verified by logits.

Merged export never merges into 4-bit layers: re-quantizing `W + BA` into NF4 moves logits by ~0.3
(research/anchors.md §7.4). The base is loaded exactly as in training, its 4-bit layers are dequantized
module by module to the training compute dtype (each NF4 weight is freed as its replacement lands,
so only one full-precision copy ever exists), then the adapter is merged and the model saved in
safetensors shards. Every export is reloaded from disk and compared, logit by logit, with the trained
adapter model on a few chat-templated probe prompts; above the tolerance nothing is written.

Everything is written into a temporary sibling directory and renamed into place at the end, so a
failure or Ctrl-C leaves no partial export.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from ...run.checkpoint import RECIPE_FILE
from ...run.events import read_events
from .adapter import adapter_logits, write_adapter
from .card import model_card
from .merge import merged_logits, write_merged, write_quantized
from .monitor import MemoryMonitor, peak_rss_gib
from .plan import ExportPlan, dtype_name
from .source import EXPORT_INFO, ExportError, check_adapter_fits, say
from .verify import compare_logits, probe_images, reference_logits, within_tolerance


def check_output(out: Path, force: bool, protected: list[Path]) -> None:
    """Refuse a non-empty `out` without --force, and any `out` whose replacement would delete an input."""
    target = out.resolve()
    for p in protected:
        p = p.resolve()
        if target == p or target in p.parents:
            raise ExportError(f"--out {out}: would replace {p}, which the export reads; choose another directory")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out}: directory is not empty (pass --force to replace it)")


def export(plan: ExportPlan, log=say) -> dict:
    """Run the whole export into a temporary directory, verify it, then move it to `plan.out`."""
    src = plan.source
    base_dir = [Path(plan.base)] if Path(plan.base).is_dir() else []
    check_output(plan.out, plan.force, [src.checkpoint, *([src.run_dir] if src.run_dir else []), *base_dir])
    n_modules = check_adapter_fits(src.adapter_dir, plan.base, src.cfg.model.trust_remote_code)
    plan.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan.out.parent / f".tmp-{plan.out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        with MemoryMonitor() as memory:
            check, quantized = _build(plan, tmp, n_modules, memory, log)
        info = _export_info(plan, check, quantized, memory, time.perf_counter() - t0)
        (tmp / RECIPE_FILE).write_text(src.recipe_yaml, encoding="utf-8")
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=1, default=str) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(model_card(plan, info), encoding="utf-8")
        _publish(tmp, plan.out, plan.force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cuda = f", {info['peak_cuda_gib']:.2f} GiB CUDA" if info["peak_cuda_gib"] is not None else ""
    anon = f" ({info['peak_anon_gib']:.2f} GiB anonymous; the rest is memory-mapped files)" \
        if info["peak_anon_gib"] is not None else ""
    log(f"[export] peak memory: {info['peak_rss_gib']:.2f} GiB RSS{anon}{cuda}")
    log(f"[export] wrote {plan.out} ({plan.mode}, {_size_mb(plan.out):.1f} MB) in {info['seconds']:.1f} s")
    return info


def _build(plan: ExportPlan, tmp: Path, n_modules: int, memory: MemoryMonitor, log) -> tuple[dict, dict | None]:
    """Reference logits → write the export into `tmp` → reload and compare (→ optional 4-bit copy)."""
    four_bit, dtype = plan.source.cfg.model.load_in_4bit, dtype_name(plan.dtype)
    log(f"[export] reference: the trained adapter model ({'4-bit NF4' if four_bit else dtype} base, {n_modules} "
        f"LoRA modules, {dtype} compute) on {len(probe_images())} probe prompts")
    reference, mask = reference_logits(plan)
    memory.mark("reference")
    if plan.mode == "adapter":
        write_adapter(plan, tmp)
        exported = adapter_logits(plan, tmp)
    else:
        log(f"[export] merging: {'dequantize NF4 → ' if four_bit else ''}{dtype}, merge LoRA, save safetensors "
            f"(shards ≤ {plan.max_shard_size})")
        write_merged(plan, tmp)
        memory.mark("merge")
        exported = merged_logits(tmp, plan)
    memory.mark("verify")
    check = compare_logits(reference, exported, mask)
    check.update(tolerance=plan.tolerance, passed=within_tolerance(check, plan.tolerance))
    scaled = check["logit_scale"] > 1
    log(f"[export] verify: max |Δlogit| = {check['max_abs_diff']:.3g} over {check['tokens']} tokens (logit scale "
        f"{check['logit_scale']:.3g}, tolerance {plan.tolerance:g}{' × scale' if scaled else ''}), top-1 agreement "
        f"{100 * check['top1_agreement']:.1f}%")
    if not check["passed"]:
        allowed = f"{plan.tolerance:g}" + (f" × {check['logit_scale']:.3g}" if scaled else "")
        raise ExportError(f"verification FAILED: the exported model differs from the trained adapter model by "
                          f"{check['max_abs_diff']:.3g} in logits (allowed {allowed}); nothing was written. Check "
                          "--base and --dtype, or loosen --tolerance if this dtype is expected to differ.")
    quantized = None
    if plan.quantize == "4bit":
        log("[export] quantizing a bitsandbytes NF4 copy of the merged model (not bit-exact)")
        quantized = write_quantized(plan, tmp, reference, mask)
        memory.mark("quantize")
        log(f"[export] 4-bit copy: max |Δlogit| = {quantized['max_abs_diff']:.3g} vs the adapter model (reported "
            "only; quantization rounds the merged weights)")
    return check, quantized


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Rename into place; with --force the old directory is swapped out first, then deleted."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if out.exists():
        if not force:
            raise ExportError(f"--out {out}: appeared while exporting (pass --force to replace it)")
        old = out.parent / f".old-{out.name}-{os.getpid()}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6


def _latest_eval(run_dir: Path | None, step: int) -> dict | None:
    if run_dir is None or not (run_dir / "events.jsonl").is_file():
        return None
    evals = [e for e in read_events(run_dir / "events.jsonl")
             if e.get("type") == "eval" and (e.get("step") or 0) <= step]
    return evals[-1] if evals else None


def _export_info(plan: ExportPlan, check: dict, quantized: dict | None, memory: MemoryMonitor, seconds: float) -> dict:
    src = plan.source
    return {
        "mode": plan.mode,
        "checkpoint": str(src.checkpoint),
        "step": src.step,
        "total_steps": src.cfg.train.steps,
        "run": src.cfg.name,
        "algorithm": src.cfg.algorithm.name,
        "base": plan.base,
        "trained_in_4bit": src.cfg.model.load_in_4bit,
        "dtype": dtype_name(plan.dtype),
        "merge": None if plan.mode == "adapter" else (
            "dequantized NF4 base, then merged" if src.cfg.model.load_in_4bit else "merged into the base weights"),
        "verification": {**check, "probes": len(probe_images()),
                         "reference": "trained adapter model (peft, as in training)"},
        "quantized_copy": quantized,
        "peak_rss_gib": peak_rss_gib(),
        "peak_anon_gib": memory.anon_peak,
        "peak_by_stage": memory.stages,
        "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "seconds": seconds,
        "metrics": src.metrics,
        "eval": _latest_eval(src.run_dir, src.step),
    }
