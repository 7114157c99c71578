"""Procedural visual-reasoning tasks whose answers can only be read from the image.

Each task draws a small, high-contrast picture with PIL (no fonts) and asks a question whose text is
the same for many different answers, so a model must look. Pictures are drawn at 4x and box-filtered
down, and stay readable at 56x56 (four 28x28 image tokens in the tiny model) and at 112x112.

Determinism and splits: sample ``i`` of ``(task, split, seed)`` comes from its own random stream
``Random("task/split/seed/i")``, so results do not depend on ``n``. Every drawn configuration (all
parameters that fix the image and question) is hashed into a train or test bucket (20 % test) and
re-drawn until it lands in the requested split, so train and test never share an image+question pair
for any seeds.

``meta`` carries the ground-truth perception facts plus short reference ``perception`` and
``reasoning`` texts usable as SFT warm-up traces.
"""
from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from PIL import Image, ImageDraw

from lite_srpo.data.tasks.base import Sample
from lite_srpo.errors import ConfigError

SPLITS = ("train", "test")
TEST_PERCENT = 20
SUPERSAMPLE = 4
MIN_IMAGE_SIZE = 28
MAX_IMAGE_SIZE = 1024
LETTERS = "ABCDEFGH"

RGB = tuple[int, int, int]
COLOURS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "blue": (30, 80, 230),
    "green": (20, 160, 50),
    "orange": (245, 140, 0),
}
WHITE: RGB = (255, 255, 255)
INK: RGB = (40, 40, 40)


# --- count_shapes ----------------------------------------------------------------------------------

COUNT_COLOURS = ("red", "blue", "green")
SHAPES = ("circle", "square", "triangle")
MAX_COUNT = 4  # a 2x2 grid, at most one shape per cell


class Shape(NamedTuple):
    colour: str
    kind: str
    dx: int  # centre jitter, in 1/25 of a cell
    dy: int
    size: int  # 0..2, radius 0.30..0.36 of a cell


class CountParams(NamedTuple):
    target: str
    cells: tuple[Shape | None, ...]  # row-major 2x2


def _sample_count(rng: random.Random) -> CountParams:
    target = rng.choice(COUNT_COLOURS)
    count = rng.randint(0, MAX_COUNT)  # uniform answers
    return CountParams(target, _fill_cells(rng, target, count, [c for c in COUNT_COLOURS if c != target], 0.75))


def _fill_cells(rng: random.Random, target: str, count: int, fillers: list[str], p_fill: float) -> tuple:
    """The 2x2 layout shared by count_shapes and near_colours: `count` target shapes in random cells, and
    each other cell holds one of `fillers` with probability `p_fill` (the draw order fixes the datasets)."""
    order = rng.sample(range(4), 4)
    cells: list[Shape | None] = [None] * 4
    for rank, cell in enumerate(order):
        if rank < count:
            colour = target
        elif rng.random() < p_fill:
            colour = rng.choice(fillers)
        else:
            continue
        cells[cell] = Shape(colour, rng.choice(SHAPES), rng.randint(-2, 2), rng.randint(-2, 2), rng.randint(0, 2))
    return tuple(cells)


# --- near_colours: count_shapes' layout, but the other shapes are close shades of the asked colour ------

NEAR_COLOURS: dict[str, dict[str, RGB]] = {  # asked colour -> its two near shades (about 60 RGB units away)
    "red": {"vermilion": (225, 85, 25), "crimson": (185, 25, 75)},
    "blue": {"azure": (30, 135, 230), "indigo": (75, 45, 195)},
}
SHADES: dict[str, RGB] = {name: rgb for near in NEAR_COLOURS.values() for name, rgb in near.items()}


def _sample_near(rng: random.Random) -> CountParams:
    """The same 2x2 layout and answer distribution as count_shapes; every non-target shape is one of the
    asked colour's near shades, so the count depends on telling close colours apart (perception), while
    the reasoning stays one step."""
    target = rng.choice(sorted(NEAR_COLOURS))
    count = rng.randint(0, MAX_COUNT)
    return CountParams(target, _fill_cells(rng, target, count, sorted(NEAR_COLOURS[target]), 0.85))


def _describe_near(p: CountParams) -> tuple[str, str, list[str] | None, dict]:
    names = [p.target, *sorted(NEAR_COLOURS[p.target])]
    counts = {c: sum(1 for s in p.cells if s is not None and s.colour == c) for c in names}
    meta = {"counts": counts, "perception": ", ".join(f"{c} {n}" for c, n in counts.items()),
            "reasoning": f"{p.target} is {counts[p.target]}"}
    return f"How many {p.target} shapes are in the image?", str(counts[p.target]), None, meta


def _render_count(p: CountParams, size: int) -> Image.Image:
    im, draw, s = _canvas(size)
    cell = s / 2
    for index, shape in enumerate(p.cells):
        if shape is None:
            continue
        row, col = divmod(index, 2)
        cx = (col + 0.5) * cell + shape.dx * cell / 25
        cy = (row + 0.5) * cell + shape.dy * cell / 25
        r = cell * (0.30 + 0.03 * shape.size)
        fill = COLOURS.get(shape.colour) or SHADES[shape.colour]
        if shape.kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape.kind == "square":
            h = r * 0.88
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    return _finish(im, size)


def _describe_count(p: CountParams) -> tuple[str, str, list[str] | None, dict]:
    counts = {c: sum(1 for s in p.cells if s is not None and s.colour == c) for c in COUNT_COLOURS}
    answer = counts[p.target]
    meta = {
        "counts": counts,
        "perception": ", ".join(f"{c} {n}" for c, n in counts.items()),
        "reasoning": f"{p.target} is {answer}",
    }
    return f"How many {p.target} shapes are in the image?", str(answer), None, meta


# --- bar_compare -----------------------------------------------------------------------------------

BAR_COLOURS = ("red", "blue", "green", "orange")
MAX_HEIGHT = 6  # units; distinct heights, so the tallest and shortest are unique


class BarParams(NamedTuple):
    colours: tuple[str, ...]  # left to right
    heights: tuple[int, ...]  # units, 1..MAX_HEIGHT, all different
    options: tuple[str, ...]  # colour behind option A, B, ...
    kind: str  # "tallest" | "shortest"


def _sample_bars(rng: random.Random) -> BarParams:
    n = rng.randint(2, 4)
    colours = tuple(rng.sample(BAR_COLOURS, n))
    heights = tuple(rng.sample(range(1, MAX_HEIGHT + 1), n))
    options = tuple(rng.sample(colours, n))
    return BarParams(colours, heights, options, rng.choice(("tallest", "shortest")))


def _render_bars(p: BarParams, size: int) -> Image.Image:
    im, draw, s = _canvas(size)
    margin = 0.08 * s
    base = s - margin
    unit = (s - 2 * margin) / MAX_HEIGHT
    slot = (s - 2 * margin) / len(p.colours)
    width = slot * 0.72
    for i, (colour, height) in enumerate(zip(p.colours, p.heights)):
        left = margin + i * slot + (slot - width) / 2
        draw.rectangle([left, base - height * unit, left + width, base], fill=COLOURS[colour])
    draw.line([(margin * 0.5, base), (s - margin * 0.5, base)], fill=INK, width=max(1, round(s * 0.02)))
    return _finish(im, size)


def _describe_bars(p: BarParams) -> tuple[str, str, list[str] | None, dict]:
    pick = max if p.kind == "tallest" else min
    winner = p.colours[p.heights.index(pick(p.heights))]
    letter = LETTERS[p.options.index(winner)]
    meta = {
        "heights": dict(zip(p.colours, p.heights)),
        "perception": ", ".join(f"{c} {h}" for c, h in zip(p.colours, p.heights)),
        "reasoning": f"{winner} is {p.kind}, so {letter}",
    }
    # The options live in `choices` only; prompts.build_user_text renders them as "A. red".
    return f"Which bar is {p.kind}?", letter, list(p.options), meta


# --- gauge -----------------------------------------------------------------------------------------

GAUGE_MARKS = (8, 10, 12)


class GaugeParams(NamedTuple):
    marks: int
    value: int
    dx: int  # dial centre jitter, in 1/56 of the image
    dy: int
    radius: int  # 0..2
    needle: str  # needle colour name


NEEDLES: dict[str, RGB] = {"black": (15, 15, 15), "navy": (20, 30, 110)}


def _sample_gauge(rng: random.Random) -> GaugeParams:
    marks = rng.choice(GAUGE_MARKS)
    return GaugeParams(marks, rng.randrange(marks), rng.randint(-2, 2), rng.randint(-2, 2),
                       rng.randint(0, 2), rng.choice(sorted(NEEDLES)))


def _render_gauge(p: GaugeParams, size: int) -> Image.Image:
    im, draw, s = _canvas(size)
    cx, cy = s / 2 + p.dx * s / 56, s / 2 + p.dy * s / 56
    r = s * (0.40 + 0.02 * p.radius)
    line = max(1, round(s * 0.025))
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=INK, width=line)

    def point(mark: float, radius: float) -> tuple[float, float]:
        theta = 2 * math.pi * mark / p.marks  # 0 at the top, clockwise
        return cx + radius * math.sin(theta), cy - radius * math.cos(theta)

    for mark in range(p.marks):
        draw.line([point(mark, 0.80 * r), point(mark, r)], fill=INK, width=line)
    zx, zy = point(0, 0.86 * r)
    dot = 0.11 * r
    draw.ellipse([zx - dot, zy - dot, zx + dot, zy + dot], fill=COLOURS["red"])
    draw.line([(cx, cy), point(p.value, 0.72 * r)], fill=NEEDLES[p.needle], width=round(s * 0.05))
    hub = 0.08 * r
    draw.ellipse([cx - hub, cy - hub, cx + hub, cy + hub], fill=NEEDLES[p.needle])
    return _finish(im, size)


def _describe_gauge(p: GaugeParams) -> tuple[str, str, list[str] | None, dict]:
    question = (f"The dial has {p.marks} marks numbered 0 to {p.marks - 1} clockwise, starting at the red "
                f"dot at the top. What value does the needle point to?")
    meta = {
        "marks": p.marks,
        "value": p.value,
        "perception": f"needle at mark {p.value} of {p.marks}",
        "reasoning": f"the needle points to {p.value}",
    }
    return question, str(p.value), None, meta


# --- shared machinery ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProceduralTask:
    """A task = how to draw random parameters, render them, and phrase the question and answer."""

    name: str
    sample: Callable[[random.Random], tuple]
    render: Callable[[tuple, int], Image.Image]
    describe: Callable[[tuple], tuple[str, str, list[str] | None, dict]]

    def __call__(self, split: str, n: int, seed: int, image_size: int = 56) -> list[Sample]:
        _check_args(self.name, split, n, seed, image_size)
        return [self._one(split, seed, i, image_size) for i in range(n)]

    def _one(self, split: str, seed: int, index: int, image_size: int) -> Sample:
        rng = random.Random(f"{self.name}/{split}/{seed}/{index}")
        while True:
            params = self.sample(rng)
            if _split_of(self.name, params) == split:
                break
        question, answer, choices, meta = self.describe(params)
        return Sample(images=[self.render(params, image_size)], question=question, answer=answer,
                      choices=choices, source=f"{self.name}/{split}/{seed}/{index}", task=self.name,
                      meta=meta)


def _split_of(task: str, params: tuple) -> str:
    """Hash bucket of a configuration: the same image+question always belongs to the same split."""
    digest = hashlib.sha256(f"{task}|{params!r}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT else "train"


def _check_args(name: str, split: str, n: int, seed: int, image_size: int) -> None:
    if split not in SPLITS:
        raise ConfigError(f"task {name}: split must be one of {SPLITS}, got {split!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"task {name}: n must be a non-negative integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"task {name}: seed must be an integer, got {seed!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not (
            MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE):
        raise ConfigError(f"task {name}: image_size must be an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}], "
                          f"got {image_size!r}")


def _canvas(size: int) -> tuple[Image.Image, ImageDraw.ImageDraw, int]:
    s = size * SUPERSAMPLE
    im = Image.new("RGB", (s, s), WHITE)
    return im, ImageDraw.Draw(im), s


def _finish(im: Image.Image, size: int) -> Image.Image:
    return im.resize((size, size), Image.Resampling.BOX)  # area average = anti-aliased edges


count_shapes = ProceduralTask("count_shapes", _sample_count, _render_count, _describe_count)
bar_compare = ProceduralTask("bar_compare", _sample_bars, _render_bars, _describe_bars)
gauge = ProceduralTask("gauge", _sample_gauge, _render_gauge, _describe_gauge)
near_colours = ProceduralTask("near_colours", _sample_near, _render_count, _describe_near)

TASKS: dict[str, ProceduralTask] = {t.name: t for t in (count_shapes, bar_compare, gauge, near_colours)}


def make_task(name: str, split: str, n: int, seed: int, image_size: int = 56) -> list[Sample]:
    """Build ``n`` samples of the procedural task ``name`` for ``split`` ("train" or "test")."""
    if name not in TASKS:
        raise ConfigError(f"unknown procedural task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name](split, n, seed, image_size)
