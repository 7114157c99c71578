"""Merged export: the base loaded as in training, its 4-bit layers dequantized module by module, the LoRA
merged into them and the result saved as safetensors shards; optionally a 4-bit copy of the merged model.

Merging never goes into 4-bit layers: re-quantizing `W + BA` into NF4 moves logits by ~0.3
(research/anchors.md §7.4)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from ...errors import ModelError
from .card import quantized_card
from .monitor import collect, is_large, release_later
from .plan import QUANTIZED_SUBDIR, ExportPlan
from .source import ExportError
from .verify import compare_logits, probe_inputs, probe_logits


def write_merged(plan: ExportPlan, tmp: Path) -> None:
    """Base as in training → dequantize (module by module) → merge LoRA → save shards + processor."""
    import bitsandbytes as bnb
    from peft import PeftModel

    from ..policy import load_base

    base, processor, _ = load_base(plan.model_cfg, plan.device)
    large = is_large(base)
    collect(large)  # unmaps the checkpoint files the loader read
    if plan.model_cfg.load_in_4bit:
        base = base.dequantize(dtype=plan.dtype)
        collect(large)  # frees the replaced 4-bit modules
    left = [n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    if left:  # merging into these would re-quantize W + BA (anchors.md §7.4)
        raise ModelError(f"dequantization left {len(left)} 4-bit layers (e.g. {left[0]}); refusing to merge into them")
    try:
        model = PeftModel.from_pretrained(base, str(plan.source.adapter_dir), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).splitlines()[0]
        raise ModelError(f"adapter {plan.source.adapter_dir} does not fit {plan.base}: {first}") from None
    merged = model.merge_and_unload()
    del model, base
    merged.config.dtype = plan.dtype
    merged.save_pretrained(str(tmp), max_shard_size=plan.max_shard_size, safe_serialization=True)
    processor.save_pretrained(str(tmp))
    release = release_later(merged)
    del merged
    release()


def _load_exported(path: Path, plan: ExportPlan) -> torch.nn.Module:
    """Plain transformers load, as a user without peft or lite-srpo would do it."""
    from transformers import AutoModelForImageTextToText

    kwargs: dict[str, Any] = {"dtype": plan.dtype, "trust_remote_code": plan.source.cfg.model.trust_remote_code}
    config = path / "config.json"
    quantized = config.is_file() and "quantization_config" in json.loads(config.read_text(encoding="utf-8"))
    if quantized:
        kwargs["device_map"] = {"": plan.device.index or 0} if plan.device.type == "cuda" else {"": "cpu"}
    model = AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)
    if quantized and plan.device.type == "cpu":
        from ..policy import disable_cpu_4bit_repacking

        disable_cpu_4bit_repacking(model)
    elif not quantized:
        model.to(plan.device)
    return model.eval()


def merged_logits(path: Path, plan: ExportPlan) -> torch.Tensor:
    from ..processors import load_processor

    model = _load_exported(path, plan)
    if any("lora_" in n for n, _ in model.named_parameters()):
        raise ExportError(f"{path}: the saved model still has LoRA parameters")
    logits = probe_logits(model, probe_inputs(load_processor(path), plan.fmt))
    release = release_later(model)
    del model
    release()
    return logits


def write_quantized(plan: ExportPlan, tmp: Path, reference: torch.Tensor, mask: torch.Tensor) -> dict:
    """A bitsandbytes NF4 copy in `<out>/4bit`, quantized with the training's 4-bit settings."""
    from ..policy import load_base

    target = tmp / QUANTIZED_SUBDIR
    model, processor, _ = load_base(dataclasses.replace(plan.model_cfg, path=str(tmp), load_in_4bit=True), plan.device)
    model.save_pretrained(str(target), max_shard_size=plan.max_shard_size, safe_serialization=True)
    processor.save_pretrained(str(target))
    release = release_later(model)
    del model
    release()
    cmp = merged_logits(target, plan)
    result = compare_logits(reference, cmp, mask)
    result["path"] = QUANTIZED_SUBDIR
    (target / "README.md").write_text(quantized_card(plan, result), encoding="utf-8")
    return result
