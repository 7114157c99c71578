"""Old import path of `Sample` (`from lite_srpo.tasks.base import Sample`, as README showed before the
layered package): the same class as `lite_srpo.data.tasks.base.Sample`."""
from __future__ import annotations

from lite_srpo.data.tasks.base import Sample

__all__ = ["Sample"]
