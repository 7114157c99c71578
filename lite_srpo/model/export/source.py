"""What to export: a run's checkpoint and the recipe it was trained with, its base model, and a check
that the adapter fits that base before anything heavy loads."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ...config import RunConfig, config_from_dict, load_recipe_dict
from ...errors import LiteSrpoError, ModelError
from ...run.checkpoint import ADAPTER_DIR, METRICS_FILE, RECIPE_FILE, STATE_FILE, WARMUP_DIR, latest_checkpoint

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
EXPORT_INFO = "export.json"
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
