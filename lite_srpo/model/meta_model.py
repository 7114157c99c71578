"""A real-architecture VLM on the `meta` device, quantized as `load_base` would quantize it, from its
`config.json` alone: the model lite-srpo would train, with shapes and no data.

Used by the step trace (`rl/trace_step.py`, `lite-srpo plan --trace`) to count what one training step
allocates at the real shapes of a 7B checkpoint, before its 15 GB of weights are downloaded.

- The transformers model class is built from the config on `meta` (no weights are read).
- Every `nn.Linear` that bitsandbytes would quantize (everything but the vision tower and the
  lm_head: `policy.VISION_PREFIXES`, `llm_int8_skip_modules`) becomes a real `bnb.nn.Linear4bit`
  whose `Params4bit` is built by hand: packed NF4 data `[n/2, 1]` uint8, and a double-quantized
  `QuantState` (uint8 absmax per 64 values, fp32 absmax per 256 of those, the code tables), i.e. the
  bytes `load_in_4bit` with `bnb_4bit_use_double_quant` keeps (research/platform.md §7).
- Without `load_in_4bit` the linears stay in the compute dtype.
Forward and backward through these layers run bitsandbytes' own meta kernels.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .policy import VISION_PREFIXES
from .processors import model_family

NF4_BLOCK = 64
NESTED_BLOCK = 256


def read_config(path: str | Path) -> dict[str, Any]:
    """A checkpoint's config.json (a file, or a directory holding one)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    return json.loads(path.read_text(encoding="utf-8"))


def hf_config(config: dict[str, Any], attn_implementation: str = "sdpa"):
    """The transformers config object for a config.json dict."""
    from transformers import AutoConfig

    fields = dict(config)
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    cfg._attn_implementation = attn_implementation
    for sub in ("text_config", "vision_config"):
        inner = getattr(cfg, sub, None)
        if inner is not None:
            inner._attn_implementation = attn_implementation
    return cfg


def nf4_params(out_features: int, in_features: int, dtype: torch.dtype, module: torch.nn.Module):
    """A `Params4bit` on meta with the storage of a double-quantized NF4 weight `[out, in]`."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    n = out_features * in_features
    blocks = -(-n // NF4_BLOCK)
    nested = QuantState(absmax=torch.empty(-(-blocks // NESTED_BLOCK), dtype=torch.float32, device="meta"),
                        code=torch.empty(256, dtype=torch.float32, device="meta"), blocksize=NESTED_BLOCK,
                        dtype=torch.float32)
    state = QuantState(absmax=torch.empty(blocks, dtype=torch.uint8, device="meta"),
                       shape=torch.Size([out_features, in_features]),
                       code=torch.empty(16, dtype=torch.float32, device="meta"), blocksize=NF4_BLOCK,
                       quant_type="nf4", dtype=dtype, offset=torch.empty((), dtype=torch.float32, device="meta"),
                       state2=nested)
    return bnb.nn.Params4bit(data=torch.empty(-(-n // 2), 1, dtype=torch.uint8, device="meta"), requires_grad=False,
                             quant_state=state, blocksize=NF4_BLOCK, compress_statistics=True, quant_type="nf4",
                             quant_storage=torch.uint8, bnb_quantized=True, module=module)


def _to_linear4bit(linear: torch.nn.Linear, dtype: torch.dtype) -> torch.nn.Module:
    import bitsandbytes as bnb

    out_f, in_f = linear.weight.shape
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=linear.bias is not None, compute_dtype=dtype, quant_type="nf4",
                              device="meta")
    layer.weight = nf4_params(out_f, in_f, dtype, layer)
    layer.quant_state = layer.weight.quant_state
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
    return layer


def quantize_on_meta(model: torch.nn.Module, skip_prefixes: list[str], dtype: torch.dtype) -> int:
    """Replace every quantizable `nn.Linear` by a meta `Linear4bit`; returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, torch.nn.Linear) or full == "lm_head" or full.endswith(".lm_head"):
                continue
            if any(full == p or full.startswith(p + ".") for p in skip_prefixes):
                continue
            setattr(module, child_name, _to_linear4bit(child, dtype))
            count += 1
    return count


def meta_base(config: dict[str, Any], dtype: torch.dtype, load_in_4bit: bool,
              attn_implementation: str = "sdpa") -> tuple[torch.nn.Module, str]:
    """The frozen base on meta, and its family; quantized as `policy.load_base` quantizes it."""
    from transformers import AutoModelForImageTextToText

    cfg = hf_config(config, attn_implementation)
    family = model_family(cfg)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype)
    if load_in_4bit:
        quantize_on_meta(model, VISION_PREFIXES[family], dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, family
