"""One training step of a recipe, run at the real model's shapes on the `meta` device: what it allocates.

`lite-srpo plan` adds up formulas; this runs the code. The model is the real transformers class built
from the checkpoint's `config.json`, quantized to real `bnb.nn.Linear4bit` layers (`model/meta_model.py`),
made into the policy by the trainer's own `wrap_policy` (LoRA by peft, fp32 adapters, gradient
checkpointing, offload and chunked-MLP hooks), and then driven through a step in `rl_step`'s order:

1. fixed: weights, adapter, and the adapter's gradients and optimizer state (primed by one optimizer
   step, so that the phases below see the steady state of step 2 onwards);
2. generation: the vision tower over the generate call's images, the prefill of `generation_rows`
   rows with the KV cache, then the last decode steps at full length (prompt + response - k tokens of
   cache grown by concatenation, as transformers' DynamicCache grows), each through the lm_head and
   lite-srpo's sampler (`InverseCdfSampler`);
3. passes: the step's vision features (the cache), then each no-grad pass the algorithm runs (old,
   reference with the adapter off, corrupted image, perception removed) over one micro-batch through
   the streamed lm_head (`streaming.token_logprobs`); then, between the phases as in `rl_step`, the
   algorithm's token shaping (SRPO's weights) on the step's `[N, R]` vectors, which live on the host;
4. update: one micro-batch forward with grad (checkpointed layers, offloaded inputs when on), the
   algorithm's loss (`grpo.policy_loss`, KL, extra loss), backward, gradient clipping and the
   optimizer step.

`LiveBytes` counts the bytes alive at every op. What `meta` cannot show: kernels' workspaces (cuBLAS,
attention), the caching allocator's rounding and fragmentation, the CUDA context. Decoding cannot stop
on data, so every response runs to max_new_tokens (the worst case the planner also assumes), and rows
have equal lengths, so no padding mask is built. Data-dependent helpers (mRoPE positions, vision
window indices) are computed on the host from the same token layout, as transformers lets a caller
precompute them. A paged optimizer is traced as its unpaged twin: the same state bytes, which on a
card live in CUDA managed memory outside `max_memory_allocated`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import RunConfig
from ..model.activation_memory import ActivationOffload
from ..model.dims import as_dims
from ..model.memory.live_bytes import LiveBytes
from ..model.memory.terms import GIB, TEXT_PROMPT_TOKENS, generation_rows, logprob_chunk, prompt_length
from ..model.meta_model import meta_base
from ..model.policy import PolicyModel, wrap_policy
from ..model.processors import vision_token_ids
from ..model.streaming import token_logprobs
from .algorithms import ALGORITHM_SPECS, ShapeInputs, Shaping, old_pass_needed
from .objectives import grpo
from .optim import build_optimizer
from .passes import PassOutputs, response_hidden
from .sampling import InverseCdfSampler

META = torch.device("meta")
DECODE_STEPS = 2
"""Decode steps traced at the end of generation (cache at its full length); the rest only grow it."""
TRACED_FAMILIES = ("qwen2_5_vl", "qwen2_vl")


def _sdpa_as_on_cuda(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None, dropout_p: float = 0.0,
                     is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """`scaled_dot_product_attention` through the kernel a GPU picks for bf16: flash attention without a
    mask (grouped heads read in place, as torch's sdpa documents for `enable_gqa`), memory-efficient
    attention with one; neither keeps the `[L, L]` scores. On `meta`, sdpa takes
    the math path, which materialises them in fp32 (3.5 GiB at 32 x 1,024 prompt tokens); these two
    ops have meta functions of their own, with the outputs (and log-sum-exp) the CUDA kernels save."""
    if attn_mask is None:  # flash attention reads grouped key/value heads as they are (GQA)
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                  False, scale=scale)[0]
    if enable_gqa and key.shape[1] != query.shape[1]:  # the memory-efficient kernel needs them repeated
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask.expand(
        query.shape[0], query.shape[1], query.shape[2], key.shape[2]), query.requires_grad, dropout_p, is_causal,
        scale=scale)[0]


@contextlib.contextmanager
def _cuda_attention_kernels():
    """Route sdpa to `_sdpa_as_on_cuda` while the trace runs."""
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _sdpa_as_on_cuda
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


class TracedOffload(ActivationOffload):
    """The offload hooks with their host buffers counted as host memory by the tracker (meta tensors
    have no data to copy to a real host buffer)."""

    def __init__(self, tracker: LiveBytes) -> None:
        super().__init__(META)
        self.tracker = tracker

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        with self.tracker.host():
            return torch.empty_like(t)

    def to_device(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        return torch.empty_like(host)


@dataclass
class TraceShape:
    prompt_tokens: int
    image_tokens: int
    image_grid: tuple[int, int, int]
    response_tokens: int
    responses: int
    generation_rows: int
    micro_batch: int
    logprob_chunk: int
    decode_steps: int


@dataclass
class Trace:
    """Peak live bytes per phase (fixed included, as the plan's phases are), in GiB."""

    fixed_gib: float
    phases: dict[str, float]
    host_gib: float
    shape: TraceShape
    passes_run: list[str]
    seconds: float
    notes: list[str] = field(default_factory=list)


def trace_step(cfg: RunConfig, config: dict[str, Any], prompt_tokens: int | None = None,
               decode_steps: int = DECODE_STEPS) -> Trace:
    """Trace one step of `cfg` on the model described by `config` (a config.json dict)."""
    t0 = time.perf_counter()
    dims = as_dims(config, cfg.model.path)
    if dims.family not in TRACED_FAMILIES:
        raise ValueError(f"the step trace supports {', '.join(TRACED_FAMILIES)}; {dims.family} is planned only")
    shape = _shape(cfg, dims, prompt_tokens, decode_steps)
    dtype = torch.bfloat16 if cfg.model.dtype == "auto" else getattr(torch, cfg.model.dtype)
    tracker = LiveBytes()
    policy = _meta_policy(cfg, config, dtype, tracker)
    tracker.track_module(policy.model)
    spec = ALGORITHM_SPECS[cfg.algorithm.name]
    previous = os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
    os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"  # its placeholder-count check reads a scalar
    try:
        with tracker, _cuda_attention_kernels():
            optimizer = _primed_optimizer(policy, cfg)
            fixed = tracker.live
            layout = PromptLayout.build(policy, shape)
            with tracker.phase("generation"):
                _trace_generation(policy, cfg, shape, layout)
            with tracker.phase("passes"):
                passes_run = _trace_passes(policy, cfg, shape, layout, spec)
            x = _host_inputs(cfg, shape, spec)  # the step's [N, R] vectors, on the host as in rl_step
            shaping = spec.shape(x)  # the algorithm's token advantages (SRPO's weights)
            with tracker.phase("update"):
                _trace_update(policy, cfg, shape, layout, spec, x, shaping, optimizer, tracker)
    finally:
        if previous is None:
            os.environ.pop("TRANSFORMERS_DISABLE_TORCH_CHECK", None)
        else:
            os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = previous
    phases = {name: rec.peak_bytes / GIB for name, rec in tracker.phases.items()}
    host = max(rec.host_peak_bytes for rec in tracker.phases.values()) / GIB
    return Trace(fixed_gib=fixed / GIB, phases=phases, host_gib=host, shape=shape, passes_run=passes_run,
                 seconds=time.perf_counter() - t0)


def _shape(cfg: RunConfig, dims, prompt_tokens: int | None, decode_steps: int) -> TraceShape:
    prompt, img, _ = prompt_length(cfg, dims, prompt_tokens)
    if img is None:  # data files: the image fills the prompt but for the text the procedural tasks use
        img = max(prompt - TEXT_PROMPT_TOKENS, 1)
    merge = 2
    side_a = max(int(math.sqrt(img)), 1)
    side_b = max(img // side_a, 1)
    n_rows = cfg.rollout.group_size * cfg.rollout.prompts_per_step
    micro_batch = min(cfg.train.micro_batch_size, n_rows)
    return TraceShape(prompt_tokens=prompt, image_tokens=side_a * side_b, image_grid=(1, merge * side_a, merge * side_b),
                      response_tokens=cfg.rollout.max_new_tokens, responses=n_rows,
                      generation_rows=generation_rows(cfg, cfg.rollout.group_size), micro_batch=micro_batch,
                      logprob_chunk=min(logprob_chunk(cfg, dims, "cuda"), micro_batch * cfg.rollout.max_new_tokens),
                      decode_steps=max(1, min(decode_steps, cfg.rollout.max_new_tokens)))


def _meta_policy(cfg: RunConfig, config: dict, dtype: torch.dtype, tracker: LiveBytes) -> PolicyModel:
    base, family = meta_base(config, dtype, cfg.model.load_in_4bit, cfg.model.attn_implementation)
    model_cfg = dataclasses.replace(cfg.model, dtype=str(dtype).removeprefix("torch."))
    offload = TracedOffload(tracker) if cfg.train.offload_activations else None
    return wrap_policy(base, None, family, model_cfg, cfg.lora, META,
                       offload_activations=cfg.train.offload_activations, recompute_chunk=cfg.train.recompute_chunk,
                       offload=offload)


def _primed_optimizer(policy: PolicyModel, cfg: RunConfig) -> torch.optim.Optimizer:
    """The recipe's optimizer (as on CUDA), stepped once on zero gradients: state and grads now exist."""
    name = cfg.optim.optimizer
    if name == "auto":
        name = "paged_adamw8bit"  # what build_optimizer picks on cuda
    if name == "paged_adamw8bit":
        name = "adamw8bit"  # same state bytes; paged state lives in managed memory (module docstring)
    params = policy.trainable_parameters()
    optimizer = build_optimizer(params, dataclasses.replace(cfg.optim, optimizer=name), torch.device("cuda"))
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return optimizer


@dataclass
class PromptLayout:
    """Token ids of one prompt (text, then the image block, then text) and of prompt + response, with the
    mRoPE positions transformers would compute from them (on the host)."""

    prompt_ids: torch.Tensor  # [P] host
    full_ids: torch.Tensor  # [P + R] host
    prompt_positions: torch.Tensor  # [3, 1, P] host
    full_positions: torch.Tensor  # [3, 1, P + R] host
    rope_delta: int
    grid: torch.Tensor  # [1, 3] host
    suppress: list[int]

    @classmethod
    def build(cls, policy: PolicyModel, shape: TraceShape) -> "PromptLayout":
        config = policy.config
        text_id = 100  # any ordinary token: only the image placeholders' places matter
        n_img, p = shape.image_tokens, shape.prompt_tokens
        before = max((p - n_img - 2) // 2, 0)
        ids = [text_id] * before + [config.vision_start_token_id] + [config.image_token_id] * n_img + \
              [config.vision_end_token_id]
        ids += [text_id] * (p - len(ids))
        prompt = torch.tensor(ids[:p])
        full = torch.cat([prompt, torch.full((shape.response_tokens,), text_id)])
        grid = torch.tensor([shape.image_grid])
        inner = policy.hf.model
        positions = {}
        for name, seq in (("prompt", prompt), ("full", full)):
            mm = (seq == config.image_token_id).long()[None]
            pos, delta = inner.get_rope_index(seq[None], mm_token_type_ids=mm, image_grid_thw=grid,
                                              attention_mask=torch.ones_like(seq)[None])
            positions[name] = (pos, int(delta.reshape(-1)[0]))
        return cls(prompt_ids=prompt, full_ids=full, prompt_positions=positions["prompt"][0],
                   full_positions=positions["full"][0], rope_delta=positions["prompt"][1], grid=grid,
                   suppress=vision_token_ids(None, config))


def _vision_kwargs(policy: PolicyModel, grid: torch.Tensor) -> dict[str, Any]:
    """The vision tower's data-dependent inputs, precomputed on the host (transformers.vision_utils):
    index tensors go to the device, the sequence boundaries stay on the host where `.tolist()` reads them."""
    from transformers import vision_utils as vu

    vc = policy.config.vision_config
    out = {"image_position_ids": vu.get_vision_position_ids(grid, vc.spatial_merge_size).to(META),
           "image_cu_seqlens": vu.get_vision_cu_seqlens(grid)}
    if policy.family == "qwen2_5_vl":
        index, cu_window = vu.get_vision_window_index(grid, vc.spatial_merge_size, vc.window_size, vc.patch_size)
        out.update(image_window_index=index.to(META), image_cu_window_seqlens=cu_window)
    return out


def _image_features(policy: PolicyModel, layout: PromptLayout, images: int):
    """The vision tower over `images` copies of the prompt's image, no grad: the merged features."""
    vc = policy.config.vision_config
    grid = layout.grid.repeat(images, 1)
    patches = int(grid.prod(-1).sum())
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    pixels = torch.empty(patches, patch_dim, dtype=torch.float32, device=META)  # the processor's fp32 patches
    with torch.no_grad():
        out = policy.hf.model.get_image_features(pixels, grid, return_dict=True, **_vision_kwargs(policy, grid))
    return out


def _forward(policy: PolicyModel, ids: torch.Tensor, positions: torch.Tensor, features, **kwargs):
    return policy.hf.model(input_ids=ids, position_ids=positions, mm_encoder_outputs={"image": features},
                           return_dict=True, **kwargs)


@torch.no_grad()
def _trace_generation(policy: PolicyModel, cfg: RunConfig, shape: TraceShape, layout: PromptLayout) -> None:
    """One generate call of `generation_rows` rows: prefill, then the last decode steps at full length."""
    rows, p, r = shape.generation_rows, shape.prompt_tokens, shape.response_tokens
    sampler = InverseCdfSampler(cfg.rollout.temperature, suppress=layout.suppress)
    head = policy.hf.lm_head
    with policy.policy(), policy.generation_mode():
        features = _image_features(policy, layout, rows)  # generate runs the tower on every row's image
        ids = layout.prompt_ids[None].expand(rows, -1).to(META)
        out = _forward(policy, ids, layout.prompt_positions.expand(-1, rows, -1).to(META), features, use_cache=True)
        cache = out.past_key_values
        scores = head(out.last_hidden_state[:, -1:]).to(torch.float32)[:, -1]
        del out, features
        token = sampler(ids, scores).argmax(-1)
        del scores
        length = p + r - shape.decode_steps  # the cache as it stands before the last decode steps
        for layer in cache.layers:
            b, heads, _, dim = layer.keys.shape
            layer.keys = torch.empty(b, heads, length, dim, dtype=layer.keys.dtype, device=META)
            layer.values = torch.empty(b, heads, length, dim, dtype=layer.values.dtype, device=META)
        for k in range(shape.decode_steps):
            position = torch.full((3, rows, 1), length + k + layout.rope_delta, dtype=torch.long, device=META)
            out = policy.hf.model(input_ids=token[:, None], position_ids=position, past_key_values=cache,
                                  use_cache=True, return_dict=True)
            scores = head(out.last_hidden_state[:, -1:]).to(torch.float32)[:, -1]
            del out
            token = sampler(token[:, None], scores).argmax(-1)
            del scores
        del cache


def _response_logprobs(policy: PolicyModel, shape: TraceShape, layout: PromptLayout, features,
                       temperature: float, keep_hidden: bool = False):
    m, p, r = shape.micro_batch, shape.prompt_tokens, shape.response_tokens
    ids = layout.full_ids[None].expand(m, -1).to(META)
    hidden = _forward(policy, ids, layout.full_positions.expand(-1, m, -1).to(META), features,
                      use_cache=False).last_hidden_state
    weight, bias = policy.lm_head()
    targets = layout.full_ids[p:][None].expand(m, -1).to(META)
    logp = token_logprobs(response_hidden(hidden, p, r), weight, targets, chunk=shape.logprob_chunk,
                          temperature=temperature, lm_head_bias=bias)
    return (logp, hidden) if keep_hidden else logp


@torch.no_grad()
def _trace_passes(policy: PolicyModel, cfg: RunConfig, shape: TraceShape, layout: PromptLayout, spec) -> list[str]:
    """Each no-grad pass of the algorithm over one micro-batch, then the token shaping on the host."""
    run: list[str] = []
    algo = cfg.algorithm
    old = old_pass_needed(spec, cfg.train.mini_batches)
    needed = old or spec.needs_corrupted or spec.needs_removed(algo) or algo.beta > 0
    batch_features = _micro_batch_features(policy, layout, shape) if needed else None
    with policy.policy():
        if old:
            logp, hidden = _response_logprobs(policy, shape, layout, batch_features, cfg.rollout.temperature, True)
            if spec.needs_focus:  # VGPO: the response hidden states in fp32, then moved to the host
                hidden[:, shape.prompt_tokens:].float()
            del logp, hidden
            run.append("old")
        if spec.needs_corrupted:
            _response_logprobs(policy, shape, layout, _micro_batch_features(policy, layout, shape),
                               cfg.rollout.temperature)
            run.append("corrupted")
        if spec.needs_removed(algo):
            _response_logprobs(policy, shape, layout, batch_features, cfg.rollout.temperature)
            run.append("removed")
    if algo.beta > 0:
        with policy.reference():
            _response_logprobs(policy, shape, layout, batch_features, cfg.rollout.temperature)
        run.append("reference")
    return run


def _micro_batch_features(policy: PolicyModel, layout: PromptLayout, shape: TraceShape):
    """The cached features a micro-batch's forward receives: one image's per row."""
    single = _image_features(policy, layout, 1)
    kind = type(single)
    pooled = tuple(single.pooler_output) * shape.micro_batch
    return kind(pooler_output=pooled)


def _host_inputs(cfg: RunConfig, shape: TraceShape, spec) -> ShapeInputs:
    n, r = shape.responses, shape.response_tokens
    zeros = torch.zeros(n, r)
    passes = PassOutputs(old_logp=zeros.clone(), ref_logp=zeros.clone() if cfg.algorithm.beta > 0 else None,
                         corrupted_logp=zeros.clone() if spec.needs_corrupted else None,
                         removed_logp=zeros.clone() if spec.needs_removed(cfg.algorithm) else None,
                         focus=zeros.clone() if spec.needs_focus else None)
    roles = torch.zeros(n, r, dtype=torch.long)
    roles[:, : r // 4] = 1
    roles[:, r // 4:] = 2
    return ShapeInputs(adv_seq=torch.linspace(-1, 1, n), mask=torch.ones(n, r), roles=roles, passes=passes,
                       group_size=cfg.rollout.group_size, cfg=cfg.algorithm, step=1, total_steps=cfg.train.steps)


def _trace_update(policy: PolicyModel, cfg: RunConfig, shape: TraceShape, layout: PromptLayout, spec,
                  x: ShapeInputs, shaping: Shaping, optimizer: torch.optim.Optimizer, tracker: LiveBytes) -> None:
    """One micro-batch of `policy_update`: forward with grad, the loss, backward, clip, optimizer step."""
    algo = cfg.algorithm
    rows = list(range(shape.micro_batch))
    optimizer.zero_grad(set_to_none=True)
    features = _micro_batch_features(policy, layout, shape)
    with policy.policy():
        logp = _response_logprobs(policy, shape, layout, features, cfg.rollout.temperature)
    mask = x.mask[rows].to(META)
    with tracker.metric_scalars():  # the loss's metrics read scalars; the loss itself does not
        loss, _ = grpo.policy_loss(logp, logp.detach(), shaping.advantages[rows].to(META), mask,
                                   clip_low=algo.clip_low, clip_high=algo.clip_high, dual_clip=algo.dual_clip,
                                   agg=algo.agg, max_len=shape.response_tokens,
                                   token_mask=None if shaping.token_mask is None else shaping.token_mask[rows].to(META),
                                   denominator=float(shape.micro_batch), level=algo.importance_sampling_level,
                                   loss=algo.policy_loss, cispo_max=algo.cispo_max)
        if algo.beta > 0:
            kl = grpo.kl_k3(logp, torch.zeros_like(logp))
            loss = loss + algo.beta * grpo.aggregate(kl, mask, algo.agg, max_len=shape.response_tokens,
                                                     denominator=float(shape.micro_batch))
        if spec.extra_loss is not None:
            extra, _ = spec.extra_loss(logp, rows, x, float(shape.micro_batch * shape.response_tokens))
            loss = loss + extra
    loss.backward()
    del loss, logp
    torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), cfg.optim.max_grad_norm)
    optimizer.step()

