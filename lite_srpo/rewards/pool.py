"""Worker processes that run user reward functions with a per-call timeout.

Why not `ProcessPoolExecutor`: it cannot stop one call — a function that never returns keeps its worker
(and the pool's shutdown) forever. Here each worker has its own pipe; a call past its deadline gets its
worker killed (SIGKILL) and a fresh one started, so a hung reward costs `timeout_s`, never the run.
Signals are not used (math-verify style `signal.alarm` timeouts only work on the main thread; the UI runs
code in threads). Workers use the 'spawn' start method: no copy of the parent's CUDA state or threads.
Like any spawn-based code, a script that calls `train()` needs the `if __name__ == "__main__":` guard.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import numbers
import os
import signal
import time
import weakref
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from ..config.user_rewards import RewardLoadError, RewardRef, load_reward

START_TIMEOUT_S = 120.0  # a worker must import the reward modules within this long


@dataclass
class CallResult:
    """One call's score, or None with the reason it failed."""

    value: float | None
    error: str = ""


def _worker_main(conn: Connection, refs: dict[str, RewardRef]) -> None:
    """Load every function once, report ready, then answer (id, name, response, sample) until None."""
    import lite_srpo.data.tasks.base  # noqa: F401 - unpickling a Sample imports it: do so before any call's clock starts

    # Ctrl-C reaches the whole process group; the trainer's first one means "finish the step", so the
    # workers keep scoring (the trainer ends them when it stops).
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    fns = {}
    for name, ref in refs.items():
        try:
            fns[name] = load_reward(ref)
        except RewardLoadError as exc:
            conn.send(("load_error", f"{name}: {exc}"))
            return
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, name, response, sample = msg
        try:
            value = fns[name](response, sample)
            if not isinstance(value, numbers.Real):
                raise TypeError(f"returned {type(value).__name__} {str(value)[:40]!r}, not a number")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"returned {value}, not a finite number")
            reply = (task_id, value, "")
        except BaseException as exc:  # noqa: BLE001 - user code: every failure scores 0 upstream
            reply = (task_id, None, f"{type(exc).__name__}: {str(exc)[:200]}")
        conn.send(reply)


class _Worker:
    def __init__(self, ctx: Any, refs: dict[str, RewardRef]) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, refs), daemon=True, name="lite-srpo-reward")
        self.proc.start()
        child.close()
        self.ready = False
        self.started = time.monotonic()
        self.task: int | None = None
        self.deadline = math.inf

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


def _kill_all(workers: list[_Worker]) -> None:
    for w in workers:
        try:
            w.kill()
        except (OSError, ValueError):
            pass


class RewardPool:
    """`run(calls)` scores `(name, response, sample)` triples in parallel; failures never raise."""

    def __init__(self, refs: dict[str, RewardRef], timeout_s: float, workers: int | None = None) -> None:
        self.refs = dict(refs)
        self.timeout_s = float(timeout_s)
        self.size = max(1, workers or min(4, os.cpu_count() or 1))
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)
        self.restarts = 0
        self._start_failures = 0  # in a row; a worker can die while starting (e.g. Ctrl-C before it ignores it)

    def _fill(self) -> None:
        while len(self._workers) < self.size:
            self._workers.append(_Worker(self._ctx, self.refs))

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self._workers.remove(w)
        self.restarts += 1
        self._fill()

    def run(self, calls: list[tuple[str, str, Any]]) -> list[CallResult]:
        """One result per call, in order. A call past `timeout_s` is killed with its worker."""
        results: list[CallResult | None] = [None] * len(calls)
        pending = deque(range(len(calls)))
        self._fill()
        while pending or any(w.task is not None for w in self._workers):
            for w in self._workers:
                if w.ready and w.task is None and pending:
                    self._dispatch(w, pending, calls, results)
            waiting = [w for w in self._workers if w.task is not None or not w.ready]
            now = time.monotonic()
            limits = [w.deadline if w.ready else w.started + START_TIMEOUT_S for w in waiting]
            for conn in wait([w.conn for w in waiting], timeout=max(0.0, min(limits, default=now) - now)):
                self._receive(next(w for w in self._workers if w.conn is conn), results)
            now = time.monotonic()
            for w in list(self._workers):
                if w.task is not None and now > w.deadline:
                    results[w.task] = CallResult(None, f"timed out after {self.timeout_s:g} s (worker killed)")
                    self._replace(w)
                elif not w.ready and now > w.started + START_TIMEOUT_S:
                    self.close()
                    raise RewardLoadError(f"a reward worker for {', '.join(self.refs)} did not start within "
                                          f"{START_TIMEOUT_S:g} s")
        return [r if r is not None else CallResult(None, "no result") for r in results]

    def _dispatch(self, w: _Worker, pending: deque, calls: list, results: list) -> None:
        index = pending.popleft()
        name, response, sample = calls[index]
        try:
            w.conn.send((index, name, response, sample))
        except OSError:  # the idle worker died (broken pipe): the call goes to its replacement
            pending.appendleft(index)
            self._replace(w)
            return
        except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable sample; nothing was sent
            results[index] = CallResult(None, f"cannot send the call to a worker: {type(exc).__name__}: {exc}")
            return
        w.task, w.deadline = index, time.monotonic() + self.timeout_s

    def _receive(self, w: _Worker, results: list) -> None:
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            w.proc.join(timeout=1)
            if w.task is not None:
                results[w.task] = CallResult(None, f"worker process died (exit code {w.proc.exitcode})")
            elif not w.ready:
                self._start_failures += 1
                if self._start_failures > 3:
                    self.close()
                    raise RewardLoadError(f"reward workers for {', '.join(self.refs)} keep exiting while "
                                          f"starting (exit code {w.proc.exitcode})") from None
            self._replace(w)
            return
        if msg[0] == "ready":
            w.ready, self._start_failures = True, 0
        elif msg[0] == "load_error":
            self.close()
            raise RewardLoadError(f"in a reward worker: {msg[1]}")
        else:
            task_id, value, error = msg
            if task_id == w.task:
                results[task_id] = CallResult(value, error)
                w.task, w.deadline = None, math.inf

    def close(self) -> None:
        """Ask idle workers to exit, kill the rest; the pool restarts on the next `run`."""
        for w in self._workers:
            if w.ready and w.task is None:
                try:
                    w.conn.send(None)
                except (OSError, ValueError):
                    pass
        for w in self._workers:
            w.proc.join(timeout=1 if w.ready and w.task is None else 0)
        _kill_all(self._workers)
        self._workers.clear()
