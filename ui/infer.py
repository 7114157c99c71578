"""Try the model: one uploaded image + a question → the structured answer, from the base or a checkpoint.

Runs in the UI process (Gradio calls handlers in worker threads). The model is loaded on first use and
kept for the next question with the same (model, adapter); one inference at a time.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image

from lite_srpo.config import RunConfig, config_from_dict
from lite_srpo.errors import LiteSrpoError
from lite_srpo.run.checkpoint import ADAPTER_DIR, RECIPE_FILE, checkpoint_dirs

from .process import LAUNCH_RECIPE
from .tokens import role_name

BASE = "base"
MAX_SIDE = 1344  # larger uploads are scaled down: a phone photo would be thousands of vision tokens


def model_choices(run_dir: str | Path | None) -> list[tuple[str, str]]:
    """(label, value) pairs: the base the run trained from, then each checkpoint (newest first)."""
    if not run_dir:
        return []
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    base_label = f"base model ({cfg.model.path})" if cfg else "base model"
    ckpts = [(f"checkpoint {p.name} (adapter)", str(p)) for p in reversed(checkpoint_dirs(run_dir))]
    return [(base_label, BASE)] + ckpts


def run_config(run_dir: Path, checkpoint: Path | None = None) -> RunConfig | None:
    """The config a checkpoint was trained with (its own copy first, then the run's)."""
    candidates = ([checkpoint / RECIPE_FILE] if checkpoint else []) + [run_dir / "recipe.yaml", run_dir / LAUNCH_RECIPE]
    for path in candidates:
        if path.is_file():
            try:
                return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), source=str(path))
            except (LiteSrpoError, yaml.YAMLError):
                continue
    return None


@dataclass
class Answer:
    text: str
    structured: str  # markdown: perception / reasoning / answer
    highlights: list[tuple[str, str]]
    valid: bool


class ModelCache:
    """Keeps the last loaded policy; a different (model, adapter) replaces it."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.policy: Any = None
        self.lock = threading.Lock()

    def get(self, cfg: RunConfig, adapter: str | None):
        from lite_srpo.model.policy import load_policy

        key = (cfg.model.path, cfg.model.load_in_4bit, cfg.model.dtype, adapter)
        if key != self.key:
            self.policy, self.key = None, None  # free the old model before loading the new one
            self.policy = load_policy(cfg.model, cfg.lora, adapter_path=adapter, trainable=False)
            self.key = key
        return self.policy


CACHE = ModelCache()


def structured_markdown(text: str, cfg: RunConfig) -> tuple[str, bool]:
    from lite_srpo.data.prompts import parse_structure, response_format
    from lite_srpo.rewards.builtin import extract_answer

    fmt = response_format(cfg.data)
    answer = extract_answer(text)
    s = parse_structure(text, fmt)
    parts = []
    if s is not None:
        names = ["Perception", "Reasoning"] if len(s.contents) == 2 else ["Reasoning"]
        parts += [f"**{name}:** {text[b:e].strip()}" for name, (b, e) in zip(names, s.contents)]
    else:
        parts.append("_The response does not follow the template's structure._")
    parts.append(f"**Answer:** `{answer}`" if answer is not None else "**Answer:** _no \\boxed{} answer_")
    return "\n\n".join(parts), s is not None


def ask(run_dir: str | Path, choice: str, image: Image.Image | None, question: str, max_new_tokens: int = 128,
        cache: ModelCache = CACHE) -> Answer:
    """Greedy answer of the chosen model to one question about one image."""
    from lite_srpo.data.prompts import response_format, token_char_spans, token_roles
    from lite_srpo.data.tasks.base import Sample
    from lite_srpo.rl.rollout import encode_prompt, generate

    if image is None:
        raise LiteSrpoError("upload an image first")
    if not (question or "").strip():
        raise LiteSrpoError("type a question first")
    run_dir = Path(run_dir)
    checkpoint = None if choice == BASE else Path(choice)
    cfg = run_config(run_dir, checkpoint)
    if cfg is None:
        raise LiteSrpoError(f"{run_dir}: no readable recipe.yaml to know which model to load")
    adapter = str(checkpoint / ADAPTER_DIR) if checkpoint else None
    image = image.convert("RGB")
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE))
    fmt = response_format(cfg.data)
    with cache.lock:
        policy = cache.get(cfg, adapter)
        prompt = encode_prompt(policy, Sample(images=[image], question=question.strip(), answer=""),
                               cfg.data.template, fmt)
        batch = generate(policy, [prompt], group_size=1, max_new_tokens=int(max_new_tokens), do_sample=False)
        length = int(batch.response_mask[0].sum())
        ids = batch.response_ids[0, :length].tolist()
        roles, _ = token_roles(policy.tokenizer, ids, fmt)
        decoded = policy.tokenizer.decode(ids)
        pieces = [decoded[b:e] for b, e in token_char_spans(policy.tokenizer, ids)]
    text = batch.texts[0]
    structured, valid = structured_markdown(text, cfg)
    return Answer(text=text, structured=structured, valid=valid,
                  highlights=[(p, role_name(r)) for p, r in zip(pieces, roles)])
