"""What the memory planner and the `auto` lm_head chunk read from a model: its dimensions.

`ModelDims` comes from a local checkpoint's config.json (and its processor settings), or, for hub ids
not on disk, from transcribed published configs (`KNOWN_MODELS`); `image_tokens` is the processor's
resize rule (Qwen smart_resize, Idefics3 tiling) as a token count.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import ModelError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelDims:
    """What the planner needs to know about a VLM; parameter groups are computed from its config."""

    name: str
    family: str  # qwen2_5_vl | qwen2_vl | qwen3_vl | idefics3
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    llm_linear_params: int  # q, k, v, o, gate, up, down of every decoder layer (the 4-bit part)
    largest_linear_params: int
    embed_params: int
    lm_head_params: int  # 0 when tied to the embeddings
    vision_params: int
    other_params: int  # norms and biases of the language model
    vision_hidden: int
    vision_intermediate: int
    vision_depth: int
    patch: int  # pixels per patch side
    merge: int  # patches merged per side into one LLM token (Qwen spatial merge, Idefics3 scale factor)
    min_pixels: int = 0
    max_pixels: int = 0
    tile: int = 0  # Idefics3: tile side in pixels
    split_images: bool = False  # Idefics3: split large images into tiles (+ one global tile)
    longest_edge: int = 0  # Idefics3: images are first resized to at most this side
    checkpoint_bytes: int = 2  # bytes per parameter in the saved checkpoint (bf16 for published models)

    @property
    def total_params(self) -> int:
        return (self.llm_linear_params + self.embed_params + self.lm_head_params + self.vision_params
                + self.other_params)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim


# Published config.json values (transcribed) for hub ids that may not be on disk. Only the fields the
# planner reads are kept; a local directory's own config.json always wins.
_QWEN25_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
                  "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}
_QWEN2_VISION = {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "patch_size": 14,
                 "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}
_QWEN3_VISION_SMALL = {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "patch_size": 16,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
                       "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17]}
_QWEN3_VISION_8B = {**_QWEN3_VISION_SMALL, "depth": 27, "hidden_size": 1152, "intermediate_size": 4304,
                    "deepstack_visual_indexes": [8, 16, 24]}
_QWEN_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384}
_QWEN3_PIXELS = {"min_pixels": 65536, "max_pixels": 16777216}
_SIGLIP_B16_512 = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "patch_size": 16, "image_size": 512}


def _text(h, i, n_layers, heads, kv, vocab, tied, head_dim=None, **extra) -> dict:
    out = {"hidden_size": h, "intermediate_size": i, "num_hidden_layers": n_layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "vocab_size": vocab, **extra}
    if head_dim:
        out["head_dim"] = head_dim
    return {"text_config": out, "tie_word_embeddings": tied}


KNOWN_MODELS: dict[str, dict] = {
    "Qwen/Qwen2.5-VL-3B-Instruct": {"model_type": "qwen2_5_vl", **_text(2048, 11008, 36, 16, 2, 151936, True),
                                    "vision_config": {**_QWEN25_VISION, "out_hidden_size": 2048}, **_QWEN_PIXELS},
    "Qwen/Qwen2.5-VL-7B-Instruct": {"model_type": "qwen2_5_vl", **_text(3584, 18944, 28, 28, 4, 152064, False),
                                    "vision_config": {**_QWEN25_VISION, "out_hidden_size": 3584}, **_QWEN_PIXELS},
    "Qwen/Qwen2-VL-2B-Instruct": {"model_type": "qwen2_vl", **_text(1536, 8960, 28, 12, 2, 151936, True),
                                  "vision_config": {**_QWEN2_VISION, "hidden_size": 1536}, **_QWEN_PIXELS},
    "Qwen/Qwen2-VL-7B-Instruct": {"model_type": "qwen2_vl", **_text(3584, 18944, 28, 28, 4, 152064, False),
                                  "vision_config": {**_QWEN2_VISION, "hidden_size": 3584}, **_QWEN_PIXELS},
    "Qwen/Qwen3-VL-2B-Instruct": {"model_type": "qwen3_vl", **_text(2048, 6144, 28, 16, 8, 151936, True, 128),
                                  "vision_config": {**_QWEN3_VISION_SMALL, "out_hidden_size": 2048}, **_QWEN3_PIXELS},
    "Qwen/Qwen3-VL-4B-Instruct": {"model_type": "qwen3_vl", **_text(2560, 9728, 36, 32, 8, 151936, True, 128),
                                  "vision_config": {**_QWEN3_VISION_SMALL, "out_hidden_size": 2560}, **_QWEN3_PIXELS},
    "Qwen/Qwen3-VL-8B-Instruct": {"model_type": "qwen3_vl", **_text(4096, 12288, 36, 32, 8, 151936, False, 128),
                                  "vision_config": {**_QWEN3_VISION_8B, "out_hidden_size": 4096}, **_QWEN3_PIXELS},
    "HuggingFaceTB/SmolVLM-256M-Instruct": {"model_type": "idefics3", **_text(576, 1536, 30, 9, 3, 49280, False),
                                            "vision_config": _SIGLIP_B16_512, "scale_factor": 4,
                                            "tile": 512, "longest_edge": 2048, "split_images": True},
    "HuggingFaceTB/SmolVLM-500M-Instruct": {"model_type": "idefics3", **_text(960, 2560, 32, 15, 5, 49280, False),
                                            "vision_config": _SIGLIP_B16_512, "scale_factor": 4,
                                            "tile": 512, "longest_edge": 2048, "split_images": True},
    "HuggingFaceTB/SmolVLM-Instruct": {"model_type": "idefics3", **_text(2048, 8192, 24, 32, 32, 49155, False),
                                       "vision_config": {"hidden_size": 1152, "intermediate_size": 4304,
                                                         "num_hidden_layers": 27, "num_attention_heads": 16,
                                                         "patch_size": 14, "image_size": 384},
                                       "scale_factor": 3, "tile": 384, "longest_edge": 1536, "split_images": True},
}


def _known_key(model_id: str) -> str | None:
    """Match a hub id to KNOWN_MODELS, ignoring case and the -Instruct / -Thinking suffix (same shapes)."""
    def norm(s: str) -> str:
        return re.sub(r"-(instruct|thinking)$", "", s.lower().rstrip("/"))
    want = norm(model_id)
    for key in KNOWN_MODELS:
        if norm(key) == want or norm(key).split("/")[-1] == want:
            return key
    return None


def _family(model_type: str) -> str:
    families = {"qwen2_5_vl": "qwen2_5_vl", "qwen2_vl": "qwen2_vl", "qwen3_vl": "qwen3_vl",
                "idefics3": "idefics3", "smolvlm": "idefics3"}
    if model_type not in families:
        raise ModelError(f"model_type {model_type!r}: the planner knows {sorted(families)}")
    return families[model_type]


def _vision_params(family: str, v: dict, text_hidden: int) -> tuple[int, int, int, int]:
    """(params, hidden, intermediate, depth) of the vision tower + projector, from its config."""
    tp, ch = v.get("temporal_patch_size", 2), v.get("in_channels", 3)
    if family == "idefics3":
        d, iv, depth, p = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"], v["patch_size"]
        side = v["image_size"] // p
        embed = ch * p * p * d + d + side * side * d
        block = 4 * (d * d + d) + (d * iv + iv) + (iv * d + d) + 4 * d
        return embed + depth * block + 2 * d, d, iv, depth  # + connector, added by the caller (needs scale)
    p, m = v["patch_size"], v.get("spatial_merge_size", 2)
    if family == "qwen2_vl":
        d = v["embed_dim"]
        iv = int(v.get("mlp_ratio", 4) * d)
        out = v.get("hidden_size", text_hidden)
        block = (d * 3 * d + 3 * d) + (d * d + d) + (d * iv + iv) + (iv * d + d) + 4 * d
        merger = 2 * d + (d * m * m) ** 2 + d * m * m + d * m * m * out + out
        return ch * tp * p * p * d + v["depth"] * block + merger, d, iv, v["depth"]
    d, iv = v["hidden_size"], v["intermediate_size"]
    out = v.get("out_hidden_size", text_hidden)
    wide = d * m * m
    if family == "qwen2_5_vl":  # gated MLP, RMSNorm, no patch bias
        block = (d * 3 * d + 3 * d) + (d * d + d) + 2 * (d * iv + iv) + (iv * d + d) + 2 * d
        merger = d + wide * wide + wide + wide * out + out
        return ch * tp * p * p * d + v["depth"] * block + merger, d, iv, v["depth"]
    # qwen3_vl: plain MLP, LayerNorm, learned position grid, deepstack mergers
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * iv + iv) + (iv * d + d) + 4 * d
    merger = 2 * d + wide * wide + wide + wide * out + out
    deep = len(v.get("deepstack_visual_indexes", [])) * (2 * wide + wide * wide + wide + wide * out + out)
    embed = ch * tp * p * p * d + d + v.get("num_position_embeddings", 0) * d
    return embed + v["depth"] * block + merger + deep, d, iv, v["depth"]


def dims_from_config(config: dict, name: str = "model", processor: dict | None = None) -> ModelDims:
    """ModelDims from an HF config.json dict (nested text_config/vision_config, or flat for the text)."""
    family = _family(config.get("model_type", ""))
    t = dict(config.get("text_config") or config)
    h, i, n_layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    heads = t["num_attention_heads"]
    kv = t.get("num_key_value_heads") or heads
    hd = t.get("head_dim") or h // heads
    vocab = t["vocab_size"]
    tied = bool(config.get("tie_word_embeddings", t.get("tie_word_embeddings", False)))
    q, kvd = heads * hd, kv * hd
    linears = {"q": h * q, "k": h * kvd, "v": h * kvd, "o": q * h, "gate": h * i, "up": h * i, "down": i * h}
    biases = q + 2 * kvd if family in ("qwen2_5_vl", "qwen2_vl") else 0
    qk_norm = 2 * hd if family == "qwen3_vl" else 0
    other = n_layers * (2 * h + biases + qk_norm) + h
    vision = config.get("vision_config") or {}
    v_params, vd, vi, vdepth = _vision_params(family, vision, h)
    proc = {**config, **(processor or {})}
    ckpt_dtype = str(config.get("dtype") or config.get("torch_dtype") or t.get("dtype") or "bfloat16")
    if family == "idefics3":
        scale = config.get("scale_factor", 2)
        v_params += vd * scale * scale * h  # connector: pixel shuffle then one bias-free linear
        patch, merge = vision["patch_size"], scale
        tile = proc.get("tile") or vision["image_size"]
        extra = {"tile": tile, "split_images": bool(proc.get("split_images", False)),
                 "longest_edge": proc.get("longest_edge") or tile}
    else:
        patch, merge = vision["patch_size"], vision.get("spatial_merge_size", 2)
        extra = {"min_pixels": proc.get("min_pixels") or _QWEN_PIXELS["min_pixels"],
                 "max_pixels": proc.get("max_pixels") or _QWEN_PIXELS["max_pixels"]}
    return ModelDims(
        name=name, family=family, vocab=vocab, hidden=h, intermediate=i, layers=n_layers, heads=heads, kv_heads=kv,
        head_dim=hd, tied=tied, llm_linear_params=n_layers * sum(linears.values()),
        largest_linear_params=max(linears.values()), embed_params=vocab * h, lm_head_params=0 if tied else vocab * h,
        vision_params=v_params, other_params=other, vision_hidden=vd, vision_intermediate=vi, vision_depth=vdepth,
        patch=patch, merge=merge, checkpoint_bytes=DTYPE_BYTES.get(ckpt_dtype.replace("torch.", ""), 2), **extra)


def _processor_settings(model_dir: Path) -> dict:
    """min/max pixels (Qwen) or tiling (Idefics3) from a saved processor config, if present."""
    out: dict[str, Any] = {}
    for fname in ("preprocessor_config.json", "processor_config.json"):
        path = model_dir / fname
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        node = data.get("image_processor", data)
        size = node.get("size") or {}
        if node.get("min_pixels") or size.get("shortest_edge"):
            out["min_pixels"] = node.get("min_pixels") or size.get("shortest_edge")
        if node.get("max_pixels") or (size.get("longest_edge") and "max_image_size" not in node):
            out["max_pixels"] = node.get("max_pixels") or size.get("longest_edge")
        if "do_image_splitting" in node:
            out["split_images"] = bool(node["do_image_splitting"])
            out["tile"] = (node.get("max_image_size") or {}).get("longest_edge")
            out["longest_edge"] = size.get("longest_edge")
    return out


def load_model_dims(model_path: str) -> ModelDims:
    """Dims from a local checkpoint's config.json, else from the known hub ids; otherwise a clear error."""
    local = Path(model_path).expanduser()
    if (local / "config.json").is_file():
        config = json.loads((local / "config.json").read_text(encoding="utf-8"))
        return dims_from_config(config, name=str(model_path), processor=_processor_settings(local))
    key = _known_key(model_path)
    if key is None:
        raise ModelError(
            f"model.path {model_path!r}: no config.json there and not a model the planner knows. Known hub ids: "
            f"{', '.join(KNOWN_MODELS)}. Download the model (or just its config.json) to a local directory and "
            f"point model.path at it.")
    return dims_from_config(KNOWN_MODELS[key], name=key)


def as_dims(model_dims: dict | ModelDims, name: str) -> ModelDims:
    if isinstance(model_dims, ModelDims):
        return model_dims
    if "model_type" in model_dims:
        return dims_from_config(model_dims, name=name)
    names = {f.name for f in fields(ModelDims)}
    return ModelDims(**{k: v for k, v in model_dims.items() if k in names})


def image_tokens(dims: ModelDims, height: int, width: int) -> int:
    """LLM tokens of one image after the processor's resize (Qwen smart_resize; Idefics3 tiling)."""
    if dims.family == "idefics3":
        per_tile = (dims.tile // dims.patch) ** 2 // (dims.merge ** 2)
        if not dims.split_images:
            return per_tile
        scale = min(1.0, dims.longest_edge / max(height, width))
        h, w = height * scale, width * scale
        tiles = math.ceil(h / dims.tile) * math.ceil(w / dims.tile)
        return per_tile * (tiles + 1 if tiles > 1 else 1)
    factor = dims.patch * dims.merge
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > dims.max_pixels:
        beta = math.sqrt(height * width / dims.max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < dims.min_pixels:
        beta = math.sqrt(dims.min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return (h // factor) * (w // factor)
