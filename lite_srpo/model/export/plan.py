"""An export's settings: the checkpoint, where to write, adapter or merged, dtype, device, tolerance."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ...config import ModelConfig
from ...data.prompts import ResponseFormat, response_format
from .source import CheckpointSource, ExportError, resolve_base, resolve_checkpoint

QUANTIZED_SUBDIR = "4bit"
DEFAULT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        return response_format(self.source.cfg.data)


def export_dtype(recipe_dtype: str, requested: str = "auto") -> torch.dtype:
    """The training compute dtype; a recipe's `auto` trained in bf16 on a GPU, so bf16."""
    name = requested if requested != "auto" else (recipe_dtype if recipe_dtype != "auto" else "bfloat16")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def make_plan(source: str | Path, out: str | Path, *, mode: str = "adapter", quantize: str | None = None,
              tolerance: float | None = None, dtype: str = "auto", base: str | None = None, device: str = "auto",
              force: bool = False, max_shard_size: str = "2GB") -> ExportPlan:
    """Check the options of `lite-srpo export` and resolve the checkpoint, its base, dtype and device."""
    from ..policy import pick_device

    if quantize and mode != "merged":
        raise ExportError("--quantize 4bit needs --mode merged (it quantizes the merged model)")
    if tolerance is not None and not tolerance >= 0:
        raise ExportError(f"--tolerance {tolerance}: needs a number >= 0")
    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda: no CUDA device is available")
    src = resolve_checkpoint(source)
    torch_dtype = export_dtype(src.cfg.model.dtype, dtype)
    return ExportPlan(source=src, out=Path(out).expanduser(), mode=mode,
                      base=resolve_base(src.cfg.model.path, src.run_dir, base), dtype=torch_dtype,
                      device=pick_device() if device == "auto" else torch.device(device),
                      tolerance=DEFAULT_TOLERANCE[torch_dtype] if tolerance is None else tolerance,
                      quantize=quantize, force=force, max_shard_size=max_shard_size)
