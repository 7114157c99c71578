"""The one sample type every dataset loader and procedural task produces."""
from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


@dataclass
class Sample:
    """A visual question with a verifiable answer.

    `images` are loaded RGB PIL images (one or more); `source` says where the sample came from
    (``file.jsonl:row 12`` or ``count_shapes/test/7``) so errors and eval tables can name it.
    """

    images: list[Image.Image]
    question: str
    answer: str
    choices: list[str] | None = None
    source: str = ""
    task: str = ""
    meta: dict = field(default_factory=dict)
