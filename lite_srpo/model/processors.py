"""Load VLM processors on a CPU machine without torchvision, and name the tokens that matter.

The stock Qwen processors need a video processor, and without torchvision there is none
(research/platform.md §4). Each Qwen family therefore gets an image-only subclass here that drops
the video slot; on disk it still writes the stock class name, so the directory stays a normal HF
checkpoint that `AutoProcessor` can read wherever torchvision is installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import transformers
from transformers import AutoConfig, Idefics3Processor, ProcessorMixin

from ..errors import ModelError

FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "idefics3")

# model_type in config.json -> family. SmolVLM is the Idefics3 architecture under another name.
_FAMILY_OF_MODEL_TYPE = {
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen2_vl": "qwen2_vl",
    "qwen3_vl": "qwen3_vl",
    "idefics3": "idefics3",
    "smolvlm": "idefics3",
}

_IDEFICS3_IMAGE_TOKENS = ("<image>", "<fake_token_around_image>", "<global-img>")
_IDEFICS3_GRID = 6  # row/col tags go up to <row_6_col_6>


def _config_field(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def model_family(config: Any) -> str:
    """The family name ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "idefics3") for a config or config dict."""
    model_type = _config_field(config, "model_type")
    family = _FAMILY_OF_MODEL_TYPE.get(model_type)
    if family is None:
        raise ModelError(
            f"model_type {model_type!r} is not supported; supported: {sorted(_FAMILY_OF_MODEL_TYPE)}"
        )
    return family


def _image_only(base: type) -> type:
    """A subclass of a Qwen processor whose only sub-processors are the image processor and tokenizer."""

    class ImageOnly(base):
        # ProcessorMixin reads the sub-processor slots from this signature, so `video_processor`
        # must not appear in it.
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        def to_dict(self) -> dict[str, Any]:
            out = super().to_dict()
            out["processor_class"] = base.__name__
            return out

        def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
            saved = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
            _rename_processor_class(Path(save_directory), type(self).__name__, base.__name__)
            return saved

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"ImageOnly{base.__name__}"
    return ImageOnly


def _rename_processor_class(directory: Path, ours: str, stock: str) -> None:
    """The tokenizer records the class that saved it; write the stock name so other tools can load the dir."""
    for name in ("tokenizer_config.json", "processor_config.json", "preprocessor_config.json"):
        path = directory / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("processor_class") == ours:
            data["processor_class"] = stock
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _qwen_processor_classes() -> dict[str, type]:
    classes = {
        "qwen2_5_vl": _image_only(transformers.Qwen2_5_VLProcessor),
        "qwen2_vl": _image_only(transformers.Qwen2VLProcessor),
    }
    qwen3 = getattr(transformers, "Qwen3VLProcessor", None)
    if qwen3 is not None:
        classes["qwen3_vl"] = _image_only(qwen3)
    return classes


IMAGE_ONLY_PROCESSORS: dict[str, type] = _qwen_processor_classes()


def processor_class(family: str) -> type:
    """The processor class to build or load a processor of this family with."""
    if family == "idefics3":
        return Idefics3Processor
    cls = IMAGE_ONLY_PROCESSORS.get(family)
    if cls is None:
        available = sorted([*IMAGE_ONLY_PROCESSORS, "idefics3"])
        raise ModelError(
            f"no processor for family {family!r} in transformers {transformers.__version__}; available: {available}"
        )
    return cls


def _load_config(path_or_id: str, trust_remote_code: bool) -> Any:
    config_file = Path(path_or_id) / "config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text(encoding="utf-8"))
    try:
        return AutoConfig.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the model config of {path_or_id!r}: {exc}") from exc


def load_processor(path_or_id: str | os.PathLike, trust_remote_code: bool = False) -> ProcessorMixin:
    """Load the processor of a saved VLM (tiny or real checkpoint), left-padding its tokenizer."""
    path_or_id = str(path_or_id)
    family = model_family(_load_config(path_or_id, trust_remote_code))
    cls = processor_class(family)
    try:
        processor = cls.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ModelError(f"cannot load the {family} processor from {path_or_id!r}: {exc}") from exc
    # The attribute is not saved with the tokenizer, so set it on every load (platform.md §4).
    processor.tokenizer.padding_side = "left"
    return processor


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of a token the tokenizer knows as a whole token, else None."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id):
        return None
    return int(tid)


def vision_token_ids(processor: Any, config: Any) -> list[int]:
    """Ids that must never be sampled: an emitted image placeholder breaks the next forward pass."""
    family = model_family(config)
    if family == "idefics3":
        tok = processor.tokenizer
        names = list(_IDEFICS3_IMAGE_TOKENS) + [
            f"<row_{i}_col_{j}>" for i in range(1, _IDEFICS3_GRID + 1) for j in range(1, _IDEFICS3_GRID + 1)
        ]
        ids = [_token_id(tok, name) for name in names]
        return sorted({i for i in ids if i is not None})
    keys = ("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id")
    ids = [_config_field(config, k) for k in keys]
    return sorted({int(i) for i in ids if i is not None})


def image_token_id(config_or_processor: Any) -> int:
    """The id of the per-patch image placeholder (`<|image_pad|>`, `<image>`)."""
    if isinstance(config_or_processor, ProcessorMixin):
        tid = getattr(config_or_processor, "image_token_id", None)
    else:
        tid = _config_field(config_or_processor, "image_token_id")
    if tid is None:
        raise ModelError(f"{type(config_or_processor).__name__} names no image_token_id")
    return int(tid)
