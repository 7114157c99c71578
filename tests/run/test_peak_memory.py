"""`mem/peak_gb` is each step's peak: `reset_peak_memory` starts a new window (CPU: Linux's VmHWM)."""
from __future__ import annotations

import torch

from lite_srpo.run.runtime import peak_memory_gb, reset_peak_memory


def test_a_step_after_a_large_one_reports_its_own_peak():
    reset_peak_memory()
    big = torch.ones(384 * 2**20, dtype=torch.uint8)  # 0.375 GiB, touched
    during = peak_memory_gb()
    del big
    reset_peak_memory()
    after = peak_memory_gb()
    assert after < during - 0.3, (during, after)  # the next step's window starts from what is alive now
