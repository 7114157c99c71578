"""`train.logprob_chunk`: resolve `auto` to the rows of one streamed lm_head chunk.

The chunk sets the only term of peak memory that scales with the vocabulary: the update keeps about
`chunk × V` fp32 logits four times over in backward (recomputed logits, softmax grad, gather grad, the
sum; +½ for the bf16 copy), i.e. 2.3 GiB at 1,024 rows over Qwen's 152k vocabulary. That is more than
the whole 4-bit 3B model's language layers, for no speed gain measured on CPU (bench/README.md:
chunk 256 ran as fast as 1,024). So `auto` sizes the chunk against the model's own weights:

    rows = AUTO_WEIGHT_FRACTION × weight_bytes / (V × 4 B × copies + H × compute_bytes × 2)

rounded down to a power of two and clamped to [AUTO_MIN_CHUNK, AUTO_MAX_CHUNK]: the logits term of the
update stays at most a quarter of the (quantised) weights, and never below 128 rows, so that each chunk
is still one large matmul. Measured on CPU (`python -m bench.logprob_chunk_speed`: one thread,
V = 151,936, H = 256, 1,024 tokens, fp32; forward + backward seconds, two runs on a shared machine):
chunk 1024: 8.6 and 5.6; 512: 5.7 and 4.7; 256: 3.8 and 4.2; 128: 4.0 and 5.2; 64: 4.4 and 4.7.
Big chunks are slower (their [chunk, V] buffers fall out of cache); from 64 to 256 rows the
differences are within the noise. In a whole step (bench/results/vs_trl_ablate_g8_r512.json) the
update took 18.1 s at 128 rows against 29.2 s at 1,024. Every user of the setting (trainer, SFT warm-up, planner) calls
`resolved_logprob_chunk` with the same weight estimate, so `lite-srpo plan` reports the chunk that
training will use.
"""
from __future__ import annotations

import logging
import math
from typing import Any

from .dims import dims_from_config

log = logging.getLogger(__name__)

AUTO = "auto"
AUTO_WEIGHT_FRACTION = 0.25  # the update's logits term may be at most this share of the weights
AUTO_MIN_CHUNK = 128
AUTO_MAX_CHUNK = 4096
# fp32 [chunk, V] buffers alive at once in a frozen lm_head's forward + backward (streaming.py's fused
# path: logits, logsumexp's temporary, the gradient matmul's input; the bf16 path +0.5 for its bf16 logits).
# Measured as allocated bytes on CPU (bench.common.allocated_peak_gib): 3.0 fused in fp32 and bf16,
# against 4.0 for the checkpointed path it replaced (recomputed logits, softmax grad, gather grad, sum).
LOGITS_COPIES_GRAD = {4: 3.0, 2: 3.5}
NF4_DQ_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 + fp32 per 256


def auto_logprob_chunk(vocab: int, hidden: int, compute_bytes: int, budget_bytes: float) -> int:
    """Largest power-of-two chunk whose update-time logits term fits `budget_bytes`, within [128, 4096].

    Per row the update holds `V` fp32 logits `copies` times (3 in fp32, 3.5 with a bf16/fp16 lm_head)
    plus the chunk's hidden row and its gradient."""
    if vocab < 1 or hidden < 1 or compute_bytes not in LOGITS_COPIES_GRAD:
        raise ValueError(f"auto_logprob_chunk: vocab={vocab}, hidden={hidden}, compute_bytes={compute_bytes}")
    per_row = vocab * 4 * LOGITS_COPIES_GRAD[compute_bytes] + hidden * compute_bytes * 2
    rows = budget_bytes / per_row
    chunk = 2 ** math.floor(math.log2(rows)) if rows >= 1 else 1
    return int(min(AUTO_MAX_CHUNK, max(AUTO_MIN_CHUNK, chunk)))


def weight_bytes(dims: Any, load_in_4bit: bool, compute_bytes: int) -> float:
    """Bytes of the frozen weights as loaded: NF4 + double quant for the LLM linears (or compute dtype),
    the embeddings, lm_head, vision tower and norms in the compute dtype (as memory.py's fixed terms)."""
    linear = dims.llm_linear_params * (NF4_DQ_BYTES_PER_PARAM if load_in_4bit else compute_bytes)
    rest = dims.embed_params + dims.lm_head_params + dims.vision_params + dims.other_params
    return float(linear + rest * compute_bytes)


def resolved_logprob_chunk(setting: int | str, dims: Any, load_in_4bit: bool, compute_bytes: int) -> int:
    """The chunk a run uses: an int setting as is; `auto` from the model's vocabulary, hidden size,
    compute dtype and a budget of AUTO_WEIGHT_FRACTION of its weight bytes (see the module docstring)."""
    if setting != AUTO:
        return int(setting)
    budget = AUTO_WEIGHT_FRACTION * weight_bytes(dims, load_in_4bit, compute_bytes)
    return auto_logprob_chunk(dims.vocab, dims.hidden, compute_bytes, budget)


def policy_logprob_chunk(cfg: Any, policy: Any) -> int:
    """`cfg.train.logprob_chunk` as an int for a loaded policy; `auto` is resolved once per policy and logged.

    The dims come from the loaded model's own config, the same numbers `lite-srpo plan` reads from
    config.json, so the trainer and the planner agree on the chunk."""
    setting = cfg.train.logprob_chunk
    if setting != AUTO:
        return int(setting)
    cached = getattr(policy, "_resolved_logprob_chunk", None)
    if cached is not None:
        return cached
    dims = dims_from_config(policy.config.to_dict(), name=cfg.model.path)
    compute_bytes = 4 if policy.dtype.itemsize >= 4 else 2
    chunk = resolved_logprob_chunk(AUTO, dims, cfg.model.load_in_4bit, compute_bytes)
    log.info("train.logprob_chunk: auto -> %d rows (V=%d, H=%d, %d-byte compute; logits term <= %.0f%% of %.2f GiB "
             "of weights)", chunk, dims.vocab, dims.hidden, compute_bytes, 100 * AUTO_WEIGHT_FRACTION,
             weight_bytes(dims, cfg.model.load_in_4bit, compute_bytes) / 2**30)
    try:
        setattr(policy, "_resolved_logprob_chunk", chunk)
    except AttributeError:  # a frozen or slotted policy object: resolve again next time (cheap)
        pass
    return chunk
