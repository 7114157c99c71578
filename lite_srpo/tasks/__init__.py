"""Old import path, kept so reward files written before the layered package still load.

`lite_srpo.tasks` moved to `lite_srpo.data.tasks`; importing it here warns once and re-exports the same objects."""
from __future__ import annotations

import warnings

from lite_srpo.data.tasks import TASKS, Sample, load_benchmark, load_image, load_samples, make_task, write_jsonl

warnings.warn("lite_srpo.tasks moved to lite_srpo.data.tasks; the old path will be removed in a later release",
              DeprecationWarning, stacklevel=2)

__all__ = ["Sample", "TASKS", "load_benchmark", "load_image", "load_samples", "make_task", "write_jsonl"]
