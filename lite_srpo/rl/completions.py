"""A few of a step's responses as a table for the trackers (`train.log_completions_every`).

Curves say that the reward moved; the table says why: for up to `MAX_PROMPTS` prompts, up to
`MAX_SAMPLES` of their sampled responses with the prompt's image, the response with its token roles
marked (`[P]…[/P]` perception, `[R]…[/R]` reasoning, as the algorithm saw them), the reward's parts,
the sequence advantage, and the mean per-token weight of each role when the algorithm weights tokens
(SRPO). `pick_rows`, `mark_roles` and `completion_rows` are pure; `step_completions` gathers their
inputs from the step (rank 0's rows, after dynamic sampling).
"""
from __future__ import annotations

import math

import torch
from PIL import Image

from ..data.prompts import PERCEPTION, REASONING, token_char_spans
from ..data.tasks.base import Sample
from .algorithms import Shaping
from .data_parallel import GlobalStep
from .rollout import RolloutBatch

MAX_PROMPTS, MAX_SAMPLES = 2, 4
IMAGE_SIDE = 256  # thumbnails: the table stays small however large the prompt's image is
ROLE_MARKS = {PERCEPTION: ("[P]", "[/P]"), REASONING: ("[R]", "[/R]")}
ROLE_NAMES = {PERCEPTION: "perception", REASONING: "reasoning"}


def pick_rows(prompt_of: list[int], max_prompts: int = MAX_PROMPTS, max_samples: int = MAX_SAMPLES) -> list[int]:
    """Rows of the first `max_prompts` prompts present, at most `max_samples` each, grouped by prompt."""
    order: list[int] = []
    by_prompt: dict[int, list[int]] = {}
    for row, prompt in enumerate(prompt_of):
        if prompt not in by_prompt:
            if len(order) == max_prompts:
                continue
            order.append(prompt)
            by_prompt[prompt] = []
        if len(by_prompt[prompt]) < max_samples:
            by_prompt[prompt].append(row)
    return [row for prompt in order for row in by_prompt[prompt]]


def mark_roles(text: str, spans: list[tuple[int, int]], roles: list[int]) -> str:
    """`text` with each run of perception / reasoning tokens wrapped in its marks (other tokens bare)."""
    char_role = [0] * len(text)
    for (start, end), role in zip(spans, roles):
        char_role[start:end] = [role] * (max(end, start) - start)
    out, current = [], 0
    for ch, role in zip(text, char_role):
        if role != current:
            if current in ROLE_MARKS:
                out.append(ROLE_MARKS[current][1])
            if role in ROLE_MARKS:
                out.append(ROLE_MARKS[role][0])
            current = role
        out.append(ch)
    if current in ROLE_MARKS:
        out.append(ROLE_MARKS[current][1])
    return "".join(out)


def role_weight_means(weights: list[float], roles: list[int]) -> dict[str, float | None]:
    """Mean per-token weight over each role's tokens (None when the response has none of that role)."""
    out: dict[str, float | None] = {}
    for role, name in ROLE_NAMES.items():
        values = [w for w, r in zip(weights, roles) if r == role]
        out[f"weight/{name}"] = sum(values) / len(values) if values else None
    return out


def thumbnail(image: Image.Image | None, side: int = IMAGE_SIDE) -> Image.Image | None:
    if image is None:
        return None
    small = image.convert("RGB")
    small.thumbnail((side, side))
    return small


def _number(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 5)


def completion_rows(prompts: list[int], samples: list[Sample], texts: list[str], spans: list[list[tuple[int, int]]],
                    roles: list[list[int]] | None, rewards: list[float], parts: dict[str, list[float]],
                    advantages: list[float], weights: list[list[float]] | None) -> list[dict]:
    """One flat dict per response, the same keys in the same order for every row (the table's columns).

    Every list is per response (`prompts[k]` indexes `samples`); `spans[k]`, `roles[k]` and `weights[k]`
    cover response k's tokens, `spans` as character spans of `texts[k]`."""
    out: list[dict] = []
    table_prompt: dict[int, int] = {}
    seen: dict[int, int] = {}
    for k, p in enumerate(prompts):
        sample = samples[p]
        row_roles = roles[k] if roles is not None else [0] * len(spans[k])
        row = {"prompt": table_prompt.setdefault(p, len(table_prompt)), "sample": seen.get(p, 0),
               "image": thumbnail(sample.images[0] if sample.images else None),
               "question": sample.question, "answer": sample.answer,
               "response": mark_roles(texts[k], spans[k], row_roles), "reward": _number(rewards[k])}
        seen[p] = seen.get(p, 0) + 1
        row.update({f"reward/{name}": _number(values[k]) for name, values in parts.items()})
        row["advantage"] = _number(advantages[k])
        if weights is not None and roles is not None:
            row.update({key: None if v is None else _number(v)
                        for key, v in role_weight_means(weights[k], row_roles).items()})
        out.append(row)
    return out


def batch_completions(tokenizer, batch: RolloutBatch, rewards: list[float], parts: dict[str, list[float]],
                      roles: torch.Tensor | None, advantages: torch.Tensor | list[float],
                      weights: torch.Tensor | None) -> list[dict]:
    """The table from `batch`'s rows (`pick_rows`); every per-row argument is indexed by the batch's row."""
    rows = pick_rows(batch.prompt_of[:batch.size])
    ids = [batch.response_ids[i, :int(batch.response_mask[i].sum())].tolist() for i in rows]
    return completion_rows(
        prompts=[batch.prompt_of[i] for i in rows], samples=[p.sample for p in batch.prompts],
        texts=[tokenizer.decode(x) for x in ids], spans=[token_char_spans(tokenizer, x) for x in ids],
        roles=None if roles is None else [roles[i, :len(x)].tolist() for i, x in zip(rows, ids)],
        rewards=[rewards[i] for i in rows], parts={k: [v[i] for i in rows] for k, v in parts.items()},
        advantages=[float(advantages[i]) for i in rows],
        weights=None if weights is None else [weights[i, :len(x)].tolist() for i, x in zip(rows, ids)])


def step_completions(tokenizer, batch: RolloutBatch, g: GlobalStep, adv_seq: torch.Tensor,
                     shaping: Shaping) -> list[dict]:
    """The table from this rank's rows of the step (rank 0's rows come first in the kept order `g.kept`)."""
    original = g.kept[:batch.size]  # each row's index before dynamic sampling (rewards are indexed so)
    return batch_completions(tokenizer, batch, [g.rewards[j] for j in original],
                             {k: [v[j] for j in original] for k, v in g.per_fn.items()}, g.roles, adv_seq,
                             shaping.weights)
