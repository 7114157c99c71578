"""`lite-srpo train` for the data-parallel tests, with one fault injected on one rank (torchrun runs this).

    torchrun --nproc-per-node 2 tests/rl/dist_worker.py RECIPE [overrides] [--resume]

`LITE_SRPO_TEST_FAULT` picks the fault (no GPU here, so a CUDA out-of-memory error cannot really happen):
- `raise:RANK:STEP`  rank RANK raises a RuntimeError at the start of step STEP;
- `die:RANK:STEP`    rank RANK is killed (SIGKILL) at the start of step STEP;
- `oom:RANK:ROWS`    rank RANK raises torch.OutOfMemoryError from any log-prob forward over more than
                     ROWS rows (a pretend memory limit), so the micro-batch must halve to ROWS.
Everything else is the real code path: the real CLI, process group, collectives and checkpoints.
"""
from __future__ import annotations

import os
import signal
import sys

import torch

from lite_srpo import cli
from lite_srpo.rl import passes, train


def inject(fault: str) -> None:
    kind, rank, value = fault.split(":")
    if int(os.environ["RANK"]) != int(rank):
        return
    if kind in ("raise", "die"):
        real_step = train.rl_step

        def faulty_step(run, step):
            if step == int(value):
                if kind == "die":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected fault on rank {rank} at step {step}")
            return real_step(run, step)

        train.rl_step = faulty_step
    elif kind == "oom":
        real_logprobs = passes.rows_logprobs

        def limited(policy, batch, rows, *args, **kwargs):
            if len(rows) > int(value):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected: no GPU here)")
            return real_logprobs(policy, batch, rows, *args, **kwargs)

        passes.rows_logprobs = limited
        train.rows_logprobs = limited


if __name__ == "__main__":
    if os.environ.get("LITE_SRPO_TEST_FAULT"):
        inject(os.environ["LITE_SRPO_TEST_FAULT"])
    sys.exit(cli.main(["train", *sys.argv[1:]]))
