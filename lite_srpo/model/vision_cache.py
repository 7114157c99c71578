"""Vision-encoder outputs computed once per image per step, for every teacher-forced pass.

A step runs up to five teacher-forced forwards over the same images (old, reference, corrupted,
perception-removed log-probs and the update), each of which would run the vision tower again on the
same `pixel_values`. When the tower is frozen (no vision LoRA, no trainable vision weight), its
output depends only on the pixels, so this cache encodes each prompt's images (and each corrupted
copy) once and hands the features to the model as `mm_encoder_outputs`, in place of `pixel_values`.
The reference pass (adapter off) shares them too: without vision LoRA the tower is the same there.

Supported where the installed transformers' model forward takes `mm_encoder_outputs` (transformers
5.x Qwen2-VL, Qwen2.5-VL, Qwen3-VL, whose deepstack features are cached as well). Anything else
(Idefics3/SmolVLM, a vision LoRA, a fully fine-tuned tower) keeps the uncached path.

The cache lives in `RolloutBatch.extras` under `KEY`, so it is dropped with the step's batch. It
keys on the identity of each prompt's visual dict (which it keeps alive, so an id is never reused).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

KEY = "vision_cache"
SUPPORTED_FAMILIES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl")
ENABLED = True
"""Process-wide switch, for benchmarks that measure the uncached path (bench/vs_trl.py --ablate)."""


@dataclass
class _Features:
    """One visual dict's encoder output: per-image merged features, and per-layer deepstack features."""

    kind: type
    pooler: tuple[torch.Tensor, ...]
    deepstack: list[tuple[torch.Tensor, ...]] | None


def vision_is_frozen(policy: Any) -> bool:
    """True when no vision weight can change within a step: no LoRA there and nothing trainable."""
    for name, p in policy.model.named_parameters():
        if (".visual." in name or "vision_model" in name) and ("lora_" in name or p.requires_grad):
            return False
    return True


def supports_cache(policy: Any) -> bool:
    """The family takes precomputed image features (`mm_encoder_outputs`) and the tower is frozen."""
    if not ENABLED or policy.family not in SUPPORTED_FAMILIES:
        return False
    inner = getattr(policy.hf, "model", None)
    if inner is None or not hasattr(inner, "get_image_features"):
        return False
    if "mm_encoder_outputs" not in inspect.signature(inner.forward).parameters:
        return False
    return vision_is_frozen(policy)


class VisionFeatureCache:
    """Image features of one step's prompts (and corrupted copies), each encoded once, no grad."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self._store: dict[int, tuple[dict, _Features]] = {}
        self.encoded_images = 0  # images run through the tower (for tests and logs)

    def __len__(self) -> int:
        return len(self._store)

    def features(self, visual: dict[str, torch.Tensor]) -> _Features:
        """The encoder output for one visual dict, computed on first use."""
        hit = self._store.get(id(visual))
        if hit is not None:
            return hit[1]
        inner = self.policy.hf.model
        device = self.policy.device
        grid = visual["image_grid_thw"].to(device)
        with torch.no_grad():
            out = inner.get_image_features(visual["pixel_values"].to(device), grid, return_dict=True)
        deep = getattr(out, "deepstack_features", None)
        feats = _Features(kind=type(out), pooler=tuple(t.detach() for t in out.pooler_output),
                          deepstack=None if deep is None else [tuple(t.detach() for t in layer) for layer in deep])
        self._store[id(visual)] = (visual, feats)
        self.encoded_images += int(grid.shape[0])
        return feats

    def apply(self, inputs: dict[str, Any], visuals: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """Model inputs with `pixel_values` replaced by the cached features of `visuals` (one per row).

        `image_grid_thw` stays: the model still needs it for the 3-D rotary positions."""
        if "pixel_values" not in inputs or any("pixel_values" not in v or "image_grid_thw" not in v for v in visuals):
            return inputs
        feats = [self.features(v) for v in visuals]
        pooler = tuple(t for f in feats for t in f.pooler)
        kwargs: dict[str, Any] = {"pooler_output": pooler}
        if feats[0].deepstack is not None:
            kwargs["deepstack_features"] = [tuple(t for f in feats for t in f.deepstack[layer])
                                            for layer in range(len(feats[0].deepstack))]
        out = dict(inputs)
        out.pop("pixel_values")
        out["mm_encoder_outputs"] = {"image": feats[0].kind(**kwargs)}
        return out


def batch_cache(policy: Any, batch: Any) -> VisionFeatureCache | None:
    """The step's cache, kept in `batch.extras` and created on first use; None where unsupported."""
    extras = batch.extras
    if KEY not in extras:
        extras[KEY] = VisionFeatureCache(policy) if supports_cache(policy) else None
    cache = extras[KEY]
    return cache if cache is not None and cache.policy is policy else None
