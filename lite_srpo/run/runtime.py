"""What keeps a training process safe around its steps: graceful signals, seeding, memory readings, and the
state snapshot an out-of-memory retry restores so that no update is applied twice."""
from __future__ import annotations

import gc
import logging
import resource
import signal

import numpy as np
import torch

from . import checkpoint as ckpt

log = logging.getLogger("lite_srpo.rl.train")


class GracefulStop:
    """First SIGINT/SIGTERM: finish the step, checkpoint, exit 0. Second: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "GracefulStop":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a UI worker)
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt("second signal: stopping now; the last checkpoint is intact")
        self.requested = True
        log.warning("stop requested (%s): finishing this step, then saving a checkpoint", signal.Signals(signum).name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def sampling_seed(seed: int, step: int, prompt_index: int) -> int:
    """The sampler's seed for the generate call that starts at the step's `prompt_index`-th prompt."""
    return int(np.random.SeedSequence([seed, step, prompt_index]).generate_state(1, np.uint64)[0] >> 1)


def row_sampling_seed(seed: int, step: int, prompt_index: int, sample: int) -> int:
    """The sampler's seed for one response (rollout.generation_rows > 0): sample `sample` of the step's
    `prompt_index`-th prompt, whichever generate call decodes it."""
    return int(np.random.SeedSequence([seed, step, prompt_index, sample]).generate_state(1, np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_determinism(on: bool) -> None:
    """train.deterministic: the settings a GPU run needs to repeat bit for bit (seeds alone do not).

    - `torch.use_deterministic_algorithms(True)`: ops with atomics-based CUDA kernels (index_add, scatter
      adds, the memory-efficient SDPA backward) switch to deterministic ones or raise, naming the op;
    - `CUBLAS_WORKSPACE_CONFIG=:4096:8`: cuBLAS (and bitsandbytes' 4-bit matmuls, which dequantize and
      call it) then picks the same reduction order every time; it must be set before the first cuBLAS call,
      which is why the training entry point calls this before loading the model;
    - cuDNN: no benchmark autotuning (it may pick another kernel per run), deterministic kernels;
    - matmuls in true fp32 (no TF32) and bf16 GEMMs without reduced-precision reductions.
    lite-srpo's own sampler draws its uniforms from CPU generators (`sampling.py`), so the tokens depend
    only on the logits. Off restores torch's defaults for the first two."""
    import os

    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.benchmark = False if on else torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic = on
    torch.backends.cuda.matmul.allow_tf32 = False if on else torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False if on else torch.backends.cudnn.allow_tf32
    if on:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False


def reset_peak_memory() -> None:
    """Start a new peak window, so that `mem/peak_gb` is this step's peak, not the process's lifetime one
    (which would hide a later step's growth behind step 1's rollout). On CUDA the allocator's peak; on
    Linux the peak RSS (VmHWM), which writing 5 to /proc/self/clear_refs resets (Linux >= 4.0)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not permitted: the lifetime peak is what remains
        pass


def _vm_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_memory_gb() -> float:
    """Peak since the last `reset_peak_memory`: CUDA bytes allocated, or the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    kib = _vm_hwm_kib()
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux; never reset
    return kib / 2**20


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _cpu_copy(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def state_before_step(params: list[torch.nn.Parameter], optimizer, scheduler) -> dict:
    """Adapter, optimizer, scheduler and RNG state (on the CPU), so a retried step starts from scratch."""
    return {"params": [p.detach().to("cpu", copy=True) for p in params],
            "optimizer": _cpu_copy(optimizer.state_dict()), "scheduler": _cpu_copy(scheduler.state_dict()),
            "rng": ckpt.rng_state()}


def restore_before_step(params: list[torch.nn.Parameter], optimizer, scheduler, state: dict) -> None:
    with torch.no_grad():
        for p, saved in zip(params, state["params"]):
            p.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    ckpt.set_rng_state(state["rng"])
