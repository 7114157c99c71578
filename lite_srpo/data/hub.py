"""Datasets named by the recipe: `hf://ORG/NAME[:CONFIG][@SPLIT]` through `datasets.load_dataset`, or local files.

A hub dataset is loaded in full (no streaming) into the Hugging Face cache (HF_HOME / HF_DATASETS_CACHE,
shared between runs, so a second run does not download again). Columns come from `data.columns` when set
(image, question, answer, choices; unset fields keep the usual names), else from the benchmark mapping the
first row's columns match (`tasks.benchmarks.detect_benchmark`: MathVista, MathVerse, Geometry3K, ...),
else the generic names. Images may be `datasets.Image` values, bytes, paths (relative to
`data.image_root`) or lists of those. A missing column names the column and the columns that exist.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config.hub_uri import is_hub_uri, parse_hub_uri
from ..errors import DataError
from .tasks.base import Sample
from .tasks.benchmarks import MAPPERS, detect_benchmark
from .tasks.images import DEFAULT_MAX_PIXELS
from .tasks.loader import iter_rows, load_samples, make_sample, row_to_sample

_ALIASES = {"image": ("image", "images"), "question": ("question", "problem"), "answer": ("answer",)}


def load_hub_table(path_or_id: str, config: str | None, split: str, cache_dir: str | None = None) -> Any:
    """`datasets.load_dataset(path_or_id, config, split=split)`: a hub id or a local dataset folder."""
    import datasets

    try:
        ds = datasets.load_dataset(path_or_id, config, split=split, cache_dir=cache_dir, streaming=False)
    except Exception as exc:  # noqa: BLE001 - hub, network, builder and split errors all mean "cannot load"
        hint = " (offline: HF_HUB_OFFLINE is set and it is not in the cache)" if _offline() else ""
        raise DataError(f"{path_or_id}{':' + config if config else ''}@{split}: cannot load with "
                        f"datasets.load_dataset{hint}: {type(exc).__name__}: {exc}") from None
    return ds


def _offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def load_data_source(spec: str, *, key: str, image_root: str | Path | None = None,
                     columns: dict[str, str] | None = None, default_split: str = "train",
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Sample]:
    """The samples of `data.train_file` / `data.test_file` (`key` names it in errors)."""
    columns = dict(columns or {})
    if is_hub_uri(spec):
        ref = parse_hub_uri(spec)
        split = ref.split or default_split
        ds = load_hub_table(ref.repo, ref.config, split)
        root = Path(image_root) if image_root else Path.cwd()
        return dataset_samples(ds, label=f"{key} {spec}", source=f"{ref.repo}@{split}", task=ref.repo.split("/")[1],
                               columns=columns, root=root, max_pixels=max_pixels)
    if not columns:
        return load_samples(spec, image_root=image_root, max_pixels=max_pixels)
    path = Path(spec)
    root = Path(image_root) if image_root else (path if path.is_dir() else path.parent)
    rows = iter_rows(path)
    return _samples(rows, label=f"{key} {spec}", source=path.name, task=path.stem, columns=columns,
                    root=root.resolve(), max_pixels=max_pixels, column_names=None)


def dataset_samples(ds: Any, *, label: str, source: str, task: str, columns: dict[str, str], root: Path,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Sample]:
    """A `datasets.Dataset` → Samples. Rows are read as Arrow, so images stay `{"bytes","path"}` dicts."""
    def rows() -> Iterator[tuple[int, str, dict]]:
        number = 0
        for table in ds.with_format("arrow").iter(batch_size=256):
            for row in table.to_pylist():
                number += 1
                yield number, f"{source} row {number}", row

    return _samples(rows(), label=label, source=source, task=task, columns=columns, root=root,
                    max_pixels=max_pixels, column_names=list(ds.column_names))


def _samples(rows: Iterator[tuple[int, str, dict]], *, label: str, source: str, task: str,
             columns: dict[str, str], root: Path, max_pixels: int, column_names: list[str] | None) -> list[Sample]:
    samples: list[Sample] = []
    layout = None
    for number, where, row in rows:
        if layout is None:  # decided once, from the dataset's columns (or the first row's keys)
            layout = _layout(label, column_names or list(row), columns, row)
        where_src = f"{source}:row {number}"
        if layout == "generic":
            samples.append(row_to_sample(_renamed(row, columns), where=where, root=root, source=where_src,
                                         task=task, max_pixels=max_pixels))
        else:
            f = MAPPERS[layout](row, where)
            samples.append(make_sample(images=f.images, question=f.question, answer=f.answer, choices=f.choices,
                                       meta=f.meta, where=where, root=root, source=where_src, task=layout,
                                       max_pixels=max_pixels))
    if not samples:
        raise DataError(f"{label}: the dataset has no rows")
    return samples


def _layout(label: str, names: list[str], columns: dict[str, str], first_row: dict) -> str:
    """'generic' (the usual or `data.columns` names) or a benchmark mapper's name; checks columns exist."""
    have = ", ".join(names)
    for field, column in columns.items():
        if column not in names:
            raise DataError(f"{label}: data.columns.{field} = {column!r} is not a column; columns: {have}")
    if not columns:
        detected = detect_benchmark(first_row)
        if detected != "generic":
            return detected
    for field, aliases in _ALIASES.items():
        if field not in columns and not any(a in names for a in aliases):
            raise DataError(f"{label}: no {field} column (looked for {' / '.join(repr(a) for a in aliases)}); "
                            f"columns: {have} — name it with data.columns.{field}")
    return "generic"


def _renamed(row: dict, columns: dict[str, str]) -> dict:
    if not columns:
        return row
    out = dict(row)
    for field, column in columns.items():
        out[field] = row[column]
    return out
