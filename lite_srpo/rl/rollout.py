"""Rollout: encode prompts, sample G responses each with HF `generate`, and rebuild teacher-forced batches.

Layout of every teacher-forced batch: `[left pad | prompt | response | right pad]`, so response
position t of every row sits at column `prompt_len + t` and is predicted by the hidden state at
`prompt_len + t - 1`. `mm_token_type_ids` (when the processor gives it) goes into every forward with
zeros over the response; without it Qwen2.5-VL silently falls back to 1-D positions (platform.md §4).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from PIL import Image

from ..data.prompts import ResponseFormat, build_messages
from ..data.tasks.base import Sample
from ..model.policy import PolicyModel
from . import sampling
from .generation_settings import NEUTRAL_LOGIT_SETTINGS, own_generation_settings
from .sampling import InverseCdfSampler

# Visual tensors whose first dimension concatenates over images (Qwen's flat patch list).
_FLAT_VISUAL_KEYS = {"pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"}
_TEXT_KEYS = {"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"}


@dataclass
class PromptInputs:
    """One encoded prompt: its token ids and its own visual tensors (so rows can be regrouped freely)."""

    sample: Sample
    input_ids: torch.Tensor  # [P]
    mm_token_type_ids: torch.Tensor | None  # [P]
    visual: dict[str, torch.Tensor]

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class RolloutBatch:
    """N = B*G responses; row i answers prompt `prompt_of[i]`."""

    prompts: list[PromptInputs]
    prompt_of: list[int]
    response_ids: torch.Tensor  # [N, R]
    response_mask: torch.Tensor  # [N, R] 1 through the first EOS (inclusive)
    texts: list[str]
    truncated: torch.Tensor  # [N] bool: hit max_new_tokens without EOS
    extras: dict[str, Any] = field(default_factory=dict)
    first_prompt: int = 0
    """Index of `prompts[0]` among the step's prompts of all ranks (0 in a single process); seeds use it
    so that a prompt's samples and corruptions do not depend on how many ranks share the step."""

    @property
    def size(self) -> int:
        return int(self.response_ids.shape[0])

    def samples(self) -> list[Sample]:
        return [self.prompts[p].sample for p in self.prompt_of]


def encode_prompt(policy: PolicyModel, sample: Sample, template: str, fmt: ResponseFormat,
                  images: list[Image.Image] | None = None) -> PromptInputs:
    """Chat-template one sample and run the processor on its images."""
    messages = build_messages(sample, template, fmt)
    text = policy.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = policy.processor(text=[text], images=[images or sample.images], return_tensors="pt")
    visual = {k: v for k, v in enc.items() if k not in _TEXT_KEYS and isinstance(v, torch.Tensor)}
    mm = enc.get("mm_token_type_ids")
    return PromptInputs(sample=sample, input_ids=enc["input_ids"][0], visual=visual,
                        mm_token_type_ids=None if mm is None else mm[0])


def encode_visual(policy: PolicyModel, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """Visual tensors only, for a corrupted copy of a prompt's images (same size, same token count)."""
    enc = policy.processor.image_processor(images=[images], return_tensors="pt")
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}


def collate_visual(visuals: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key in visuals[0]:
        parts = [v[key] for v in visuals]
        if key in _FLAT_VISUAL_KEYS and parts[0].dim() != 5:
            out[key] = torch.cat(parts, dim=0)
            continue
        # Idefics3-style [1, n_images, ...]: pad the image axis with zero images (dropped as padding).
        n_max = max(p.shape[1] for p in parts)
        padded = [F.pad(p, [0, 0] * (p.dim() - 2) + [0, n_max - p.shape[1]]) if p.shape[1] < n_max else p for p in parts]
        out[key] = torch.cat(padded, dim=0)
    return out


def collate(rows: list[PromptInputs], pad_id: int, responses: torch.Tensor | None = None,
            response_mask: torch.Tensor | None = None,
            visual_override: list[dict[str, torch.Tensor]] | None = None,
            device: torch.device | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Left-pad prompts, append responses; returns model inputs and the common prompt length."""
    prompt_len = max(r.length for r in rows)
    resp_len = 0 if responses is None else responses.shape[1]
    n = len(rows)
    input_ids = torch.full((n, prompt_len + resp_len), pad_id, dtype=torch.long)
    attention = torch.zeros((n, prompt_len + resp_len), dtype=torch.long)
    has_mm = rows[0].mm_token_type_ids is not None
    mm = torch.zeros_like(input_ids) if has_mm else None
    for i, r in enumerate(rows):
        start = prompt_len - r.length
        input_ids[i, start:prompt_len] = r.input_ids
        attention[i, start:prompt_len] = 1
        if mm is not None:
            mm[i, start:prompt_len] = r.mm_token_type_ids
    if responses is not None:
        input_ids[:, prompt_len:] = responses
        attention[:, prompt_len:] = response_mask.long()
    inputs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention}
    if mm is not None:
        inputs["mm_token_type_ids"] = mm
    inputs.update(collate_visual(visual_override or [r.visual for r in rows]))
    if device is not None:
        inputs = {k: v.to(device) for k, v in inputs.items()}
    return inputs, prompt_len


def response_mask_from_ids(ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """1 on every token up to and including the first EOS; truncated rows (no EOS) keep all tokens."""
    is_eos = torch.zeros_like(ids, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= ids == e
    seen_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS count strictly before t
    mask = seen_before == 0
    truncated = ~is_eos.any(dim=1)
    return mask.long(), truncated


def eos_token_ids(policy: PolicyModel) -> list[int]:
    eos = policy.hf.generation_config.eos_token_id
    if eos is None:
        eos = policy.tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def pad_token_id(policy: PolicyModel) -> int:
    pad = policy.tokenizer.pad_token_id
    return eos_token_ids(policy)[0] if pad is None else pad


def uses_own_sampler(top_p: float, top_k: int, sampler: InverseCdfSampler | bool | None = None) -> bool:
    """Whether sampling runs lite-srpo's full-distribution sampler (`generate`'s `sampler` argument) rather
    than HF's. Only it can decode a group's rows in several calls (`batch_rows`): it seeds each row alone,
    while HF's sampler draws a prompt's G rows together."""
    return sampler is not False and top_p >= 1.0 and not top_k and (sampling.ENABLED or bool(sampler))


@torch.no_grad()
def generate(policy: PolicyModel, prompts: list[PromptInputs], group_size: int, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, do_sample: bool = True,
             batch_prompts: int = 0, sampler: InverseCdfSampler | bool | None = None,
             seed_of: Callable[[int], int] | None = None, batch_rows: int = 0,
             row_seed_of: Callable[[int, int], int] | None = None) -> RolloutBatch:
    """Sample `group_size` responses per prompt (adapter on, vision special tokens suppressed), with the
    recipe's settings only: the checkpoint's generation config cannot reshape the draws
    (`generation_settings.py`), so what is sampled is what the passes score.

    `sampler`: full-distribution sampling (top_p 1, top_k 0) draws tokens by inverse CDF
    (`sampling.py`: the same distribution as HF's multinomial, far cheaper over a 152k vocabulary) unless
    False; pass an `InverseCdfSampler` to choose its generator. Truncated sampling uses HF's sampler.
    `seed_of(i)` seeds the sampler before the generate call whose first prompt is `prompts[i]`: the
    samples then depend only on the seed, the step and the prompts, not on what ran before (an
    evaluation, another rank's share).

    `batch_rows` > 0 (rollout.generation_rows) decodes each call's rows (prompt-major, G per prompt) in
    pieces of at most that many, so the KV cache holds only that many rows; `row_seed_of(i, j)` then
    seeds sample j of prompt i on its own stream, and the tokens do not depend on the split. It needs
    lite-srpo's sampler or greedy decoding (HF's sampler draws G rows per prompt itself)."""
    pad_id = pad_token_id(policy)
    eos = eos_token_ids(policy)
    chunks = [prompts] if batch_prompts <= 0 else [prompts[i:i + batch_prompts] for i in range(0, len(prompts), batch_prompts)]
    pieces: list[torch.Tensor] = []
    own = do_sample and uses_own_sampler(top_p, top_k, sampler)
    gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample and not own,
                                      pad_token_id=pad_id, eos_token_id=eos,
                                      suppress_tokens=policy.suppressed_token_ids(),
                                      num_return_sequences=group_size if do_sample and not own else 1,
                                      **NEUTRAL_LOGIT_SETTINGS)
    if own:  # greedy generate whose last processor samples: rows are repeated here instead of by HF
        from transformers import LogitsProcessorList

        sampler = sampler if isinstance(sampler, InverseCdfSampler) else InverseCdfSampler(temperature)
        sampler.suppress = policy.suppressed_token_ids()  # cheaper than HF's vocabulary-wide suppression
        gen_kwargs.update(temperature=None, top_p=None, top_k=None, suppress_tokens=None,
                          logits_processor=LogitsProcessorList([sampler]))
    elif do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k or 0)  # 0, not None: no top-k
    else:
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    if batch_rows > 0 and do_sample and not own:
        raise ValueError("batch_rows (rollout.generation_rows) needs full-distribution sampling (top_p 1, top_k 0) "
                         "with lite-srpo's sampler, or greedy decoding")
    with policy.policy(), policy.generation_mode(), own_generation_settings(policy.hf):
        for k, chunk in enumerate(chunks):
            first = k * (batch_prompts if batch_prompts > 0 else 0)
            if batch_rows > 0:
                pieces += _generate_rows(policy, chunk, first, group_size if own else 1, batch_rows, pad_id,
                                         gen_kwargs, sampler if own else None, seed_of, row_seed_of)
                continue
            if seed_of is not None:
                torch.manual_seed(seed_of(first))
            rows = [p for p in chunk for _ in range(group_size)] if own else chunk
            inputs, prompt_len = collate(rows, pad_id, device=policy.device)
            out = policy.hf.generate(**inputs, **gen_kwargs)
            pieces.append(out[:, prompt_len:].cpu())
    width = max(p.shape[1] for p in pieces)
    response_ids = torch.cat([F.pad(p, (0, width - p.shape[1]), value=pad_id) for p in pieces], dim=0)
    mask, truncated = response_mask_from_ids(response_ids, eos)
    response_ids = response_ids.masked_fill(mask == 0, pad_id)
    reps = group_size if do_sample else 1
    prompt_of = [p for p in range(len(prompts)) for _ in range(reps)]
    texts = [policy.tokenizer.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(response_ids, mask)]
    return RolloutBatch(prompts=prompts, prompt_of=prompt_of, response_ids=response_ids, response_mask=mask,
                        texts=texts, truncated=truncated)


def _generate_rows(policy: PolicyModel, chunk: list[PromptInputs], first: int, reps: int, batch_rows: int,
                   pad_id: int, gen_kwargs: dict[str, Any], sampler: InverseCdfSampler | None,
                   seed_of: Callable[[int], int] | None,
                   row_seed_of: Callable[[int, int], int] | None) -> list[torch.Tensor]:
    """One prompt chunk's rows (prompt-major, `reps` per prompt) in generate calls of at most `batch_rows`
    rows; with `row_seed_of`, each row samples from its own generator seeded by (prompt, sample)."""
    rows = [(i, j) for i in range(len(chunk)) for j in range(reps)]
    out_pieces = []
    for start in range(0, len(rows), batch_rows):
        piece = rows[start:start + batch_rows]
        if sampler is not None and row_seed_of is not None:
            sampler.row_generators = [torch.Generator().manual_seed(row_seed_of(first + i, j)) for i, j in piece]
        elif seed_of is not None:
            torch.manual_seed(seed_of(first + piece[0][0]))
        inputs, prompt_len = collate([chunk[i] for i, _ in piece], pad_id, device=policy.device)
        try:
            out = policy.hf.generate(**inputs, **gen_kwargs)
        finally:
            if sampler is not None:
                sampler.row_generators = None
        out_pieces.append(out[:, prompt_len:].cpu())
    return out_pieces
