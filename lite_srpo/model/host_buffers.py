"""Host buffers for offloaded activations, kept and reused instead of allocated per saved tensor.

`train.offload_activations` copies every checkpointed layer's input to host memory in the forward and
back in the backward. Allocating a fresh buffer for each copy costs a page-locking `cudaHostAlloc` per
layer per micro-batch on a card (milliseconds each, and it serialises with the GPU), and a fresh
allocation on CPU. The pool keeps the buffers a backward has finished with and hands them out again.

- Buffers are flat byte arrays viewed as the tensor's shape and dtype, so one serves any shape that
  fits: micro-batches of one step differ in length (their prompts are padded to their own longest).
- The pool never holds more buffers than were alive at once: when none fits, one smaller free buffer
  is released before a new one (25 % larger than asked, so a slightly longer micro-batch reuses it) is made.
- On a card the copies run on one side stream (`ActivationOffload.stream`), so a
  buffer's next copy is ordered after its previous one by the stream itself; no host wait is needed.
"""
from __future__ import annotations

import torch

HEADROOM = 1.25


class HostBufferPool:
    """Free host buffers by capacity; `take` a view for a tensor, `give` it back when done."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._free: list[torch.Tensor] = []  # flat uint8 buffers
        self._owner: dict[int, torch.Tensor] = {}  # storage pointer of a view -> its flat buffer
        self.created = 0
        self.reused = 0
        self.released = 0

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised host tensor with `like`'s shape and dtype, from a free buffer when one fits."""
        nbytes = like.numel() * like.element_size()
        fitting = [b for b in self._free if b.numel() >= nbytes]
        if fitting:
            flat = min(fitting, key=lambda b: b.numel())
            self._free.remove(flat)
            self.reused += 1
        else:
            if self._free:  # keep the pool's size: the smallest free buffer makes way
                self._free.remove(min(self._free, key=lambda b: b.numel()))
                self.released += 1
            flat = torch.empty(int(nbytes * HEADROOM) + 1, dtype=torch.uint8, device="cpu", pin_memory=self.pin)
            self.created += 1
        view = flat[:nbytes].view(like.dtype).view(like.shape)
        self._owner[view.untyped_storage().data_ptr()] = flat
        return view

    def give(self, view: torch.Tensor) -> None:
        """Return a view's buffer to the pool (after the copy that read it was issued)."""
        flat = self._owner.pop(view.untyped_storage().data_ptr(), None)
        if flat is not None:
            self._free.append(flat)

    @property
    def free_bytes(self) -> int:
        return sum(b.numel() for b in self._free)
