"""`lite-srpo train RECIPE --nproc N`: start the same command under torchrun (one process per GPU).

This only builds and runs the torchrun command line; the ranks themselves join the process group from
the environment torchrun sets (`distributed.init_from_env`), exactly as with a hand-written
`torchrun --nproc-per-node N -m lite_srpo train RECIPE …` or `accelerate launch`.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import torch

from ..config import RunConfig, check_divisible
from ..errors import LiteSrpoError
from .distributed import launched_world_size

log = logging.getLogger(__name__)


def check_nproc(cfg: RunConfig, nproc: int, cuda_devices: int | None = None) -> None:
    """Refuse a process count that cannot work, before any process starts."""
    if nproc < 1:
        raise LiteSrpoError(f"--nproc {nproc}: needs >= 1")
    if launched_world_size() > 1:
        raise LiteSrpoError("--nproc inside torchrun / accelerate launch: the launcher already started the "
                            "processes; drop --nproc")
    devices = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    if devices and nproc > devices:
        raise LiteSrpoError(f"--nproc {nproc}: this machine has {devices} GPU(s); use at most {devices} "
                            "(one process per GPU)")
    check_divisible(cfg.rollout.prompts_per_step, nproc)


def torchrun_command(nproc: int, train_args: list[str], resume: bool = False, quiet: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "lite_srpo", "train", *train_args]
    if resume:
        cmd.append("--resume")
    if quiet:
        cmd.append("--quiet")
    return cmd


def launch_torchrun(cfg: RunConfig, nproc: int, train_args: list[str], resume: bool = False,
                    quiet: bool = False) -> int:
    """Run the torchrun job to its end and return its exit status (non-zero when any rank failed)."""
    check_nproc(cfg, nproc)
    if not torch.cuda.is_available():
        log.info("no GPU: %d processes on the CPU with the gloo backend", nproc)
    cmd = torchrun_command(nproc, train_args, resume, quiet)
    log.info("starting: %s", " ".join(cmd))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))))
    try:
        return subprocess.run(cmd, env=env).returncode
    except KeyboardInterrupt:  # torchrun forwards the signal to the ranks, which checkpoint and exit
        return 130
