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

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import re
import resource
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, ImageDraw

from ...config import ModelConfig, RunConfig, config_from_dict, load_recipe_dict
from ...data.prompts import ResponseFormat, build_messages
from ...data.tasks.base import Sample
from ...errors import LiteSrpoError, ModelError
from ...run.checkpoint import ADAPTER_DIR, METRICS_FILE, RECIPE_FILE, STATE_FILE, latest_checkpoint
from ...run.events import read_events

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
EXPORT_INFO = "export.json"
QUANTIZED_SUBDIR = "4bit"
WARMUP_DIR = "warmup_model"
DEFAULT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def say(message: str) -> None:
    """Progress lines flushed at once, so a parent process (the UI) tailing the log sees them live."""
    print(message, flush=True)


class ExportError(LiteSrpoError):
    """An export that cannot be done as asked (no checkpoint, output in the way, verification failed)."""


@dataclass
class CheckpointSource:
    """One training checkpoint and the recipe it was trained with."""

    checkpoint: Path
    run_dir: Path | None
    step: int
    cfg: RunConfig
    recipe_yaml: str
    metrics: dict

    @property
    def adapter_dir(self) -> Path:
        return self.checkpoint / ADAPTER_DIR


# --- finding what to export --------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> CheckpointSource:
    """A run directory (its latest checkpoint) or one `checkpoints/step_NNNNNN` directory."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ExportError(f"{path}: no such run or checkpoint directory")
    if (p / ADAPTER_DIR).is_dir() or (p / STATE_FILE).is_file():
        ckpt, run_dir = p, (p.parent.parent if p.parent.name == "checkpoints" else None)
    elif (p / "checkpoints").is_dir() or (p / RECIPE_FILE).is_file():
        ckpt, run_dir = latest_checkpoint(p), p
        if ckpt is None:
            raise ExportError(f"{p}: the run has no checkpoint yet (nothing in {p / 'checkpoints'}); train it "
                              "first (train.save_every) or pass a checkpoint directory")
    else:
        raise ExportError(f"{p}: not a run (runs/<name>/ with checkpoints/) or a checkpoint "
                          "(runs/<name>/checkpoints/step_NNNNNN/ with adapter/)")
    for name in ADAPTER_FILES:
        if not (ckpt / ADAPTER_DIR / name).is_file():
            raise ExportError(f"{ckpt}: incomplete checkpoint ({ADAPTER_DIR}/{name} missing)")
    recipe = next((r for r in (ckpt / RECIPE_FILE, run_dir and run_dir / RECIPE_FILE) if r and r.is_file()), None)
    if recipe is None:
        raise ExportError(f"{ckpt}: no {RECIPE_FILE} next to the checkpoint or in its run; cannot tell the base model")
    cfg = load_run_config(recipe)
    match = re.fullmatch(r"step_(\d+)", ckpt.name)
    metrics_file = ckpt / METRICS_FILE
    metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.is_file() else {}
    return CheckpointSource(checkpoint=ckpt, run_dir=run_dir, step=int(match.group(1)) if match else -1, cfg=cfg,
                            recipe_yaml=recipe.read_text(encoding="utf-8"), metrics=metrics)


def load_run_config(recipe: Path) -> RunConfig:
    """A run's saved recipe, validated without `reward.weights`.

    Rewards are not needed to export or evaluate, and custom reward functions that the user's training
    script registered are not importable here.
    """
    data = load_recipe_dict(recipe)
    if isinstance(data.get("reward"), dict):
        data["reward"] = {k: v for k, v in data["reward"].items() if k != "weights"}
    return config_from_dict(data, source=str(recipe))


def resolve_base(model_path: str, run_dir: Path | None, override: str | None = None) -> str:
    """The base model directory (absolute) or hub id; a moved run still finds its own warm-up model."""
    wanted = override or model_path
    local = Path(wanted).expanduser()
    candidates = [local]
    if override is None and run_dir is not None and local.name == WARMUP_DIR:
        candidates.append(run_dir / WARMUP_DIR)
    for c in candidates:
        if (c / "config.json").is_file():
            return str(c.resolve())
    if not override and not wanted.startswith((".", "/", "~")) and wanted.count("/") <= 1 and not local.exists():
        return wanted  # a hub id; loading it later says clearly if it is not cached
    hint = "" if override else " — pass --base PATH to point at the base model"
    raise ModelError(f"base model {wanted!r} not found (no config.json there){hint}")


def check_adapter_fits(adapter_dir: str | Path, base: str, trust_remote_code: bool = False) -> int:
    """Compare every LoRA matrix with the base's Linear shapes on an empty (meta) model; returns #modules.

    Catches a wrong `--base` (another architecture or size) before anything heavy is loaded.
    """
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
        with init_empty_weights():
            model = AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"base {base!r}: cannot read its model config: {str(exc).splitlines()[0]}") from None
    linear = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    problems: list[str] = []
    modules: set[str] = set()
    with safe_open(str(Path(adapter_dir) / ADAPTER_FILES[1]), framework="pt") as f:
        for key in f.keys():
            m = _LORA_KEY.match(key)
            if m is None:
                continue
            name, shape = m.group("module"), f.get_slice(key).get_shape()
            modules.add(name)
            if name not in linear:
                problems.append(f"{name} is not a Linear layer of the base")
                continue
            out_f, in_f = linear[name]
            got, want = (shape[1], in_f) if m.group("ab") == "A" else (shape[0], out_f)
            if got != want:
                side = "in" if m.group("ab") == "A" else "out"
                problems.append(f"{name}: the adapter expects {side}_features={got}, the base has {want}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ModelError(f"the adapter in {adapter_dir} does not fit base {base!r}: " + "; ".join(problems[:3]) + more)
    if not modules:
        raise ModelError(f"{adapter_dir}: no LoRA weights in {ADAPTER_FILES[1]}")
    return len(modules)


# --- probes and logits ---------------------------------------------------------------------------------


def probe_images() -> list[Image.Image]:
    """Two deterministic synthetic pictures of different sizes (shapes on a gradient)."""
    images = []
    for w, h, n in ((56, 56, 3), (84, 56, 5)):
        im = Image.new("RGB", (w, h))
        im.putdata([(int(255 * x / w), int(255 * y / h), 128) for y in range(h) for x in range(w)])
        draw = ImageDraw.Draw(im)
        for i in range(n):
            x = 4 + (i * 17) % (w - 14)
            y = 8 + (7 * i) % (h - 20)
            draw.ellipse((x, y, x + 10, y + 10), fill=(240, 30 * i, 20))
        images.append(im)
    return images


def probe_inputs(processor: Any, fmt: ResponseFormat) -> dict[str, torch.Tensor]:
    """Chat-templated prompts plus a structured answer, so prompt and response positions are both checked."""
    questions = ("How many red shapes are in the image?", "Which side of the picture is brighter, left or right?")
    answers = ("3", "right")
    texts = []
    for image, question, answer in zip(probe_images(), questions, answers):
        messages = build_messages(Sample(images=[image], question=question, answer=answer), fmt.template, fmt)
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        texts.append(prompt + _reference_answer(answer, fmt))
    processor.tokenizer.padding_side = "left"
    enc = processor(text=texts, images=[[im] for im in probe_images()], padding=True, return_tensors="pt")
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}


def _reference_answer(answer: str, fmt: ResponseFormat) -> str:
    blocks = "".join(f"<{tag}>I look at the image.</{tag}>" for tag in fmt.blocks())
    return f"{blocks}\\boxed{{{answer}}}"


@torch.no_grad()
def probe_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Full logits [B, L, V] in fp32 on the CPU (probes are a few dozen tokens)."""
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    out = model(**{k: v.to(device) for k, v in inputs.items()}, use_cache=False)
    return out.logits.float().cpu()


def compare_logits(reference: torch.Tensor, exported: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """Max |Δlogit|, the logit scale it is judged against, and top-1 agreement over real tokens."""
    if reference.shape != exported.shape:
        return {"max_abs_diff": float("inf"), "logit_scale": float("nan"), "top1_agreement": 0.0,
                "tokens": 0, "note": f"shape {tuple(exported.shape)} != {tuple(reference.shape)}"}
    mask = attention_mask.bool()  # [B, L]
    ref, exp = reference[mask], exported[mask]  # [tokens, V]
    return {"max_abs_diff": float((ref - exp).abs().max()), "logit_scale": float(ref.abs().max()),
            "top1_agreement": float((ref.argmax(-1) == exp.argmax(-1)).float().mean()), "tokens": int(mask.sum())}


def within_tolerance(cmp: dict, tolerance: float) -> bool:
    """Absolute for small logits, relative to the largest |logit| once that exceeds 1."""
    return cmp["max_abs_diff"] <= tolerance * max(1.0, cmp["logit_scale"])


# --- memory --------------------------------------------------------------------------------------------


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def anon_rss_gib() -> float | None:
    """Anonymous resident memory now (Linux), i.e. RSS without file-backed (memory-mapped) pages."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


class MemoryMonitor:
    """Peak memory of the export, overall and per stage.

    Peak RSS also counts pages of memory-mapped safetensors files, which the kernel can drop under
    pressure; the anonymous part, sampled every `interval` seconds, is what has to fit in RAM.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.anon_peak: float | None = anon_rss_gib()
        self.stages: dict[str, dict[str, float | None]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = anon_rss_gib()
            if now is not None:
                self.anon_peak = max(self.anon_peak or 0.0, now)

    def __enter__(self) -> "MemoryMonitor":
        if self.anon_peak is not None:
            self._thread = threading.Thread(target=self._sample, name="export-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def snapshot(self) -> dict[str, float | None]:
        now = anon_rss_gib()
        if now is not None:
            self.anon_peak = max(self.anon_peak or 0.0, now)
        return {"rss_gib": peak_rss_gib(), "anon_gib": self.anon_peak}

    def mark(self, stage: str) -> None:
        """Record the peaks reached by the end of `stage` (they only grow, so each stage's own peak shows)."""
        self.stages[stage] = self.snapshot()


GC_MIN_BYTES = 256 * 2**20


def _is_large(model: torch.nn.Module) -> bool:
    return sum(p.numel() * p.element_size() for p in model.parameters()) >= GC_MIN_BYTES


def _collect(large: bool) -> None:
    """Break the reference cycles that keep dropped weights and checkpoint mmaps alive.

    A full gc costs ~0.5 s once transformers is imported, so tiny models skip it.
    """
    if large:
        gc.collect()
        _malloc_trim()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so the next stage's RSS is honest."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _release(model: torch.nn.Module) -> Callable[[], None]:
    """Call the returned function after dropping every reference to `model` to give its memory back."""
    large = _is_large(model)
    return lambda: _collect(large)


# --- the export ----------------------------------------------------------------------------------------


@dataclass
class ExportPlan:
    source: CheckpointSource
    out: Path
    mode: str = "adapter"  # "adapter" | "merged"
    base: str = ""
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    tolerance: float = 1e-4
    quantize: str | None = None  # None | "4bit"
    force: bool = False
    max_shard_size: str = "2GB"

    @property
    def model_cfg(self) -> ModelConfig:
        """The training model config with the resolved base and the export dtype; never trainable."""
        name = next(k for k, v in DTYPES.items() if v == self.dtype)
        return dataclasses.replace(self.source.cfg.model, path=self.base, dtype=name, gradient_checkpointing=False)

    @property
    def fmt(self) -> ResponseFormat:
        d = self.source.cfg.data
        return ResponseFormat(perception_tag=d.perception_tag, think_tag=d.think_tag, template=d.template)


def export_dtype(recipe_dtype: str, requested: str = "auto") -> torch.dtype:
    """The training compute dtype; a recipe's `auto` trained in bf16 on a GPU, so bf16."""
    name = requested if requested != "auto" else (recipe_dtype if recipe_dtype != "auto" else "bfloat16")
    return DTYPES[name]


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
    four_bit, dtype = plan.source.cfg.model.load_in_4bit, _dtype_name(plan.dtype)
    log(f"[export] reference: the trained adapter model ({'4-bit NF4' if four_bit else dtype} base, {n_modules} "
        f"LoRA modules, {dtype} compute) on {len(probe_images())} probe prompts")
    reference, mask = _reference_logits(plan)
    memory.mark("reference")
    if plan.mode == "adapter":
        _write_adapter(plan, tmp)
        exported = _adapter_logits(plan, tmp)
    else:
        log(f"[export] merging: {'dequantize NF4 → ' if four_bit else ''}{dtype}, merge LoRA, save safetensors "
            f"(shards ≤ {plan.max_shard_size})")
        _write_merged(plan, tmp)
        memory.mark("merge")
        exported = _merged_logits(tmp, plan)
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
        quantized = _write_quantized(plan, tmp, reference, mask)
        memory.mark("quantize")
        log(f"[export] 4-bit copy: max |Δlogit| = {quantized['max_abs_diff']:.3g} vs the adapter model (reported "
            "only; quantization rounds the merged weights)")
    return check, quantized


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _reference_logits(plan: ExportPlan) -> tuple[torch.Tensor, torch.Tensor]:
    from ..policy import load_policy

    policy = load_policy(plan.model_cfg, plan.source.cfg.lora, adapter_path=str(plan.source.adapter_dir),
                         trainable=False, device=plan.device)
    policy.model.eval()  # dropout off; the CPU 4-bit repack is already disabled by load_policy
    inputs = probe_inputs(policy.processor, plan.fmt)
    logits = probe_logits(policy.model, inputs)
    release = _release(policy.model)
    del policy
    release()
    return logits, inputs["attention_mask"]


def _write_adapter(plan: ExportPlan, tmp: Path) -> None:
    from ..processors import load_processor

    for name in ADAPTER_FILES:
        shutil.copy2(plan.source.adapter_dir / name, tmp / name)
    config_file = tmp / ADAPTER_FILES[0]
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = plan.base
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    load_processor(plan.base, trust_remote_code=plan.source.cfg.model.trust_remote_code).save_pretrained(tmp)


def _adapter_logits(plan: ExportPlan, tmp: Path) -> torch.Tensor:
    """Reload the exported adapter (and the exported processor) onto a fresh base, as a user would."""
    from ..policy import load_policy
    from ..processors import model_family, processor_class

    policy = load_policy(plan.model_cfg, plan.source.cfg.lora, adapter_path=str(tmp), trainable=False,
                         device=plan.device)
    policy.model.eval()
    processor = processor_class(model_family(policy.config)).from_pretrained(str(tmp))
    logits = probe_logits(policy.model, probe_inputs(processor, plan.fmt))
    release = _release(policy.model)
    del policy
    release()
    return logits


def _write_merged(plan: ExportPlan, tmp: Path) -> None:
    """Base as in training → dequantize (module by module) → merge LoRA → save shards + processor."""
    import bitsandbytes as bnb
    from peft import PeftModel

    from ..policy import load_base

    base, processor, _ = load_base(plan.model_cfg, plan.device)
    large = _is_large(base)
    _collect(large)  # unmaps the checkpoint files the loader read
    if plan.model_cfg.load_in_4bit:
        base = base.dequantize(dtype=plan.dtype)
        _collect(large)  # frees the replaced 4-bit modules
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
    release = _release(merged)
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


def _merged_logits(path: Path, plan: ExportPlan) -> torch.Tensor:
    from ..processors import load_processor

    model = _load_exported(path, plan)
    if any("lora_" in n for n, _ in model.named_parameters()):
        raise ExportError(f"{path}: the saved model still has LoRA parameters")
    logits = probe_logits(model, probe_inputs(load_processor(path), plan.fmt))
    release = _release(model)
    del model
    release()
    return logits


def _write_quantized(plan: ExportPlan, tmp: Path, reference: torch.Tensor, mask: torch.Tensor) -> dict:
    """A bitsandbytes NF4 copy in `<out>/4bit`, quantized with the training's 4-bit settings."""
    from ..policy import load_base

    target = tmp / QUANTIZED_SUBDIR
    model, processor, _ = load_base(dataclasses.replace(plan.model_cfg, path=str(tmp), load_in_4bit=True), plan.device)
    model.save_pretrained(str(target), max_shard_size=plan.max_shard_size, safe_serialization=True)
    processor.save_pretrained(str(target))
    release = _release(model)
    del model
    release()
    cmp = _merged_logits(target, plan)
    result = compare_logits(reference, cmp, mask)
    result["path"] = QUANTIZED_SUBDIR
    (target / "README.md").write_text(_quantized_card(plan, result), encoding="utf-8")
    return result


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
        "dtype": _dtype_name(plan.dtype),
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


# --- model cards ---------------------------------------------------------------------------------------


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


def _quantized_card(plan: ExportPlan, cmp: dict) -> str:
    return "\n".join([
        "---", f"base_model: {plan.base}", "library_name: transformers", "pipeline_tag: image-text-to-text",
        "tags:", "- lite-srpo", "- 4-bit", "- bitsandbytes", "- quantized", "---", "",
        f"# {plan.source.cfg.name}: merged model, QUANTIZED to bitsandbytes NF4 (4-bit)", "",
        "This is a 4-bit (NF4, double quantization) copy of the merged model in the parent directory, for users "
        "who want a smaller download or less GPU memory. It is **not bit-exact** with the trained adapter model: "
        f"quantizing the merged weights moves the logits by up to {cmp['max_abs_diff']:.3g} on the export's probes "
        f"(top-1 agreement {100 * cmp['top1_agreement']:.1f}%). Use the parent directory for exact results.", "",
        "Loading needs `bitsandbytes`: `AutoModelForImageTextToText.from_pretrained(\"<this directory>\")`.", ""])


# --- command line --------------------------------------------------------------------------------------


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
    from ..policy import pick_device

    args = build_parser().parse_args(argv)
    if args.quantize and args.mode != "merged":
        raise ExportError("--quantize 4bit needs --mode merged (it quantizes the merged model)")
    if args.tolerance is not None and not args.tolerance >= 0:
        raise ExportError(f"--tolerance {args.tolerance}: needs a number >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda: no CUDA device is available")
    source = resolve_checkpoint(args.source)
    dtype = export_dtype(source.cfg.model.dtype, args.dtype)
    device = pick_device() if args.device == "auto" else torch.device(args.device)
    plan = ExportPlan(source=source, out=Path(args.out).expanduser(), mode=args.mode,
                      base=resolve_base(source.cfg.model.path, source.run_dir, args.base), dtype=dtype, device=device,
                      tolerance=DEFAULT_TOLERANCE[dtype] if args.tolerance is None else args.tolerance,
                      quantize=args.quantize, force=args.force, max_shard_size=args.max_shard_size)
    say(f"[export] {source.checkpoint} (step {source.step}) → {plan.out} "
        f"[{plan.mode}, {_dtype_name(dtype)}, {device}]")
    export(plan)
    return 0
