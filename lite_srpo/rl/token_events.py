"""Per-token records for the `tokens` event: each token's text, role, score, weight and advantage."""
from __future__ import annotations

import torch

from ..data.prompts import token_char_spans
from .algorithms import Shaping
from .rollout import RolloutBatch
from .state import Run


def pick_rows(batch: RolloutBatch, count: int) -> list[int]:
    """The first `count` responses, prompt by prompt (the batch is prompt-major): with count = G, the first
    prompt's whole group, so the Tokens tab can compare responses that share an image and a question."""
    return list(range(min(count, batch.size)))


def _value(t: torch.Tensor | None, i: int, j: int, default: float) -> float:
    return default if t is None else round(float(t[i, j]), 5)


def token_event_records(run: Run, batch: RolloutBatch, rewards: list[float], shaping: Shaping,
                        roles: torch.Tensor | None, step: int) -> list[dict]:
    tokenizer = run.policy.tokenizer
    image_dir = run.run_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i in pick_rows(batch, run.cfg.train.tokens_samples):
        length = int(batch.response_mask[i].sum())
        ids = batch.response_ids[i, :length].tolist()
        text = tokenizer.decode(ids)
        spans = token_char_spans(tokenizer, ids)
        sample = batch.prompts[batch.prompt_of[i]].sample
        image_path = None
        if sample.images:
            image_path = image_dir / f"step{step:06d}_{i}.png"
            sample.images[0].save(image_path)
        tokens = [{"t": text[s:e], "role": 0 if roles is None else int(roles[i, j]),
                   "score": _value(shaping.scores, i, j, 0.0), "weight": _value(shaping.weights, i, j, 1.0),
                   "adv": _value(shaping.advantages, i, j, 0.0)} for j, (s, e) in enumerate(spans)]
        advantage = None if shaping.advantages is None or not length else round(
            float(shaping.advantages[i, :length].float().mean()), 5)
        records.append({"row": i, "question": sample.question, "answer": sample.answer, "source": sample.source,
                        "response": batch.texts[i], "reward": rewards[i] if i < len(rewards) else None,
                        "advantage": advantage, "has_roles": any(t["role"] for t in tokens),
                        "image": None if image_path is None else str(image_path.relative_to(run.run_dir)),
                        "tokens": tokens})
    return records
