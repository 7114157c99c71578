"""Bytes alive on a device, counted op by op: what a traced step holds, without a GPU.

`LiveBytes` is a `TorchDispatchMode`: every tensor an op returns on the traced device (normally
`meta`, where tensors have shapes and no data) has its storage counted once when first seen, and
uncounted when that storage is freed (`weakref.finalize`), so views and in-place ops add nothing.
That is what `torch.cuda.memory_allocated` would see for the same program, less the caching
allocator's rounding and fragmentation, cuBLAS/attention workspaces and the CUDA context (none of
which exist on `meta`). `peak` is the largest sum seen; `phase(name)` records a phase's own peak the
way `torch.cuda.reset_peak_memory_stats` + `max_memory_allocated` would.

Why not torch's `MemTracker`: it failed on a graph through bitsandbytes' `Linear4bit` ("cannot
register a hook on a tensor that doesn't require gradient"; research/platform.md §7).

Tensors that stand in for host memory (offloaded activations) are created inside `host()`: they are
counted in `host_live` / `host_peak`, not on the device. Scalar reads (`.item()`, `float(t)`) cannot
happen on `meta`; `metric_scalars()` lets them return 1 inside a block whose scalars only feed
metrics (a loss's logged clip fractions, a token count that divides them), and nowhere else.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_SCALAR_READ = torch.ops.aten._local_scalar_dense.default


@dataclass
class PhasePeak:
    """The largest live device (and host stand-in) bytes during a phase, and what was alive when it began."""

    start_bytes: int
    peak_bytes: int
    host_peak_bytes: int = 0


@dataclass
class LiveBytes(TorchDispatchMode):
    """Counts live storages on `device` (see the module docstring)."""

    device: str = "meta"
    live: int = 0
    peak: int = 0
    host_live: int = 0
    host_peak: int = 0
    phases: dict[str, PhasePeak] = field(default_factory=dict)
    _seen: dict[int, bool] = field(default_factory=dict)
    _host: bool = False
    _scalars_one: bool = False
    _open: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        TorchDispatchMode.__init__(self)

    def track(self, t: torch.Tensor, host: bool | None = None) -> None:
        """Count `t`'s storage if it is on the traced device and not yet counted (also for tensors made
        before the mode was entered: the model's weights)."""
        if not isinstance(t, torch.Tensor) or t.device.type != self.device:
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._seen:
            return
        on_host = self._host if host is None else host
        n = storage.nbytes()
        self._seen[key] = on_host
        if on_host:
            self.host_live += n
            self.host_peak = max(self.host_peak, self.host_live)
            for name in self._open:
                self.phases[name].host_peak_bytes = max(self.phases[name].host_peak_bytes, self.host_live)
        else:
            self.live += n
            self.peak = max(self.peak, self.live)
            for name in self._open:
                self.phases[name].peak_bytes = max(self.phases[name].peak_bytes, self.live)
        weakref.finalize(storage, self._freed, key, n, on_host)

    def track_module(self, module: torch.nn.Module) -> None:
        for t in list(module.parameters()) + list(module.buffers()):
            self.track(t)
            quant_state = getattr(t, "quant_state", None)  # bitsandbytes Params4bit: absmax and code
            if quant_state is not None:
                for leaf in _quant_state_tensors(quant_state):
                    self.track(leaf)

    def _freed(self, key: int, n: int, on_host: bool) -> None:
        self._seen.pop(key, None)
        if on_host:
            self.host_live -= n
        else:
            self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _SCALAR_READ and self._scalars_one:
            return 1
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self.track(t)
        return out

    @contextlib.contextmanager
    def _switched_on(self, flag: str) -> Iterator[None]:
        was = getattr(self, flag)
        setattr(self, flag, True)
        try:
            yield
        finally:
            setattr(self, flag, was)

    def host(self) -> contextlib.AbstractContextManager[None]:
        """Tensors created here stand in for host memory (pinned offload buffers)."""
        return self._switched_on("_host")

    def metric_scalars(self) -> contextlib.AbstractContextManager[None]:
        """Scalar reads of traced tensors return 1: only around code whose scalars feed metrics."""
        return self._switched_on("_scalars_one")

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[PhasePeak]:
        """Record the peak of live device bytes while the block runs (phases may nest)."""
        record = PhasePeak(start_bytes=self.live, peak_bytes=self.live, host_peak_bytes=self.host_live)
        self.phases[name] = record
        self._open.append(name)
        try:
            yield record
        finally:
            self._open.remove(name)


def _quant_state_tensors(quant_state: Any) -> list[torch.Tensor]:
    out = [getattr(quant_state, name, None) for name in ("absmax", "code", "offset")]
    nested = getattr(quant_state, "state2", None)
    if nested is not None:
        out += _quant_state_tensors(nested)
    return [t for t in out if isinstance(t, torch.Tensor)]
