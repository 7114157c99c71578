"""Memory planner: the predicted peak memory of one training step of a recipe, before anything loads.

The peak is the fixed memory (weights by dtype, the LoRA adapter with its gradient and optimizer
state, and on CPU the process itself) plus the largest of three phases of a step: generation (KV
cache, per-step logits), the no-grad scoring passes, and the policy update (checkpointed activations,
one recomputed layer, the streamed lm_head chunk). Starting model: research/anchors.md §5. The model's
dimensions come from `model/dims.py`, each phase's terms from `terms.py`; this module sums the phases,
searches the largest group size and response length that fit, and `report.py` prints the result.

Two devices are modelled: `cuda` predicts `torch.cuda.max_memory_allocated` (bf16 compute) and adds
the CUDA context and allocator slack to decide whether it fits; `cpu` predicts the process's peak
resident set (fp32 compute, the Python/torch/transformers baseline included).
"""
from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

from ...config import RunConfig
from ...errors import ConfigError
from ..dims import ModelDims, as_dims, load_model_dims
from .terms import (GIB, Term, compute_bytes, generation_rows, logprob_chunk, per_rank_config, phase_terms,
                    prompt_length)

CUDA_CONTEXT_GIB = 0.50  # CUDA context + cuBLAS/cuDNN handles: outside max_memory_allocated, inside the card
CUDA_ALLOCATOR_SLACK = 1.07  # reserved / allocated (fragmentation of the caching allocator)


def phase_gib(terms: list[Term], phase: str, live: bool) -> float:
    """A phase's terms summed; with `live` (a card's allocated bytes) the phase's moments count only the
    largest: the update's streamed lm_head chunk is freed before backward recomputes the first decoder
    layer (measured on CPU as allocated bytes, bench/README.md issue 24), the passes' one layer and
    lm_head chunk take turns the same way, and generation's prefill (a short cache, a whole prompt's
    activations) comes before its decode (the full cache) — the step trace shows each
    (`rl/trace_step.py`). CPU RSS keeps freed heap, so there every term counts (the fit of
    bench/memory_scaling)."""
    mine = [t for t in terms if t.phase == phase]
    if not live:
        return sum(t.gib for t in mine)
    moments: dict[str, float] = {}
    for t in mine:
        if t.moment:
            moments[t.moment] = moments.get(t.moment, 0.0) + t.gib
    return sum(t.gib for t in mine if not t.moment) + max(moments.values(), default=0.0)


def sum_phases(terms: list[Term], device: str) -> tuple[float, dict[str, float], str]:
    """Peak = fixed + the largest phase (`host` terms are not on the device)."""
    fixed = sum(t.gib for t in terms if t.phase == "fixed")
    phases = {p: fixed + phase_gib(terms, p, live=device == "cuda") for p in ("generation", "passes", "update")}
    worst = max(phases, key=phases.get)
    return phases[worst], phases, worst


HOST_PROCESS_GIB = 3.0
"""Host RAM a CUDA training process holds besides its pinned buffers: Python, torch with its CUDA
libraries, transformers, the tokenizer and the data (an estimate, not measured here: no GPU)."""
HOST_PINNED_FRACTION = 0.5
"""Pinned (page-locked) memory can be neither swapped nor reclaimed; a plan keeps it under half the RAM
so the OS, its page cache and the rest of the machine keep theirs (a rule of thumb: 18 GiB pinned on a
32 GiB desktop does not fit)."""


def machine_ram_gib() -> float:
    """This machine's RAM (Linux /proc/meminfo; 16 GiB when it cannot be read)."""
    try:
        text = Path("/proc/meminfo").read_text()
        return int(re.search(r"MemTotal:\s+(\d+)", text).group(1)) / 2**20
    except (OSError, AttributeError):
        return 16.0


def host_fits(host_gib: float, host_mem_gib: float | None) -> bool:
    """Whether `host_gib` of pinned buffers fits a machine with `host_mem_gib` of RAM (None: not checked)."""
    if host_mem_gib is None:
        return True
    return host_gib <= HOST_PINNED_FRACTION * host_mem_gib and host_gib + HOST_PROCESS_GIB <= host_mem_gib


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


def plan(cfg: RunConfig, gpu_mem_gib: float = 24.0, model_dims: dict | ModelDims | None = None, *,
         device: str = "cuda", prompt_tokens: int | None = None, ranks: int = 1,
         dense_mask: bool | None = None, host_mem_gib: float | None = None) -> dict:
    """Predicted peak memory of one training step of `cfg` on `device` against a `gpu_mem_gib` budget,
    and, with `host_mem_gib`, of its pinned host buffers against the machine's RAM (`host_fits`): a step
    fits only when both do.

    Returns the breakdown (`terms`), the peak per phase, whether it fits, and the largest group size
    and response length that fit with everything else unchanged. With `ranks` > 1 every figure is per
    rank (per GPU): each holds the model and samples prompts_per_step / ranks prompts x G responses.
    `dense_mask`: None = the [L, L] mask only where it is built (eager attention, padded micro-batches);
    True counts it always (the code before the causal-flag change), for comparisons.
    """
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device {device!r}: choose cuda or cpu")
    if ranks < 1:
        raise ConfigError(f"--nproc {ranks}: needs >= 1")
    per_rank_config(cfg, ranks)  # a clear error when the prompts do not split evenly
    dims = as_dims(model_dims, cfg.model.path) if model_dims is not None else load_model_dims(cfg.model.path)
    prompt, img, prompt_how = prompt_length(cfg, dims, prompt_tokens)
    g, r = cfg.rollout.group_size, cfg.rollout.max_new_tokens
    terms = phase_terms(cfg, dims, device, prompt, g, r, ranks, dense_mask, img)
    peak, phases, worst = sum_phases(terms, device)
    needed = _needed(peak, device)
    local_prompts = cfg.rollout.prompts_per_step // ranks

    def fits_with(group: int, resp: int) -> bool:
        terms_at = phase_terms(cfg, dims, device, prompt, group, resp, ranks, dense_mask, img)
        return _needed(sum_phases(terms_at, device)[0], device) <= gpu_mem_gib

    logits = max(t.gib for t in terms if t.name.startswith("streamed lm_head"))
    host_gib = sum(t.gib for t in terms if t.phase == "host")
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
                  "logprob_chunk": logprob_chunk(cfg, dims, device),
                  "logprob_chunk_setting": cfg.train.logprob_chunk, "load_in_4bit": cfg.model.load_in_4bit,
                  "compute_bytes": compute_bytes(cfg, device),
                  "gradient_checkpointing": cfg.model.gradient_checkpointing,
                  "generation_rows": generation_rows(cfg, g), "generation_rows_setting": cfg.rollout.generation_rows,
                  "offload_activations": cfg.train.offload_activations, "recompute_chunk": cfg.train.recompute_chunk,
                  "attn_implementation": cfg.model.attn_implementation},
        "terms": [asdict(t) for t in terms],
        "phases": phases, "peak_phase": worst, "peak_gib": peak, "logits_gib": logits,
        "host_gib": host_gib, "host_mem_gib": host_mem_gib, "host_fits": host_fits(host_gib, host_mem_gib),
        "full_logits_gib": g * local_prompts * r * dims.vocab * 4 / GIB,
        "needed_gib": needed, "budget_gib": gpu_mem_gib,
        "fits": needed <= gpu_mem_gib and host_fits(host_gib, host_mem_gib),
        "max_group_size": _largest(lambda x: fits_with(x, r), 2, 4096),
        "max_response_tokens": _largest(lambda x: fits_with(g, x), 1, 262_144),
    }
