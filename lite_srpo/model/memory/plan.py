"""Memory planner: the predicted peak memory of one training step of a recipe, before anything loads.

The peak is the fixed memory (weights by dtype, the LoRA adapter with its gradient and optimizer
state, and on CPU the process itself) plus the largest of three phases of a step: generation (KV
cache, per-step logits), the no-grad scoring passes, and the policy update (checkpointed activations,
one recomputed layer, the streamed lm_head chunk). Starting model: research/anchors.md §5; the
constants marked "measured" come from bench/planner_accuracy.py on CPU.

Two devices are modelled: `cuda` predicts `torch.cuda.max_memory_allocated` (bf16 compute) and adds
the CUDA context and allocator slack to decide whether it fits; `cpu` predicts the process's peak
resident set (fp32 compute, the Python/torch/transformers baseline included).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ...config import RunConfig, check_divisible
from ...errors import ConfigError, LiteSrpoError, ModelError
from ..chunking import LOGITS_COPIES_GRAD, NF4_DQ_BYTES_PER_PARAM, resolved_logprob_chunk

GIB = 2**30
NF4_BYTES_PER_PARAM = 0.5 + 4 / 64  # without double quant: fp32 absmax per 64-value block
CPU_BASELINE_GIB = 0.40  # measured: python + torch + transformers + peft + bitsandbytes + lite_srpo, processor, data
CUDA_CONTEXT_GIB = 0.50  # CUDA context + cuBLAS/cuDNN handles: outside max_memory_allocated, inside the card
CUDA_ALLOCATOR_SLACK = 1.07  # reserved / allocated (fragmentation of the caching allocator)
CPU_HEAP_RETAINED_LAYERS = 1.0  # fitted on 24 CPU runs (bench/results): freed heap glibc keeps, in layer sets
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # larger blocks are mmapped and given back to the OS when freed
LOGITS_COPIES_NOGRAD = 2.0  # measured: fp32 [chunk, V] logits + the logsumexp temporary
GEN_LOGITS_COPIES = 5  # generate: fp32 last-token logits, processors, softmax, sampling buffers
TEXT_PROMPT_TOKENS = 150  # chat template + question + format instructions of the procedural tasks (tiny tokenizer)
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ---------------------------------------------------------------------------------------------------
# model dimensions


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
        patch=patch, merge=merge, checkpoint_bytes=_DTYPE_BYTES.get(ckpt_dtype.replace("torch.", ""), 2), **extra)


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


def _as_dims(model_dims: dict | ModelDims, name: str) -> ModelDims:
    if isinstance(model_dims, ModelDims):
        return model_dims
    if "model_type" in model_dims:
        return dims_from_config(model_dims, name=name)
    names = {f.name for f in fields(ModelDims)}
    return ModelDims(**{k: v for k, v in model_dims.items() if k in names})


# ---------------------------------------------------------------------------------------------------
# image tokens


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


# ---------------------------------------------------------------------------------------------------
# the plan


@dataclass
class Term:
    name: str
    phase: str  # fixed | generation | passes | update
    gib: float
    how: str


def _compute_bytes(cfg: RunConfig, device: str) -> int:
    if cfg.model.dtype == "auto":
        return 2 if device == "cuda" else 4
    return _DTYPE_BYTES[cfg.model.dtype]


def _logprob_chunk(cfg: RunConfig, dims: ModelDims, device: str) -> int:
    """train.logprob_chunk as the trainer resolves it (`auto`: chunking.py's rule from the same dims)."""
    return resolved_logprob_chunk(cfg.train.logprob_chunk, dims, cfg.model.load_in_4bit, _compute_bytes(cfg, device))


def _lora_params(dims: ModelDims, cfg: RunConfig) -> int:
    r, h, i = cfg.lora.r, dims.hidden, dims.intermediate
    per = {"q_proj": h + dims.q_dim, "k_proj": h + dims.kv_dim, "v_proj": h + dims.kv_dim, "o_proj": dims.q_dim + h,
           "gate_proj": h + i, "up_proj": h + i, "down_proj": i + h}
    n = dims.layers * r * sum(per.get(m, 0) for m in cfg.lora.target_modules)
    if cfg.lora.vision:
        d, iv = dims.vision_hidden, dims.vision_intermediate
        n += dims.vision_depth * r * (4 * d + 2 * d + 3 * (d + iv))
    return n


def _optimizer_bytes(cfg: RunConfig, device: str) -> tuple[float, str]:
    name = cfg.optim.optimizer
    if name == "auto":
        name = "paged_adamw8bit" if device == "cuda" else "adamw"
    return (8.0, name) if name == "adamw" else (2.0, name)


def _prompt(cfg: RunConfig, dims: ModelDims, prompt_tokens: int | None) -> tuple[int, int | None, str]:
    """(prompt tokens, image tokens or None, how the prompt length was chosen)."""
    if prompt_tokens is not None:
        return prompt_tokens, None, "given"
    if cfg.data.task:
        img = image_tokens(dims, cfg.data.image_size, cfg.data.image_size)
        p = min(cfg.data.max_prompt_length, img + TEXT_PROMPT_TOKENS)
        return p, img, (f"{img} image tokens ({cfg.data.image_size}x{cfg.data.image_size} px) + ~{TEXT_PROMPT_TOKENS} "
                        "text tokens")
    return cfg.data.max_prompt_length, None, "data.max_prompt_length (image tokens included; the longest prompt kept)"


def _phase_terms(cfg: RunConfig, dims: ModelDims, device: str, prompt: int, group_size: int,
                 response: int, ranks: int = 1) -> list[Term]:
    """Every term of the plan for a given G and response length (all in GiB), on one rank of `ranks`:
    a rank holds the whole model and adapter but samples and scores only prompts_per_step / ranks prompts."""
    cfg = per_rank_config(cfg, ranks)
    b = _compute_bytes(cfg, device)
    v, h, i, n_layers, kvd = dims.vocab, dims.hidden, dims.intermediate, dims.layers, dims.kv_dim
    n_rows = group_size * cfg.rollout.prompts_per_step
    gen_prompts = cfg.rollout.generation_batch_size or cfg.rollout.prompts_per_step
    gen_rows = group_size * min(gen_prompts, cfg.rollout.prompts_per_step)
    m = min(cfg.train.micro_batch_size, n_rows)
    s = prompt + response
    chunk = min(_logprob_chunk(cfg, dims, device), m * response)
    quant = cfg.model.load_in_4bit
    terms: list[Term] = []

    def add(name: str, phase: str, nbytes: float, how: str) -> None:
        terms.append(Term(name, phase, nbytes / GIB, how))

    # fixed: weights, adapter, process
    if device == "cpu":
        add("process baseline", "fixed", CPU_BASELINE_GIB * GIB, "python + torch + transformers + peft (measured)")
    if quant:
        add("weights: LLM linears (NF4 + double quant)", "fixed", dims.llm_linear_params * NF4_DQ_BYTES_PER_PARAM,
            f"{dims.llm_linear_params / 1e9:.3f}B x 4.127 bit")
        if device == "cpu":
            # the checkpoint stays memory-mapped (the unquantized tensors point into it), so the file pages
            # read while quantizing stay resident (measured)
            add("checkpoint pages read while quantizing", "fixed", dims.llm_linear_params * dims.checkpoint_bytes,
                f"{dims.llm_linear_params / 1e9:.3f}B x {dims.checkpoint_bytes} B (memory-mapped file)")
    else:
        add("weights: LLM linears", "fixed", dims.llm_linear_params * b, f"{dims.llm_linear_params / 1e9:.3f}B x {b} B")
    # On CPU an unconverted table stays memory-mapped, but page-fault read-around pulls in ~128 KiB per
    # looked-up row, so sampled tokens soon make all of it resident (measured): count it in full.
    add("weights: embeddings", "fixed", dims.embed_params * b, f"{dims.embed_params / 1e6:.0f}M x {b} B")
    add("weights: lm_head", "fixed", dims.lm_head_params * b,
        "tied to the embeddings" if dims.tied else f"{dims.lm_head_params / 1e6:.0f}M x {b} B")
    add("weights: vision tower + projector", "fixed", dims.vision_params * b,
        f"{dims.vision_params / 1e6:.0f}M x {b} B")
    add("weights: norms, biases", "fixed", dims.other_params * b, f"{dims.other_params / 1e6:.1f}M x {b} B")
    lora = _lora_params(dims, cfg)
    opt_b, opt_name = _optimizer_bytes(cfg, device)
    add("LoRA: fp32 weights + grads + optimizer", "fixed", lora * (8 + opt_b),
        f"{lora / 1e6:.1f}M params x (4 + 4 + {opt_b:g} {opt_name}) B")
    add("rollout batch, per-token vectors", "fixed", n_rows * response * 4 * 8 + n_rows * s * 8 * 3,
        f"{n_rows} x {response} tokens x a few [N, R] tensors")
    if ranks > 1:
        add("the whole step's [N, R] vectors (all ranks, exchanged)", "fixed", n_rows * ranks * response * 4 * 6,
            f"{n_rows * ranks} rows x {response} tokens x 6 fp32 vectors (CPU)")
        add("gradient all-reduce buffer", "update", lora * 4, f"{lora / 1e6:.1f}M LoRA grads x fp32, one flat copy")

    # generation: all rows of one generate call decode together
    add("KV cache", "generation", gen_rows * s * n_layers * 2 * kvd * b * (1 + 1 / n_layers),
        f"{gen_rows} rows x {s} tokens x {n_layers} layers x 2 x {kvd} x {b} B (+1 layer while it grows)")
    add("prefill activations (one layer, no grad)", "generation",
        gen_rows * prompt * ((4 * h + 2 * kvd + 3 * i) * b + prompt * (1 + b)),
        f"{gen_rows} rows x {prompt} prompt tokens, incl. the [P, P] attention mask")
    add("per-step logits", "generation", gen_rows * v * 4 * GEN_LOGITS_COPIES,
        f"{gen_rows} rows x V={v} x fp32 x {GEN_LOGITS_COPIES} copies")

    # scoring passes (no grad), one micro-batch at a time
    add("one layer's activations (no grad)", "passes", m * s * ((4 * h + 2 * kvd + 3 * i) * b + 3 * h * b),
        f"micro-batch {m} x {s} tokens")
    add("attention mask", "passes", m * s * s * (1 + b), f"{m} x {s}^2 x (bool + {b} B)")
    add("streamed lm_head chunk", "passes", chunk * v * 4 * LOGITS_COPIES_NOGRAD,
        f"chunk {chunk} x V={v} x fp32 x {LOGITS_COPIES_NOGRAD:g} (independent of G and length)")
    if cfg.algorithm.name == "vgpo" and device == "cpu":
        add("VGPO response hidden states", "passes", m * response * h * 4, f"micro-batch {m} x {response} x H fp32")

    # policy update (grad), one micro-batch at a time
    per_layer = (7 * h + 2 * kvd + 4 * i) * b + 8 * h  # anchors.md §5, plus the fp32 RMSNorm copies
    if cfg.model.gradient_checkpointing:
        add("checkpointed layer inputs", "update", m * s * n_layers * h * b,
            f"{m} x {s} tokens x {n_layers} layers x H={h} x {b} B")
        add("one layer recomputed for backward", "update", m * s * per_layer,
            f"{m} x {s} x (7H + 2kv + 4I) x {b} B")
    else:
        add("activations of every layer", "update", m * s * n_layers * per_layer,
            f"{m} x {s} x {n_layers} layers x (7H + 2kv + 4I) x {b} B (no gradient checkpointing)")
    add("attention mask", "update", m * s * s * (1 + b), f"{m} x {s}^2 x (bool + {b} B)")
    add("final hidden states + their grads", "update", m * s * h * (2 * b + 8), f"{m} x {s} x H")
    grad_copies = LOGITS_COPIES_GRAD[4 if b == 4 else 2]
    add("streamed lm_head chunk (with backward)", "update", chunk * v * 4 * grad_copies,
        f"chunk {chunk} x V={v} x fp32 x {grad_copies:g} (independent of G and length)")
    if quant:
        add("dequantized 4-bit weight", "update", dims.largest_linear_params * b,
            f"largest linear {dims.largest_linear_params / 1e6:.0f}M x {b} B")
    if device == "cpu":
        add("freed heap kept by the C allocator", "update", _cpu_heap_retained(m * s, h, kvd, i, b),
            f"~{CPU_HEAP_RETAINED_LAYERS:g} layer-activation set(s) of blocks under 32 MiB (glibc, fitted)")
    return terms


def _cpu_heap_retained(tokens: int, h: int, kvd: int, i: int, b: int) -> float:
    """Bytes of freed activations glibc keeps in its heap during backward (CPU RSS only).

    glibc serves blocks under its mmap threshold (which grows up to 32 MiB) from the heap and does not
    give fragmented heap back, so recomputed layers leave freed activations resident; blocks above
    32 MiB are mmapped and returned. Measured retention varies from run to run (0.3-1 GiB on the
    6-layer H=1024 bench model); one layer set is the fit over bench/memory_scaling and the first
    bench/planner_accuracy run.
    """
    blocks = [(7 * h + 2 * kvd) * b + 8 * h, 4 * i * b]  # per-token bytes of the H-wide and I-wide tensors
    widths = [h * max(b, 4), i * b]  # bytes per token of one tensor of each kind
    kept = sum(per_tok for per_tok, width in zip(blocks, widths) if tokens * width < GLIBC_MMAP_THRESHOLD_MAX)
    return CPU_HEAP_RETAINED_LAYERS * tokens * kept


def _sum_phases(terms: list[Term], device: str) -> tuple[float, dict[str, float], str]:
    """Peak = fixed + the largest phase."""
    fixed = sum(t.gib for t in terms if t.phase == "fixed")
    phases = {p: fixed + sum(t.gib for t in terms if t.phase == p) for p in ("generation", "passes", "update")}
    worst = max(phases, key=phases.get)
    return phases[worst], phases, worst


def _needed(peak: float, device: str) -> float:
    return peak * CUDA_ALLOCATOR_SLACK + CUDA_CONTEXT_GIB if device == "cuda" else peak


def _largest(fits, lo: int, hi: int) -> int | None:
    """Largest x in [lo, hi] with fits(x) (fits is monotone decreasing); None if even lo does not fit."""
    if not fits(lo):
        return None
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def per_rank_config(cfg: RunConfig, ranks: int) -> RunConfig:
    """What one rank runs: the same recipe with prompts_per_step / ranks prompts (groups stay whole)."""
    if ranks == 1:
        return cfg
    check_divisible(cfg.rollout.prompts_per_step, ranks)
    return dataclasses.replace(cfg, rollout=dataclasses.replace(
        cfg.rollout, prompts_per_step=cfg.rollout.prompts_per_step // ranks))


def plan(cfg: RunConfig, gpu_mem_gib: float = 24.0, model_dims: dict | ModelDims | None = None, *,
         device: str = "cuda", prompt_tokens: int | None = None, ranks: int = 1) -> dict:
    """Predicted peak memory of one training step of `cfg` on `device` against a `gpu_mem_gib` budget.

    Returns the breakdown (`terms`), the peak per phase, whether it fits, and the largest group size
    and response length that fit with everything else unchanged. With `ranks` > 1 every figure is per
    rank (per GPU): each holds the model and samples prompts_per_step / ranks prompts x G responses.
    """
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device {device!r}: choose cuda or cpu")
    if ranks < 1:
        raise ConfigError(f"--nproc {ranks}: needs >= 1")
    per_rank_config(cfg, ranks)  # a clear error when the prompts do not split evenly
    dims = _as_dims(model_dims, cfg.model.path) if model_dims is not None else load_model_dims(cfg.model.path)
    prompt, img, prompt_how = _prompt(cfg, dims, prompt_tokens)
    g, r = cfg.rollout.group_size, cfg.rollout.max_new_tokens
    terms = _phase_terms(cfg, dims, device, prompt, g, r, ranks)
    peak, phases, worst = _sum_phases(terms, device)
    needed = _needed(peak, device)
    local_prompts = cfg.rollout.prompts_per_step // ranks

    def fits_with(group: int, resp: int) -> bool:
        terms_at = _phase_terms(cfg, dims, device, prompt, group, resp, ranks)
        return _needed(_sum_phases(terms_at, device)[0], device) <= gpu_mem_gib

    logits = max(t.gib for t in terms if t.name.startswith("streamed lm_head"))
    return {
        "device": device,
        "measures": ("torch.cuda.max_memory_allocated (+ CUDA context and allocator slack to fit the card)"
                     if device == "cuda" else "peak resident set size of the training process"),
        "model": dims.name, "family": dims.family, "params_b": dims.total_params / 1e9,
        "dims": asdict(dims),
        "shape": {"prompts_per_step": cfg.rollout.prompts_per_step, "group_size": g,
                  "responses": g * cfg.rollout.prompts_per_step, "prompt_tokens": prompt, "image_tokens": img,
                  "prompt_how": prompt_how, "response_tokens": r, "ranks": ranks,
                  "prompts_per_rank": local_prompts, "responses_per_rank": g * local_prompts,
                  "micro_batch": min(cfg.train.micro_batch_size, g * local_prompts),
                  "logprob_chunk": _logprob_chunk(cfg, dims, device),
                  "logprob_chunk_setting": cfg.train.logprob_chunk, "load_in_4bit": cfg.model.load_in_4bit,
                  "compute_bytes": _compute_bytes(cfg, device),
                  "gradient_checkpointing": cfg.model.gradient_checkpointing},
        "terms": [asdict(t) for t in terms],
        "phases": phases, "peak_phase": worst, "peak_gib": peak, "logits_gib": logits,
        "full_logits_gib": g * local_prompts * r * dims.vocab * 4 / GIB,
        "needed_gib": needed, "budget_gib": gpu_mem_gib, "fits": needed <= gpu_mem_gib,
        "max_group_size": _largest(lambda x: fits_with(x, r), 2, 4096),
        "max_response_tokens": _largest(lambda x: fits_with(g, x), 1, 262_144),
    }


# ---------------------------------------------------------------------------------------------------
# output and CLI


def format_plan(p: dict) -> str:
    """The plan as text: a header, the breakdown table (Markdown) and the verdict."""
    s = p["shape"]
    lines = [
        f"model: {p['model']} ({p['family']}, {p['params_b']:.2f}B params; V={p['dims']['vocab']}, "
        f"{p['dims']['layers']} layers, H={p['dims']['hidden']})",
        f"device: {p['device']} — predicts the {p['measures']}",
        f"step: {s['prompts_per_step']} prompt(s) x G={s['group_size']} = {s['responses']} responses; prompt "
        f"{s['prompt_tokens']} tokens ({s['prompt_how']}); responses {s['response_tokens']} tokens; micro-batch "
        f"{s['micro_batch']}; lm_head chunk {s['logprob_chunk']}{' (auto)' if s.get('logprob_chunk_setting') == 'auto' else ''}; "
        f"{'4-bit NF4' if s['load_in_4bit'] else 'unquantized'} base, {s['compute_bytes']}-byte compute",
        *([f"ranks: {s['ranks']} processes (one per GPU); each samples {s['prompts_per_rank']} prompt(s) x G="
           f"{s['group_size']} = {s['responses_per_rank']} responses and holds the whole model: every figure "
           "below is per rank (NCCL's own buffers are not modelled)"] if s.get("ranks", 1) > 1 else []),
        "",
        "| term | phase | GiB | how |",
        "|---|---|---:|---|",
    ]
    for t in p["terms"]:
        lines.append(f"| {t['name']} | {t['phase']} | {t['gib']:.3f} | {t['how']} |")
    for phase, gib in p["phases"].items():
        mark = " (peak)" if phase == p["peak_phase"] else ""
        lines.append(f"| **fixed + {phase}{mark}** | {phase} | **{gib:.3f}** | |")
    lines.append("")
    if p["device"] == "cuda":
        lines.append(f"peak allocated {p['peak_gib']:.2f} GiB; needed on the card {p['needed_gib']:.2f} GiB "
                     f"(x{CUDA_ALLOCATOR_SLACK} allocator slack + {CUDA_CONTEXT_GIB} GiB CUDA context)")
    else:
        lines.append(f"peak RSS {p['peak_gib']:.2f} GiB")
    verdict = "FITS" if p["fits"] else "DOES NOT FIT"
    lines.append(f"{verdict} in {p['budget_gib']:.1f} GiB")
    lines.append(f"streamed logits: {p['logits_gib']:.2f} GiB (full [tokens x vocab] fp32 logits would be "
                 f"{p['full_logits_gib']:.2f} GiB)")
    mg, mr = p["max_group_size"], p["max_response_tokens"]
    lines.append(f"largest group size that fits (other settings unchanged): {mg if mg is not None else 'none'}"
                 + (" (search capped at 4096)" if mg == 4096 else ""))
    lines.append(f"largest response length that fits: {mr if mr is not None else 'none'}"
                 + (" (search capped at 262144)" if mr == 262_144 else ""))
    return "\n".join(lines)


def parse_memory(text: str) -> float:
    """'24GiB', '24 GB', '24000MiB', '24' (GiB) -> GiB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?|[KMGT])?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"--gpu-mem {text!r}: expected a size like 24GiB, 24GB or 24")
    value, unit = float(m.group(1)), (m.group(2) or "GiB").upper()
    binary = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit[0]]
    decimal = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[unit[0]]
    factor = binary if (unit.endswith("IB") or len(unit) == 1) else decimal
    return value * factor / GIB


def plan_main(argv: list[str] | None = None) -> int:
    """`lite-srpo plan RECIPE [key=value ...] [--gpu-mem 24GiB] [--device cuda|cpu] [--json]`."""
    from ...config import load_config

    ap = argparse.ArgumentParser(prog="lite-srpo plan",
                                 description="Predict the peak memory of a training step before launch.")
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides, as for train")
    ap.add_argument("--gpu-mem", default=None, help="memory budget, e.g. 24GiB (implies --device cuda if not set)")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                    help="auto: cuda when --gpu-mem is given or a GPU is present, else cpu")
    ap.add_argument("--prompt-tokens", type=int, default=None,
                    help="prompt length incl. image tokens (default: estimated)")
    ap.add_argument("--nproc", type=int, default=1, metavar="N",
                    help="data-parallel processes: plan the memory of one rank (prompts_per_step / N prompts each)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    a = ap.parse_args(argv)
    try:
        cfg = load_config(a.recipe, a.overrides)
        device = a.device
        if device == "auto":
            device = "cuda" if a.gpu_mem is not None or _cuda_available() else "cpu"
        budget = parse_memory(a.gpu_mem) if a.gpu_mem is not None else (24.0 if device == "cuda" else _ram_gib())
        result = plan(cfg, budget, device=device, prompt_tokens=a.prompt_tokens, ranks=a.nproc)
    except LiteSrpoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if a.json else f"lite-srpo plan {a.recipe}\n" + format_plan(result))
    return 0 if result["fits"] else 1


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _ram_gib() -> float:
    try:
        text = Path("/proc/meminfo").read_text()
        return int(re.search(r"MemTotal:\s+(\d+)", text).group(1)) / 2**20
    except (OSError, AttributeError):
        return 16.0
