"""docs/trl.md cannot drift: every lite-srpo recipe key it names is a key of the config schema."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from lite_srpo.config.schema import RunConfig

DOC = Path(__file__).resolve().parent.parent / "docs" / "trl.md"
SECTIONS = ("model", "lora", "data", "rollout", "reward", "algorithm", "optim", "train", "sft")


def schema_keys(cls=RunConfig, prefix: str = "") -> set[str]:
    keys = set()
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        keys.add(name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys |= schema_keys(type(default), name + ".")
    return keys


def test_every_lite_srpo_key_on_the_trl_page_exists():
    text = DOC.read_text(encoding="utf-8")
    named = {m for m in re.findall(r"`([a-z_]+(?:\.[a-z0-9_*]+)+)", text) if m.split(".")[0] in SECTIONS}
    assert len(named) > 30, named
    known = schema_keys()
    missing = sorted(k for k in named if not k.endswith("*") and k not in known)
    assert not missing, f"docs/trl.md names keys the schema does not have: {missing}"
