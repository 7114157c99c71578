"""Per-token log-probs, entropies and KLs from final hidden states, streamed through the lm_head.

The `[tokens × vocab]` logits are the largest tensor of an RL step (DESIGN.md §3, research/anchors.md
§5): a 2048-token response over Qwen's 151,936-token vocabulary is 1.2 GB of fp32 logits, doubled
again by backward. Here the hidden states are flattened to rows and sent through the lm_head `chunk`
rows at a time; each chunk keeps only one float per row (log-prob, entropy or KL). With gradients on,
each chunk runs under `torch.utils.checkpoint`, so backward recomputes that chunk's logits instead of
keeping them. Peak extra memory is therefore a few `chunk × V` buffers, whatever N and T are.

`token_logprobs` with grad does better than recompute (Liger's fused linear cross-entropy idea): the
gradient of each log-prob with respect to its hidden state, `(onehot(target) − softmax) · W / T`, is
computed in the forward while the chunk's logits exist, and kept (`[tokens, H]`, like the hidden states
themselves); backward only scales it by the incoming gradient. That is two `[c, H] × [H, V]` matmuls
per chunk instead of three (forward, recompute, backward). It applies when the lm_head weight and bias
are frozen, as with LoRA; otherwise the checkpointed path runs.

Precision: logits are fp32 before any softmax. When the lm_head weight is bf16/fp16 (as in a 4-bit or
bf16 model), the matmul runs in the weight's dtype (as the model's own lm_head would; on GPU it
accumulates in fp32) and its output is upcast, because upcasting the weight would cost a `V × H` fp32
copy per chunk. With an fp32 weight, half-precision hidden states are upcast chunk by chunk.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

_HALF = (torch.float16, torch.bfloat16)
FUSED = True
"""Process-wide switch for the fused gradient of a frozen lm_head, for benchmarks that measure the
checkpointed path it replaces (bench/logprob_chunk_speed.py --paths)."""


def _check(hidden: torch.Tensor, weight: torch.Tensor, chunk: int, temperature: float) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [N, T, H]; got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"lm_head_weight must be [V, H={hidden.shape[2]}]; got shape {tuple(weight.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Tempered logits of one chunk, `[c, V]`, in fp32 (fp64 if the weight is fp64)."""
    out_dtype = torch.promote_types(weight.dtype, torch.float32)
    logits = (h.to(weight.dtype) @ weight.T).to(out_dtype)  # [c, V]
    # In place: neither op's backward needs the values, and each copy would be another [c, V] buffer.
    if bias is not None:
        logits.add_(bias.to(out_dtype))
    if temperature != 1.0:
        logits.div_(temperature)
    return logits


def _logp_chunk(h, targets, weight, bias, temperature):
    logits = _logits(h, weight, bias, temperature)  # [c, V]
    picked = logits.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)  # [c]
    return (picked - torch.logsumexp(logits, dim=-1),)


def _logp_entropy_chunk(h, targets, weight, bias, temperature):
    logits = _logits(h, weight, bias, temperature)  # [c, V]
    logz = torch.logsumexp(logits, dim=-1)  # [c]
    picked = logits.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)  # [c]
    probs = torch.softmax(logits, dim=-1)  # [c, V]
    entropy = logz - (probs * logits).sum(dim=-1)  # H = logZ - E_p[logit]
    return picked - logz, entropy


def _kl_chunk(h_p, h_q, weight, bias, temperature):
    lp = torch.log_softmax(_logits(h_p, weight, bias, temperature), dim=-1)  # [c, V]
    lq = torch.log_softmax(_logits(h_q, weight, bias, temperature), dim=-1)  # [c, V]
    return ((lp.exp() * (lp - lq)).sum(dim=-1),)


def _stream(fn: Callable, rows: tuple[torch.Tensor, ...], shared: tuple, chunk: int, n_out: int,
            out_dtype: torch.dtype) -> list[torch.Tensor]:
    """Apply `fn(*row_chunks, *shared)` chunk by chunk over the first dim of `rows`; concatenate."""
    m = rows[0].shape[0]
    if m == 0:
        return [torch.zeros(0, dtype=out_dtype, device=rows[0].device) for _ in range(n_out)]
    tensors = [t for t in (*rows, *shared) if isinstance(t, torch.Tensor)]
    with_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    outs = []
    # split() gives one autograd node for all chunks, so backward assembles the hidden grad in one go.
    for pieces in zip(*(r.split(chunk) for r in rows)):
        if with_grad:
            # No randomness inside fn, so the RNG state need not be stashed for the recompute.
            outs.append(checkpoint(fn, *pieces, *shared, use_reentrant=False, preserve_rng_state=False))
        else:
            outs.append(fn(*pieces, *shared))
    return [torch.cat(col) for col in zip(*outs)]


class _FusedTokenLogprobs(torch.autograd.Function):
    """Target log-probs `[M]` of hidden rows `[M, H]`, with d logp / d h computed chunk by chunk in the
    forward (frozen weight and bias), so backward is one broadcast multiply."""

    @staticmethod
    def forward(ctx, rows, targets, weight, bias, temperature, chunk):  # noqa: ANN001 - autograd signature
        out_dtype = torch.promote_types(weight.dtype, torch.float32)
        logp = torch.empty(rows.shape[0], dtype=out_dtype, device=rows.device)
        grad = torch.empty_like(rows)
        for start in range(0, rows.shape[0], chunk):
            h, t = rows[start:start + chunk], targets[start:start + chunk].clamp(min=0)
            logits = _logits(h, weight, bias, temperature)  # [c, V]
            logz = torch.logsumexp(logits, dim=-1)  # [c]
            logp[start:start + chunk] = logits.gather(1, t.unsqueeze(1)).squeeze(1) - logz
            probs = logits.sub_(logz.unsqueeze(1)).exp_()  # softmax, in the logits' buffer
            probs.scatter_add_(1, t.unsqueeze(1), torch.full_like(logz, -1.0).unsqueeze(1))  # p − onehot
            g = probs.to(weight.dtype) @ weight  # [c, H]
            grad[start:start + chunk] = g.neg_().div_(temperature).to(rows.dtype)
        ctx.save_for_backward(grad)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):  # noqa: ANN001
        (grad,) = ctx.saved_tensors
        return grad * grad_logp.to(grad.dtype).unsqueeze(1), None, None, None, None, None


def _fusable(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (FUSED and torch.is_grad_enabled() and rows.requires_grad and not weight.requires_grad
            and (bias is None or not bias.requires_grad))


def _rows(hidden: torch.Tensor) -> torch.Tensor:
    return hidden.reshape(-1, hidden.shape[-1])  # [N*T, H]; copies only if hidden is a strided slice


def _targets(hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if tuple(targets.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"targets must be [N, T] = {tuple(hidden.shape[:2])}; got {tuple(targets.shape)}")
    return targets.reshape(-1).long()


def token_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024,
                   temperature: float = 1.0, lm_head_bias: torch.Tensor | None = None) -> torch.Tensor:
    """log softmax((h·Wᵀ + b)/temperature)[target] for every position, `[N, T]` fp32.

    Works with and without grad; never allocates `N·T·V`. A negative target (an ignore index such
    as -100) gets log-prob 0 and no gradient.
    """
    _check(hidden, lm_head_weight, chunk, temperature)
    n, t = hidden.shape[:2]
    tgt = _targets(hidden, targets)  # [N*T]
    out_dtype = torch.promote_types(lm_head_weight.dtype, torch.float32)
    rows = _rows(hidden)
    if _fusable(rows, lm_head_weight, lm_head_bias) and rows.shape[0] > 0:
        logp = _FusedTokenLogprobs.apply(rows, tgt, lm_head_weight, lm_head_bias, temperature, chunk)
    else:
        (logp,) = _stream(_logp_chunk, (rows, tgt), (lm_head_weight, lm_head_bias, temperature), chunk,
                          1, out_dtype)
    logp = torch.where(tgt >= 0, logp, torch.zeros_like(logp))
    return logp.view(n, t)


def token_logprobs_and_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                               chunk: int = 1024, temperature: float = 1.0,
                               lm_head_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(logp[N, T], entropy[N, T])`: target log-probs and the full-vocabulary entropy of the tempered
    distribution at each position, from the same streamed logits. Entropy is kept at ignored targets."""
    _check(hidden, lm_head_weight, chunk, temperature)
    n, t = hidden.shape[:2]
    tgt = _targets(hidden, targets)  # [N*T]
    out_dtype = torch.promote_types(lm_head_weight.dtype, torch.float32)
    logp, entropy = _stream(_logp_entropy_chunk, (_rows(hidden), tgt), (lm_head_weight, lm_head_bias, temperature),
                            chunk, 2, out_dtype)
    logp = torch.where(tgt >= 0, logp, torch.zeros_like(logp))
    return logp.view(n, t), entropy.view(n, t)


def two_pass_kl(hidden_p: torch.Tensor, hidden_q: torch.Tensor, lm_head_weight: torch.Tensor, chunk: int = 1024,
                temperature: float = 1.0, lm_head_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Full-vocabulary KL(p ‖ q) per position, `[N, T]`, where p and q are the tempered next-token
    distributions of two passes (e.g. original vs corrupted image) over the same response positions.

    Meant for no-grad passes; with grad on it is differentiable and checkpointed like the others.
    """
    _check(hidden_p, lm_head_weight, chunk, temperature)
    if hidden_q.shape != hidden_p.shape:
        raise ValueError(f"hidden_p and hidden_q must have the same shape; got {tuple(hidden_p.shape)} "
                         f"and {tuple(hidden_q.shape)}")
    n, t = hidden_p.shape[:2]
    out_dtype = torch.promote_types(lm_head_weight.dtype, torch.float32)
    (kl,) = _stream(_kl_chunk, (_rows(hidden_p), _rows(hidden_q)), (lm_head_weight, lm_head_bias, temperature),
                    chunk, 1, out_dtype)
    return kl.view(n, t)
