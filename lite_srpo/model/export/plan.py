"""An export's settings: the checkpoint, where to write, adapter or merged, dtype, device, tolerance."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ...config import ModelConfig
from ...data.prompts import ResponseFormat, response_format
from .source import CheckpointSource

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
