"""Load local datasets (JSONL, JSON, Parquet, ``datasets.save_to_disk`` folders) as :class:`Sample` lists.

Row fields (one JSON object / table row per sample):

============  =====================================================================================
field         meaning
============  =====================================================================================
``image``     a path (relative to ``image_root``, default: the data file's folder), a list of paths
              for multi-image rows, embedded bytes / ``{"bytes", "path"}`` dicts (Parquet, HF
              ``Image`` feature), or a ``data:image/...;base64,`` URI. Alias: ``images``.
``question``  the question text, used verbatim. Alias: ``problem``.
``answer``    the verifiable answer; str, int or float (converted to text; ``2.0`` -> ``"2"``).
``choices``   optional list of option texts; the prompt renders them as "A. text", so keep them out
              of the question. The answer is then a letter (or one option's text).
``task``      optional task name (default: ``task_name`` argument, else the file's stem).
``meta``      optional dict (or JSON-object string) kept on ``Sample.meta``.
============  =====================================================================================

Other fields are ignored. Every problem raises :class:`DataError` naming the file and row; for JSONL
the row number is the 1-based line number (blank lines count), elsewhere the 1-based row index.
"""
from __future__ import annotations

import json
import math
import os
import reprlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from lite_srpo.data.tasks.base import Sample
from lite_srpo.data.tasks.images import DEFAULT_MAX_PIXELS, load_image
from lite_srpo.errors import ConfigError, DataError

SUPPORTED = "a .jsonl, .json or .parquet file, or a folder written by datasets.save_to_disk"
IMAGE_KEYS = ("image", "images")
QUESTION_KEYS = ("question", "problem")


def load_samples(
    path: str | Path,
    *,
    image_root: str | Path | None = None,
    task_name: str | None = None,
    limit: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[Sample]:
    """Read every row of ``path`` (at most ``limit``) into Samples with loaded RGB images."""
    path = Path(path)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
    root = default_image_root(path, image_root)
    samples: list[Sample] = []
    for number, where, row in iter_rows(path):
        samples.append(row_to_sample(row, where=where, root=root, source=f"{path.name}:row {number}",
                                     task=task_name or _row_task(row, where) or path.stem,
                                     max_pixels=max_pixels))
        if limit is not None and len(samples) >= limit:
            break
    if not samples:
        raise DataError(f"{path}: the dataset has no rows")
    return samples


def default_image_root(path: Path, image_root: str | Path | None) -> Path:
    """Relative image paths resolve against ``image_root``, else the data file's own folder."""
    if image_root is not None:
        return Path(image_root).expanduser().resolve()
    return (path if path.is_dir() else path.parent).resolve()


def iter_rows(path: str | Path) -> Iterator[tuple[int, str, dict]]:
    """Yield ``(row number, "file row N", row dict)`` for any supported format, lazily."""
    path = Path(path)
    if path.is_dir():
        return _disk_rows(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (expected {SUPPORTED})")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    if suffix == ".json":
        return _json_rows(path)
    if suffix == ".parquet":
        return _parquet_rows(path)
    raise DataError(f"{path}: unsupported file type '{path.suffix}' (expected {SUPPORTED})")


def row_to_sample(row: dict, *, where: str, root: Path, source: str, task: str,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> Sample:
    """Map one generic row (fields in the module docstring) to a Sample."""
    return make_sample(
        images=_first(row, IMAGE_KEYS),
        question=_first(row, QUESTION_KEYS),
        answer=row.get("answer"),
        choices=row.get("choices"),
        meta=_meta(row.get("meta"), where),
        where=where, root=root, source=source, task=task, max_pixels=max_pixels,
    )


def make_sample(*, images: Any, question: Any, answer: Any, choices: Any = None, meta: dict | None = None,
                where: str, root: Path, source: str, task: str,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Sample:
    """Validate raw field values and load the images; shared by the generic and benchmark loaders."""
    if question is None:
        raise DataError(f"{where}: missing 'question' (or alias 'problem')")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: 'question' must be non-empty text, got {_show(question)}")
    return Sample(
        images=load_images(images, where=where, root=root, max_pixels=max_pixels),
        question=question.strip(),
        answer=answer_text(answer, where),
        choices=_choices(choices, where),
        source=source,
        task=task,
        meta=dict(meta or {}),
    )


def load_images(value: Any, *, where: str, root: Path,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Image.Image]:
    """One image reference or a list of them -> list of RGB images (at least one)."""
    if value is None:
        raise DataError(f"{where}: missing 'image' (or alias 'images')")
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise DataError(f"{where}: 'image' is an empty list; every sample needs at least one image")
    return [load_image(item, where=where, root=root, max_pixels=max_pixels) for item in items]


def answer_text(value: Any, where: str) -> str:
    """str/int/float answer -> canonical text; integral floats drop their '.0'."""
    if value is None:
        raise DataError(f"{where}: missing 'answer'")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: 'answer' must be text or a number, got {_show(value)}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataError(f"{where}: 'answer' is {value}, not a finite number")
        text = str(int(value)) if value.is_integer() else repr(value)
    else:
        text = str(value).strip()
    if not text:
        raise DataError(f"{where}: 'answer' is empty")
    return text


def write_jsonl(samples: list[Sample], path: str | Path, image_dir: str | Path | None = None) -> Path:
    """Save samples as a real dataset: one JSONL row each, images as PNG files in ``image_dir``.

    ``image_dir`` defaults to ``<stem>_images`` next to the JSONL; image paths in rows are relative to
    the JSONL's folder when possible, so the folder can be moved as a whole.
    """
    path = Path(path)
    image_dir = Path(image_dir) if image_dir is not None else path.parent / f"{path.stem}_images"
    path.parent.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for i, sample in enumerate(samples):
            refs = []
            for k, image in enumerate(sample.images):
                file = image_dir / f"{i:06d}_{k}.png"
                image.save(file, format="PNG")
                refs.append(_relative_or_absolute(file, path.parent))
            row: dict[str, Any] = {"image": refs[0] if len(refs) == 1 else refs,
                                   "question": sample.question, "answer": sample.answer}
            if sample.choices is not None:
                row["choices"] = list(sample.choices)
            row["task"] = sample.task
            row["meta"] = sample.meta
            try:
                line = json.dumps(row, ensure_ascii=False)
            except (TypeError, ValueError) as exc:
                raise DataError(f"sample {i + 1} ({sample.source or 'no source'}): cannot be written as JSON "
                                f"({exc}); meta must hold only JSON values") from None
            fh.write(line + "\n")
    os.replace(tmp, path)
    return path


# --- row readers -----------------------------------------------------------------------------------

def _jsonl_rows(path: Path) -> Iterator[tuple[int, str, dict]]:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            where = f"{path.name} row {number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where}: line {number} is not valid UTF-8 (byte {raw[exc.start]:#04x} "
                                f"at column {exc.start + 1})") from None
            if not line.strip():
                continue
            yield number, where, _parse_object(line, where)


def _json_rows(path: Path) -> Iterator[tuple[int, str, dict]]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path.name}: not valid UTF-8 (byte {raw[exc.start]:#04x} at offset {exc.start})") from None
    data = _parse_json(text, path.name)
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        # MathVista / LogicVista ship {"<id>": {row}, ...}
        for number, (key, row) in enumerate(data.items(), start=1):
            yield number, f"{path.name} row {number} (key '{key}')", row
        return
    if not isinstance(data, list):
        raise DataError(f"{path.name}: expected a JSON list of row objects (or an object of row objects), "
                        f"got {type(data).__name__}")
    for number, row in enumerate(data, start=1):
        where = f"{path.name} row {number}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {_show(row)}")
        yield number, where, row


def _parquet_rows(path: Path) -> Iterator[tuple[int, str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=256)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield number, f"{path.name} row {number}", row
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path.name}: unreadable Parquet file ({type(exc).__name__}: {exc})") from None


def _disk_rows(path: Path) -> Iterator[tuple[int, str, dict]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"{path}: not a folder written by datasets.save_to_disk ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise DataError(f"{path}: holds splits {sorted(ds)}; pass one split's folder, "
                            f"e.g. {path / sorted(ds)[0]}")
        ds = next(iter(ds.values()))
    # Arrow rows keep images as raw {"bytes", "path"} dicts, so load_image applies the same checks.
    number = 0
    for table in ds.with_format("arrow").iter(batch_size=256):
        for row in table.to_pylist():
            number += 1
            yield number, f"{path.name} row {number}", row


# --- field helpers ---------------------------------------------------------------------------------

def _parse_object(text: str, where: str) -> dict:
    row = _parse_json(text, where)
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {_show(row)}")
    return row


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise DataError(f"{where}: invalid JSON (nested too deeply)") from None


def _first(row: dict, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if row.get(key) is not None:
            return row[key]
    return None


def _row_task(row: dict, where: str) -> str | None:
    task = row.get("task")
    if task is None or task == "":
        return None
    if not isinstance(task, str):
        raise DataError(f"{where}: 'task' must be text, got {_show(task)}")
    return task


def _choices(value: Any, where: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: 'choices' must be a list of option texts, got {_show(value)}")
    if not value:
        return None
    out = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise DataError(f"{where}: each choice must be text or a number, got {_show(item)}")
        out.append(str(item).strip())
    return out


def _meta(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if isinstance(value, str):
        value = _parse_json(value, f"{where} 'meta'") if value.strip() else {}
    if not isinstance(value, dict):
        raise DataError(f"{where}: 'meta' must be an object, got {_show(value)}")
    return value


def _relative_or_absolute(file: Path, base: Path) -> str:
    try:
        return file.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(file.resolve())


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 2, 40, 40, 4, 4


def _show(value: Any) -> str:
    """Short, depth-limited description of a bad value (safe on deeply nested JSON)."""
    return f"{type(value).__name__} {_REPR.repr(value)}"
