"""Process-group plumbing for data-parallel runs: torch.distributed, launched by torchrun or accelerate.

A run under `torchrun --nproc-per-node N` (or `accelerate launch`, or `lite-srpo train --nproc N`) has N
ranks, each a full copy of the frozen base and its LoRA adapter. NCCL is used on CUDA and gloo on CPU.
Without those launchers there is one process and every function here is a no-op, so the training loop
has a single code path.

Failures stay in step: every collective starts with a small status all-reduce (`sync`). A rank that
fails calls `report_failure` instead of its next collective; that call meets the other ranks' next
`sync`, so every rank learns at the same point which rank failed and why, and raises one clear error
(or, when every failure is an out-of-memory error, retries the step together with halved batches).
A rank that dies outright closes its sockets: the others' collective fails and says so, and torchrun
stops the whole job naming the rank.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import LiteSrpoError

log = logging.getLogger(__name__)

OK, OOM, ERROR = 0, 1, 2
DEFAULT_TIMEOUT_S = 1800


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the job; `world_size == 1` is a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


class RankFailure(LiteSrpoError):
    """One or more ranks failed during a step; every rank raises this with the same text."""

    def __init__(self, codes: list[int], messages: list[str | None]):
        self.codes, self.messages = codes, messages
        by_message: dict[str, list[int]] = {}
        for r, c in enumerate(codes):
            if c != OK:
                by_message.setdefault(messages[r] or "failed", []).append(r)
        super().__init__("; ".join(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} failed: {text}"
                                   for text, ranks in by_message.items()))

    @property
    def only_oom(self) -> bool:
        """Every failing rank ran out of memory: the ranks can retry the step together."""
        return all(c in (OK, OOM) for c in self.codes) and OOM in self.codes

    @property
    def failed_ranks(self) -> list[int]:
        return [r for r, c in enumerate(self.codes) if c != OK]


class RankLost(LiteSrpoError):
    """A collective failed: another rank died or hung past the timeout."""


def launched_world_size() -> int:
    """WORLD_SIZE as set by torchrun / accelerate launch; 1 without a launcher."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise LiteSrpoError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> DistContext:
    """Join the process group torchrun / accelerate described in the environment (env://)."""
    world = launched_world_size()
    if world <= 1:
        return SINGLE
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            if local >= count:
                raise LiteSrpoError(f"rank {rank} wants cuda:{local} but this node has {count} GPU(s): start at most "
                                    f"{count} processes per node (--nproc-per-node / --nproc)")
            torch.cuda.set_device(local)
            backend = "nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return DistContext(rank=rank, world_size=world, local_rank=local)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - a dead peer can make teardown fail; nothing is left to save
            log.debug("destroy_process_group: %s", exc)


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _status(ctx: DistContext, code: int, stop: bool, message: str | None) -> bool:
    table = torch.zeros(ctx.world_size, 2, dtype=torch.int64, device=_comm_device())
    table[ctx.rank, 0] = code
    table[ctx.rank, 1] = int(stop)
    try:
        dist.all_reduce(table)
        codes = [int(c) for c in table[:, 0].tolist()]
        messages: list[str | None] = [None] * ctx.world_size
        if any(codes):
            dist.all_gather_object(messages, message)
    except Exception as exc:  # noqa: BLE001 - gloo/NCCL raise RuntimeError subclasses when a peer is gone
        raise RankLost(f"rank {ctx.rank}: lost contact with the other ranks ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); another rank died or "
                       "hung: see its log") from None
    if any(codes):
        raise RankFailure(codes, messages)
    return bool(table[:, 1].any())


def sync(ctx: DistContext, stop: bool = False) -> bool:
    """A barrier that also agrees on stopping: True when any rank asked to stop (a signal)."""
    if not ctx.enabled:
        return stop
    return _status(ctx, OK, stop, None)


def report_failure(ctx: DistContext, exc: BaseException) -> BaseException:
    """Tell every rank that this one failed (in place of its next collective); returns the error to raise.

    `exc` itself with one process, or when it already came from the ranks' protocol (reported once)."""
    if not ctx.enabled or isinstance(exc, (RankFailure, RankLost)):
        return exc
    from .runtime import is_oom

    code = OOM if is_oom(exc) else ERROR
    text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, LiteSrpoError) else str(exc)
    try:
        _status(ctx, code, False, text.splitlines()[0] if text else type(exc).__name__)
    except (RankFailure, RankLost) as failure:
        return failure
    return RankFailure([code if r == ctx.rank else OK for r in range(ctx.world_size)],
                       [text if r == ctx.rank else None for r in range(ctx.world_size)])


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (pickled; for small CPU tensors and plain data)."""
    if not ctx.enabled:
        return [obj]
    sync(ctx)
    out: list[Any] = [None] * ctx.world_size
    try:
        dist.all_gather_object(out, obj)
    except Exception as exc:  # noqa: BLE001
        raise RankLost(f"rank {ctx.rank}: all_gather failed ({type(exc).__name__}: {exc})") from None
    return out


def all_reduce_sum(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks in place (on the backend's device) and return it."""
    if not ctx.enabled:
        return tensor
    sync(ctx)
    device = _comm_device()
    moved = tensor.to(device)
    try:
        dist.all_reduce(moved)
    except Exception as exc:  # noqa: BLE001
        raise RankLost(f"rank {ctx.rank}: all_reduce failed ({type(exc).__name__}: {exc})") from None
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor
