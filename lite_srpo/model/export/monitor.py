"""Memory during an export: peak resident and anonymous memory per stage, and handing the memory of a
dropped model back to the OS so that each stage's peak is honest."""
from __future__ import annotations

import ctypes
import gc
import resource
import threading
from typing import Callable

import torch


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def anon_rss_gib() -> float | None:
    """Anonymous resident memory now (Linux), i.e. RSS without file-backed (memory-mapped) pages."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


class MemoryMonitor:
    """Peak memory of the export, overall and per stage.

    Peak RSS also counts pages of memory-mapped safetensors files, which the kernel can drop under
    pressure; the anonymous part, sampled every `interval` seconds, is what has to fit in RAM.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.anon_peak: float | None = anon_rss_gib()
        self.stages: dict[str, dict[str, float | None]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = anon_rss_gib()
            if now is not None:
                self.anon_peak = max(self.anon_peak or 0.0, now)

    def __enter__(self) -> "MemoryMonitor":
        if self.anon_peak is not None:
            self._thread = threading.Thread(target=self._sample, name="export-memory", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def snapshot(self) -> dict[str, float | None]:
        now = anon_rss_gib()
        if now is not None:
            self.anon_peak = max(self.anon_peak or 0.0, now)
        return {"rss_gib": peak_rss_gib(), "anon_gib": self.anon_peak}

    def mark(self, stage: str) -> None:
        """Record the peaks reached by the end of `stage` (they only grow, so each stage's own peak shows)."""
        self.stages[stage] = self.snapshot()


GC_MIN_BYTES = 256 * 2**20


def is_large(model: torch.nn.Module) -> bool:
    return sum(p.numel() * p.element_size() for p in model.parameters()) >= GC_MIN_BYTES


def collect(large: bool) -> None:
    """Break the reference cycles that keep dropped weights and checkpoint mmaps alive.

    A full gc costs ~0.5 s once transformers is imported, so tiny models skip it.
    """
    if large:
        gc.collect()
        _malloc_trim()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so the next stage's RSS is honest."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release_later(model: torch.nn.Module) -> Callable[[], None]:
    """Call the returned function after dropping every reference to `model` to give its memory back."""
    large = is_large(model)
    return lambda: collect(large)
