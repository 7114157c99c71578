"""How a recipe names a hub dataset: `hf://ORG/NAME[:CONFIG][@SPLIT]` (data.train_file, data.test_file).

The syntax is part of the recipe, so validation checks it before anything loads; `data/hub.py` loads it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import DataError

HUB_PREFIX = "hf://"
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HUB = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?::(?P<config>[^@:/\s]+))?(?:@(?P<split>[^@:/\s]+))?")


@dataclass(frozen=True)
class HubRef:
    """A parsed `hf://` reference; `split` None means the caller's default (train / test)."""

    repo: str
    config: str | None = None
    split: str | None = None


def is_hub_uri(text: str) -> bool:
    return text.startswith(HUB_PREFIX)


def parse_hub_uri(text: str) -> HubRef:
    """`hf://ORG/NAME[:CONFIG][@SPLIT]` → HubRef; anything else raises DataError saying the form."""
    if not is_hub_uri(text):
        raise DataError(f"{text!r}: a hub dataset is written hf://ORG/NAME[:CONFIG][@SPLIT]")
    m = _HUB.fullmatch(text[len(HUB_PREFIX):])
    if m is None:
        raise DataError(f"{text!r}: expected hf://ORG/NAME[:CONFIG][@SPLIT] (e.g. hf://hiyouga/geometry3k@test, "
                        "hf://AI4Math/MathVerse:testmini@testmini)")
    return HubRef(m["repo"], m["config"], m["split"])
