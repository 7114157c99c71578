"""SFT warm-up on reference traces, so RL can start from a random tiny model (or a weak real one).

A trace is the structured response a careful solver would write: the perception facts, the
reasoning, the boxed answer (`Sample.meta["perception"]`, `["reasoning"]`; procedural tasks carry them).
The warm-up trains every weight by default and saves a plain HF model directory that RL loads as its base.

Precision: the weights and AdamW's moments are always fp32 ("master weights"); with `model.dtype`
bf16/fp16 (`auto` on CUDA) the forward and backward run under autocast in that dtype, and the saved model
is cast to it at the end. A pure-bf16 AdamW would round away every update smaller than half a bf16 step
of the weight (about 2^-9 of its size): at lr 1e-5 most of a 7B's weights would never move. fp32
master weights cost 16 bytes a parameter, so a full fine-tune suits the tiny and small models the warm-up
is for; `sft.full_finetune: false` trains the lm_head only.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig, SftConfig
from ..data.prompts import ResponseFormat, render_reference_response
from ..data.tasks.base import Sample
from ..errors import DataError
from ..model.chunking import policy_logprob_chunk
from ..model.policy import PolicyModel, load_base, pick_device, resolve_dtype
from .passes import rows_logprobs
from .rollout import RolloutBatch, encode_prompt, eos_token_ids, pad_token_id

log = logging.getLogger(__name__)


def reference_response(sample: Sample, fmt: ResponseFormat, template: str) -> str:
    if template == "plain":
        return f"\\boxed{{{sample.answer}}}"
    if "perception" not in sample.meta or "reasoning" not in sample.meta:
        raise DataError(f"{sample.source}: SFT warm-up needs reference traces (meta 'perception' and 'reasoning'); "
                        "procedural tasks have them — for a file dataset set sft.steps=0")
    if template == "think":
        return f"<{fmt.think_tag}>{sample.meta['reasoning']}</{fmt.think_tag}>\\boxed{{{sample.answer}}}"
    return render_reference_response(sample.meta["perception"], sample.meta["reasoning"], sample.answer, fmt)


def trace_batch(policy: PolicyModel, samples: list[Sample], fmt: ResponseFormat, template: str) -> RolloutBatch:
    tok = policy.tokenizer
    eos = eos_token_ids(policy)[0]
    prompts = [encode_prompt(policy, s, template, fmt) for s in samples]
    ids = [tok(reference_response(s, fmt, template), add_special_tokens=False)["input_ids"] + [eos] for s in samples]
    width = max(len(x) for x in ids)
    resp = torch.full((len(ids), width), pad_token_id(policy), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        resp[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    return RolloutBatch(prompts=prompts, prompt_of=list(range(len(samples))), response_ids=resp, response_mask=mask,
                        texts=[""] * len(samples), truncated=torch.zeros(len(samples), dtype=torch.bool))


def autocast_to(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast in `dtype` when it is a half type; nothing for fp32 (the weights are already fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def sft_warmup(cfg: RunConfig, train_set: list[Sample], out_dir: str | Path, events=None) -> Path:
    """Full fine-tune (fp32 master weights, autocast in the recipe's dtype, no 4-bit) on reference traces;
    saves model + processor, in the recipe's dtype, to `out_dir`."""
    sft: SftConfig = cfg.sft
    out_dir = Path(out_dir)
    device = pick_device()
    compute_dtype = resolve_dtype(cfg.model.dtype, device)
    model_cfg = type(cfg.model)(**{**vars(cfg.model), "load_in_4bit": False, "dtype": "float32"})
    base, processor, family = load_base(model_cfg, device)
    policy = PolicyModel(model=base, processor=processor, family=family, device=device,
                         dtype=compute_dtype, gradient_checkpointing=False)
    fmt = ResponseFormat(perception_tag=cfg.data.perception_tag, think_tag=cfg.data.think_tag,
                         template=cfg.data.template)
    params = []
    for name, p in base.named_parameters():
        train_it = sft.full_finetune or "lm_head" in name
        p.requires_grad_(train_it)
        if train_it:
            params.append(p)
    base.train()
    optimizer = torch.optim.AdamW(params, lr=sft.lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.train.seed + 17)
    t0 = time.perf_counter()
    for step in range(1, sft.steps + 1):
        idx = rng.choice(len(train_set), size=min(sft.batch_size, len(train_set)), replace=False)
        batch = trace_batch(policy, [train_set[i] for i in idx], fmt, cfg.data.template)
        rows = list(range(batch.size))
        with autocast_to(device, compute_dtype):
            logp = rows_logprobs(policy, batch, rows, policy_logprob_chunk(cfg, policy), temperature=1.0)
        mask = batch.response_mask.float().to(logp.device)
        loss = -(logp * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if events is not None:
            events.write("sft", step, loss=float(loss.detach()), total_steps=sft.steps)
        if step % max(1, sft.steps // 10) == 0 or step == sft.steps:
            log.info("sft step %d/%d loss %.4f (%.0fs)", step, sft.steps, float(loss.detach()), time.perf_counter() - t0)
    out_dir.mkdir(parents=True, exist_ok=True)
    base.to(compute_dtype)
    base.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir
