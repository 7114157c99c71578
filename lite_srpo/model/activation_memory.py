"""Long responses on one card: offloaded checkpoint inputs, chunked MLP recompute, causal-only attention.

Three update-time memory savers, all off by default (`train.offload_activations`, `train.recompute_chunk`):

- Offload. Under gradient checkpointing each decoder layer keeps only its input hidden states
  (`[tokens, H]`) until backward, so the update holds `layers × tokens × H` bytes of them. With offload
  on, the checkpoint function of every checkpointed layer runs inside `saved_tensors_hooks` that copy
  that input to (pinned, on CUDA) host memory in the forward and back to the device when backward
  recomputes the layer: about one layer's worth stays on the device. The host buffers are pooled and
  reused across micro-batches and steps (`host_buffers.py`); on a card both copies run on a side stream,
  so the forward's copies overlap the next layers' compute. Only the layer input goes through
  the hooks: non-reentrant checkpointing saves its inputs before it installs its own hooks, and the
  layer's other arguments (rotary tables, mask) are shared by every layer, so they stay where they are.
- Chunked MLP recompute. The MLP's `[tokens, I]` intermediates (gate, up, their product; I ≈ 4-5 H) are
  the largest tensors a layer's recompute makes. With `recompute_chunk = c` the MLP runs over `c`
  tokens at a time, each chunk checkpointed, so backward rebuilds one chunk's intermediates at a time.
  Without grad (the scoring passes, the prompt's prefill) the chunks' outputs go straight into one
  output tensor, so those passes hold one chunk's intermediates too. The attention
  projections (q, k, v, o with their LoRA adapters) can run the same way (`attention=True`), but that
  was measured to save nothing: at 4,096 tokens the update's peak was 0.709 GiB with them chunked
  against 0.693 GiB with the MLP alone, for 8 % more time (bench/README.md, issue 24). What attention
  needs (q, k, v and its output for the whole sequence) cannot be chunked, and the projections'
  temporaries are H-wide, against the MLP's 4I. So `train.recompute_chunk` chunks the MLPs only.
- Causal-only attention (`causal_inputs`): a micro-batch with no padding, or padding only after each
  row's last token, needs no `[L, L]` mask under SDPA's causal flag (dropped when either feature is on;
  with no padding at all transformers drops it anyway).

Both patches are installed once on the model (`install`), because the backward recompute must run the
same code as the forward even after the update's context has exited.
"""
from __future__ import annotations

import logging
import re
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from .host_buffers import HostBufferPool

log = logging.getLogger(__name__)

MLP_NAME = re.compile(r".*(language_model|text_model)\.layers\.\d+\.mlp$")
ATTENTION_PROJ_NAME = re.compile(r".*(language_model|text_model)\.layers\.\d+\.self_attn\.[qkvo]_proj$")


@dataclass
class OffloadStats:
    """What the pack/unpack hooks saw: bytes moved off the device, bytes left on it, and the largest
    amount brought back and alive at once during backward (the device cost of offloading)."""

    moved_bytes: int = 0
    kept_bytes: int = 0
    packed: int = 0
    resident_bytes: int = 0
    peak_resident_bytes: int = 0
    shapes: list[tuple[int, ...]] = field(default_factory=list)

    def _unpacked(self, t: torch.Tensor) -> torch.Tensor:
        n = t.numel() * t.element_size()
        self.resident_bytes += n
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        weakref.finalize(t, self._freed, n)
        return t

    def _freed(self, n: int) -> None:
        self.resident_bytes -= n


class ActivationOffload:
    """The saved-tensor hooks. `move=False` leaves every tensor where it is and only counts it (what the
    update keeps on the device without offload); `move=True` copies it to host memory."""

    def __init__(self, device: torch.device, move: bool = True):
        self.device = device
        self.move = move
        self.pin = device.type == "cuda" and torch.cuda.is_available()
        self.stats = OffloadStats()
        self.pool = HostBufferPool(self.pin)
        self.stream = torch.cuda.Stream(device) if self.pin else None
        """On a card both copies run on this side stream: the forward's copy out overlaps the next layers'
        compute, and buffer reuse is ordered by the stream (host_buffers.py)."""

    def pack(self, t: torch.Tensor):
        n = t.numel() * t.element_size()
        self.stats.packed += 1
        self.stats.shapes.append(tuple(t.shape))
        if not self.move:
            self.stats.kept_bytes += n
            return t
        host = self.to_host(t)
        self.stats.moved_bytes += n
        return t.device, host

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return self.stats._unpacked(self.to_device(host, device))

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of `t` in a pooled buffer (pinned on CUDA, where the copy runs on the side stream
        after the compute that made `t`, and `t`'s memory is kept from reuse until the copy has read it)."""
        host = self.pool.take(t)
        if self.stream is None:
            host.copy_(t)
            return host
        self.stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(self.stream)
        return host

    def to_device(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`host` back on `device`, as a fresh tensor (`.to()` onto the same device would alias the host
        buffer, and a fresh tensor keeps the counting honest); the host buffer goes back to the pool."""
        if device.type == "cpu":
            back = host.clone()
        elif self.stream is None:
            back = host.to(device)
        else:
            back = torch.empty(host.shape, dtype=host.dtype, device=device)
            self.stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(self.stream):
                back.copy_(host, non_blocking=True)
            torch.cuda.current_stream(device).wait_stream(self.stream)
            back.record_stream(self.stream)
        self.pool.give(host)
        return back

    def checkpoint_fn(self) -> Callable:
        """A replacement for a layer's `_gradient_checkpointing_func`: the same non-reentrant checkpoint,
        with this object's hooks around it so that the inputs it saves go through them."""
        def offloaded_checkpoint(function, *args, **kwargs):
            kwargs.setdefault("use_reentrant", False)
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                return checkpoint(function, *args, **kwargs)

        return offloaded_checkpoint


def checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules that transformers checkpoints (its GradientCheckpointingLayer with checkpointing on)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def install_offload(model: torch.nn.Module, offload: ActivationOffload) -> int:
    """Point every checkpointed layer at the offloading checkpoint; returns how many. Call again after
    checkpointing is re-enabled (transformers resets the function)."""
    layers = checkpointed_layers(model)
    fn = offload.checkpoint_fn()
    for m in layers:
        m._gradient_checkpointing_func = fn
    return len(layers)


def chunked_mlp_forward(forward: Callable, chunk: int) -> Callable:
    """`forward` over `chunk` tokens at a time: each chunk checkpointed when grad is on (backward rebuilds
    one chunk's intermediates at a time); without grad (scoring passes, prefill) each chunk's output is
    written into one preallocated output, so only one chunk's intermediates ever exist. Inputs of at most
    `chunk` tokens (every decode step) take the plain forward."""
    def forward_in_chunks(x: torch.Tensor, *args, **kwargs):
        if args or kwargs or x.dim() < 2 or x[..., 0].numel() <= chunk:
            return forward(x, *args, **kwargs)
        rows = x.reshape(-1, x.shape[-1])
        if torch.is_grad_enabled():
            out = torch.cat([checkpoint(forward, piece, use_reentrant=False) for piece in rows.split(chunk)])
        else:
            out = None
            for start in range(0, rows.shape[0], chunk):
                piece = forward(rows[start:start + chunk])
                if out is None:
                    out = piece.new_empty((rows.shape[0], piece.shape[-1]))
                out[start:start + piece.shape[0]] = piece
        return out.view(*x.shape[:-1], out.shape[-1])

    forward_in_chunks.lite_srpo_chunk = chunk  # type: ignore[attr-defined]
    return forward_in_chunks


def chunk_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The language model's decoder MLPs and its q/k/v/o projections (with their LoRA adapters: peft
    wraps the projection, so the wrapper is the matched module)."""
    return [(name, m) for name, m in model.named_modules()
            if MLP_NAME.match(name) or ATTENTION_PROJ_NAME.match(name)]


def install_chunked_mlp(model: torch.nn.Module, chunk: int, attention: bool = False) -> int:
    """Wrap every language-model decoder MLP's forward, and the attention projections' with `attention`,
    so that with grad on they run `chunk` tokens at a time (installed once; calling again re-chunks, and
    `attention=False` puts the projections' own forward back). Returns how many modules are chunked."""
    count = 0
    for name, m in chunk_modules(model):
        original = getattr(m.forward, "lite_srpo_original", m.forward)
        if ATTENTION_PROJ_NAME.match(name) and not attention:
            m.forward = original
            continue
        wrapped = chunked_mlp_forward(original, chunk)
        wrapped.lite_srpo_original = original  # type: ignore[attr-defined]
        m.forward = wrapped
        count += 1
    return count


def attention_padding(mask: torch.Tensor | None) -> str:
    """"none" (every position attends), "trailing" (each row: real tokens, then only padding) or
    "inner" (padding before a real token: left padding, or a hole), for a `[B, L]` 0/1 mask."""
    if mask is None or bool(mask.all()):
        return "none"
    m = mask.bool()
    # a row is trailing-only when its mask never goes 0 -> 1
    rises = (~m[:, :-1]) & m[:, 1:]
    return "inner" if bool(rises.any()) or not bool(m[:, 0].all()) else "trailing"


_NOTED: list[bool] = []


def causal_inputs(inputs: dict, attn_implementation: str, drop_trailing: bool) -> dict:
    """With `drop_trailing` (the long-response mode), drop the `[B, L]` attention mask when SDPA's causal
    flag gives the same result for every real token: no padding, or padding only after each row's last
    real token (real tokens never attend to it, and every loss masks it out). Without padding
    transformers already skips the mask itself (`_ignore_causal_mask_sdpa`), so the default path keeps
    passing it unchanged. Otherwise the mask stays and transformers builds a `[B, 1, L, L]` one: that is
    noted once per process, with its size (the default path then stops looking)."""
    mask = inputs.get("attention_mask")
    if mask is None or attn_implementation != "sdpa" or (_NOTED and not drop_trailing):
        return inputs
    kind = attention_padding(mask)
    if kind == "none" and not drop_trailing:
        return inputs
    if drop_trailing and kind in ("none", "trailing"):
        return {k: v for k, v in inputs.items() if k != "attention_mask"}
    if not _NOTED:
        b, length = mask.shape
        log.info("padded micro-batch (%s padding, %d x %d tokens): attention builds a [%d, 1, %d, %d] mask "
                 "(%.1f MiB)", kind, b, length, b, length, length, b * length * length / 2**20)
        _NOTED.append(True)
    return inputs
