"""Model cards: README.md of an export (how to load it, how it was verified, metrics, the recipe)."""
from __future__ import annotations

from .plan import QUANTIZED_SUBDIR, ExportPlan


def model_card(plan: ExportPlan, info: dict) -> str:
    """README.md: how to load it, how it was verified, the step's metrics and the full recipe."""
    src, cfg = plan.source, plan.source.cfg
    adapter = plan.mode == "adapter"
    v = info["verification"]
    tags = ["lite-srpo", "rlvr", cfg.algorithm.name, "vision-language", "lora" if adapter else "merged"]
    lines = ["---", f"base_model: {plan.base}", f"library_name: {'peft' if adapter else 'transformers'}",
             "pipeline_tag: image-text-to-text", "tags:", *[f"- {t}" for t in tags], "---", "",
             f"# {cfg.name}: {cfg.algorithm.name} ({'LoRA adapter' if adapter else 'merged model'})", "",
             f"Trained with lite-srpo ({cfg.algorithm.name}) on top of `{plan.base}`; exported from checkpoint "
             f"`{src.checkpoint.name}` (step {src.step} of {cfg.train.steps}).", ""]
    if adapter:
        lines += ["A peft LoRA adapter (`adapter_model.safetensors`, `adapter_config.json`) and the processor.", "",
                  "```python", "from peft import PeftModel", "from transformers import AutoModelForImageTextToText", "",
                  f"base = AutoModelForImageTextToText.from_pretrained({plan.base!r})",
                  "model = PeftModel.from_pretrained(base, \"<this directory>\")", "```", ""]
    else:
        how = ("its 4-bit NF4 base was loaded exactly as in training, dequantized to "
               f"{info['dtype']} module by module, and the adapter merged into those weights (never into 4-bit layers)"
               if cfg.model.load_in_4bit else f"the adapter was merged into the {info['dtype']} base weights")
        lines += [f"A standalone {info['dtype']} model: {how}. It needs neither peft nor lite-srpo.", "",
                  "```python", "from transformers import AutoModelForImageTextToText, AutoProcessor", "",
                  "model = AutoModelForImageTextToText.from_pretrained(\"<this directory>\")",
                  "# Qwen processors need torchvision; without it use lite_srpo.model.processors.load_processor",
                  "processor = AutoProcessor.from_pretrained(\"<this directory>\")",
                  "```", ""]
        if info["quantized_copy"]:
            q = info["quantized_copy"]
            lines += [f"`{QUANTIZED_SUBDIR}/` holds a **bitsandbytes NF4-quantized** copy of this merged model for "
                      f"smaller memory. It is **not bit-exact** with the adapter model: max |Δlogit| "
                      f"{q['max_abs_diff']:.3g} on the probes (top-1 agreement {100 * q['top1_agreement']:.1f}%).", ""]
    lines += ["## Verification", "",
              f"After export, the files were reloaded and compared with the trained adapter model on {v['probes']} "
              f"chat-templated probe prompts with synthetic images ({v['tokens']} tokens, {info['dtype']}): "
              f"max |Δlogit| = {v['max_abs_diff']:.3g} (logit scale {v['logit_scale']:.3g}, tolerance "
              f"{v['tolerance']:g}), top-1 agreement {100 * v['top1_agreement']:.1f}%.", "",
              f"Peak memory during export: {info['peak_rss_gib']:.2f} GiB RSS"
              + (f" ({info['peak_anon_gib']:.2f} GiB anonymous)." if info["peak_anon_gib"] is not None else "."), ""]
    numeric = {k: v for k, v in sorted(src.metrics.items()) if isinstance(v, (int, float))}
    if numeric:
        lines += [f"## Training metrics at step {src.step}", "", "| metric | value |", "|---|---|",
                  *[f"| {k} | {val:.4g} |" for k, val in numeric.items()], ""]
    ev, nan = info.get("eval"), float("nan")
    if ev:
        lines += [f"## Held-out evaluation (step {ev.get('step')}, {ev.get('protocol')})", "",
                  f"accuracy {ev.get('accuracy', nan):.3f}, format rate {ev.get('format_rate', nan):.3f}, "
                  f"mean length {ev.get('mean_length', nan):.1f} tokens over {ev.get('n_samples')} samples.", ""]
    lines += ["## Recipe", "", "```yaml", src.recipe_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


def quantized_card(plan: ExportPlan, cmp: dict) -> str:
    return "\n".join([
        "---", f"base_model: {plan.base}", "library_name: transformers", "pipeline_tag: image-text-to-text",
        "tags:", "- lite-srpo", "- 4-bit", "- bitsandbytes", "- quantized", "---", "",
        f"# {plan.source.cfg.name}: merged model, QUANTIZED to bitsandbytes NF4 (4-bit)", "",
        "This is a 4-bit (NF4, double quantization) copy of the merged model in the parent directory, for users "
        "who want a smaller download or less GPU memory. It is **not bit-exact** with the trained adapter model: "
        f"quantizing the merged weights moves the logits by up to {cmp['max_abs_diff']:.3g} on the export's probes "
        f"(top-1 agreement {100 * cmp['top1_agreement']:.1f}%). Use the parent directory for exact results.", "",
        "Loading needs `bitsandbytes`: `AutoModelForImageTextToText.from_pretrained(\"<this directory>\")`.", ""])
