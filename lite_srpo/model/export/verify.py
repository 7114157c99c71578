"""Verification: the trained adapter model's logits on a few chat-templated probe prompts with synthetic
images, compared logit by logit with the exported model's (an export above the tolerance is not written)."""
from __future__ import annotations

from typing import Any

import torch
from PIL import Image, ImageDraw

from ...data.prompts import ResponseFormat, build_messages
from ...data.tasks.base import Sample
from .monitor import release_later
from .plan import ExportPlan


def probe_images() -> list[Image.Image]:
    """Two deterministic synthetic pictures of different sizes (shapes on a gradient)."""
    images = []
    for w, h, n in ((56, 56, 3), (84, 56, 5)):
        im = Image.new("RGB", (w, h))
        im.putdata([(int(255 * x / w), int(255 * y / h), 128) for y in range(h) for x in range(w)])
        draw = ImageDraw.Draw(im)
        for i in range(n):
            x = 4 + (i * 17) % (w - 14)
            y = 8 + (7 * i) % (h - 20)
            draw.ellipse((x, y, x + 10, y + 10), fill=(240, 30 * i, 20))
        images.append(im)
    return images


def probe_inputs(processor: Any, fmt: ResponseFormat) -> dict[str, torch.Tensor]:
    """Chat-templated prompts plus a structured answer, so prompt and response positions are both checked."""
    questions = ("How many red shapes are in the image?", "Which side of the picture is brighter, left or right?")
    answers = ("3", "right")
    texts = []
    for image, question, answer in zip(probe_images(), questions, answers):
        messages = build_messages(Sample(images=[image], question=question, answer=answer), fmt.template, fmt)
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        texts.append(prompt + _reference_answer(answer, fmt))
    processor.tokenizer.padding_side = "left"
    enc = processor(text=texts, images=[[im] for im in probe_images()], padding=True, return_tensors="pt")
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}


def _reference_answer(answer: str, fmt: ResponseFormat) -> str:
    blocks = "".join(f"<{tag}>I look at the image.</{tag}>" for tag in fmt.blocks())
    return f"{blocks}\\boxed{{{answer}}}"


@torch.no_grad()
def probe_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Full logits [B, L, V] in fp32 on the CPU (probes are a few dozen tokens)."""
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    out = model(**{k: v.to(device) for k, v in inputs.items()}, use_cache=False)
    return out.logits.float().cpu()


def compare_logits(reference: torch.Tensor, exported: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """Max |Δlogit|, the logit scale it is judged against, and top-1 agreement over real tokens."""
    if reference.shape != exported.shape:
        return {"max_abs_diff": float("inf"), "logit_scale": float("nan"), "top1_agreement": 0.0,
                "tokens": 0, "note": f"shape {tuple(exported.shape)} != {tuple(reference.shape)}"}
    mask = attention_mask.bool()  # [B, L]
    ref, exp = reference[mask], exported[mask]  # [tokens, V]
    return {"max_abs_diff": float((ref - exp).abs().max()), "logit_scale": float(ref.abs().max()),
            "top1_agreement": float((ref.argmax(-1) == exp.argmax(-1)).float().mean()), "tokens": int(mask.sum())}


def within_tolerance(cmp: dict, tolerance: float) -> bool:
    """Absolute for small logits, relative to the largest |logit| once that exceeds 1."""
    return cmp["max_abs_diff"] <= tolerance * max(1.0, cmp["logit_scale"])


def reference_logits(plan: ExportPlan) -> tuple[torch.Tensor, torch.Tensor]:
    from ..policy import load_policy

    policy = load_policy(plan.model_cfg, plan.source.cfg.lora, adapter_path=str(plan.source.adapter_dir),
                         trainable=False, device=plan.device)
    policy.model.eval()  # dropout off; the CPU 4-bit repack is already disabled by load_policy
    inputs = probe_inputs(policy.processor, plan.fmt)
    logits = probe_logits(policy.model, inputs)
    release = release_later(policy.model)
    del policy
    release()
    return logits, inputs["attention_mask"]
