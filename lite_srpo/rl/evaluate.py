"""Accuracy under a named protocol: `greedy` (VGPO's) or `avg@k` at temperature T (PAPO's and VPPO's).

Protocols differ between the papers (research/algorithms.md §6.4), so every result names its own.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from ..data.prompts import ResponseFormat
from ..data.tasks.base import Sample
from ..model.policy import PolicyModel
from ..rewards.builtin import accuracy_reward, format_reward
from .rollout import encode_prompt, generate


@dataclass(frozen=True)
class Protocol:
    name: str  # "greedy" | "avg@k"
    k: int = 1
    temperature: float = 1.0

    @property
    def label(self) -> str:
        return "greedy" if self.name == "greedy" else f"avg@{self.k} (T={self.temperature:g})"

    @staticmethod
    def parse(text: str, temperature: float = 1.0) -> "Protocol":
        if text == "greedy":
            return Protocol("greedy")
        if text.startswith("avg@") and text[4:].isdigit() and int(text[4:]) >= 1:
            return Protocol("avg@k", k=int(text[4:]), temperature=temperature)
        raise ValueError(f"protocol {text!r}: use greedy or avg@K (e.g. avg@8)")


def evaluate(policy: PolicyModel, samples: list[Sample], template: str, fmt: ResponseFormat, *,
             protocol: Protocol = Protocol("greedy"), max_new_tokens: int = 128, batch_size: int = 16,
             answer_fallback: str = "none", batch_rows: int = 0) -> dict:
    """Accuracy (per task and overall), format rate and mean response length over `samples`.
    `batch_rows` > 0 decodes at most that many rows per generate call (a run's rollout.generation_rows:
    the KV cache the memory plan counted); sampled protocols then need lite-srpo's full-distribution sampler."""
    correct: dict[str, list[float]] = defaultdict(list)
    formats: list[float] = []
    lengths: list[int] = []
    truncated: list[bool] = []
    per_item: list[float] = []  # each sample's accuracy (mean over its k responses), for bootstrap CIs
    greedy = protocol.name == "greedy"
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        prompts = [encode_prompt(policy, s, template, fmt) for s in chunk]
        batch = generate(policy, prompts, group_size=1 if greedy else protocol.k, max_new_tokens=max_new_tokens,
                         temperature=protocol.temperature, do_sample=not greedy, batch_rows=batch_rows)
        item_scores: dict[int, list[float]] = defaultdict(list)
        rows = zip(batch.texts, batch.samples(), batch.prompt_of, batch.response_mask.sum(dim=1).tolist(),
                   batch.truncated.tolist())
        for text, sample, prompt_index, length, cut in rows:
            score = accuracy_reward(text, sample, fmt, fallback=answer_fallback)
            correct[sample.task or "all"].append(score)
            item_scores[prompt_index].append(score)
            formats.append(format_reward(text, sample, fmt))
            lengths.append(int(length))
            truncated.append(bool(cut))
        per_item += [sum(v) / len(v) for _, v in sorted(item_scores.items())]
    every = [v for vals in correct.values() for v in vals]
    n = max(len(every), 1)
    return {
        "protocol": protocol.label,
        "accuracy": sum(every) / n,
        "format_rate": sum(formats) / n,
        "mean_length": sum(lengths) / n,
        "truncated_frac": sum(truncated) / n,
        "n_samples": len(samples),
        "n_responses": len(every),
        "per_task": {k: sum(v) / len(v) for k, v in sorted(correct.items())},
        "item_accuracy": per_item,
    }
