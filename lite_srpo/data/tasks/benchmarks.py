"""Read local copies of common visual-math benchmarks with their own column names.

Files can be JSONL, JSON (a list of rows or ``{"<id>": row}``), Parquet, or a ``datasets.save_to_disk``
folder; images may be paths (relative to ``image_root``, default the data file's folder, falling back
to an ``images/`` subfolder) or embedded bytes. Column mappings (first present column wins):

==============  ==========================  =====================  ===================  =========================
benchmark       image                       question               answer               choices
==============  ==========================  =====================  ===================  =========================
``mathvista``   ``decoded_image``,          ``question``,          ``answer``; option   ``choices``
                ``image``                   ``query``              text -> its letter
``geometry3k``  ``images``, ``image``       ``problem`` minus      ``answer`` (free-    none; ``choices`` and
                                            ``<image>`` tags       form value kept)     ``ground_truth`` -> meta
``mathverse``   ``image``                   ``question``,          ``answer`` (letter   a trailing ``Choices:``
                                            ``query_wo``           if multi-choice)     block, cut from question
``wemath``      ``image_path``, ``image``   ``question``           ``answer`` (letter)  ``option`` "A. x; B. y"
``mmk12``       ``image``, ``images``       ``question``           ``answer``           ``choices`` if present
``logicvista``  ``imagename``, ``image``    ``question``           ``answer`` (letters  none (inline in question)
                                                                   kept, "A, B")
``generic``     ``image``, ``images``       ``question``,          ``answer``           ``choices``
                                            ``problem``
==============  ==========================  =====================  ===================  =========================

Letter answers stay letters. Options live in ``Sample.choices`` only, never also in the question text:
``prompts.build_user_text`` renders them as "Options: A. ...". Ids, units, precisions, question types and
subjects go to ``Sample.meta``.
``name="auto"`` picks the mapping from the first row's columns (see :func:`detect_benchmark`).
Column names were checked against the public dataset cards (AI4Math/MathVista, AI4Math/MathVerse,
hiyouga/geometry3k, We-Math/We-Math, FanqingM/MMK12, LogicVista's dataset.json) on a best-effort basis.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from lite_srpo.data.tasks.base import Sample
from lite_srpo.data.tasks.images import DEFAULT_MAX_PIXELS
from lite_srpo.data.tasks.loader import default_image_root, iter_rows, make_sample, row_to_sample
from lite_srpo.errors import ConfigError, DataError

LETTERS = "ABCDEFGHIJ"


class Fields(NamedTuple):
    images: Any
    question: Any
    answer: Any
    choices: list[str] | None
    meta: dict


def load_benchmark(
    path: str | Path,
    name: str | None = None,
    image_root: str | Path | None = None,
    *,
    limit: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[Sample]:
    """Load a benchmark file with the column mapping ``name`` (None or "auto": detect from columns)."""
    path = Path(path)
    wanted = (name or "auto").lower().replace("-", "").replace("_", "")
    if wanted != "auto" and wanted not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; choose auto or one of {', '.join(BENCHMARKS)}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
    root = default_image_root(path, image_root)
    samples: list[Sample] = []
    for number, where, row in iter_rows(path):
        if wanted == "auto":
            wanted = detect_benchmark(row)
        source = f"{path.name}:row {number}"
        if wanted == "generic":
            sample = row_to_sample(row, where=where, root=root, source=source, task=path.stem,
                                   max_pixels=max_pixels)
        else:
            f = MAPPERS[wanted](row, where)
            sample = make_sample(images=_locate(f.images, root), question=f.question, answer=f.answer,
                                 choices=f.choices, meta=f.meta, where=where, root=root, source=source,
                                 task=wanted, max_pixels=max_pixels)
        samples.append(sample)
        if limit is not None and len(samples) >= limit:
            break
    if not samples:
        raise DataError(f"{path}: the dataset has no rows")
    return samples


def detect_benchmark(row: dict) -> str:
    """Name of the mapping whose characteristic columns ``row`` has; "generic" if none."""
    cols = set(row)
    if "decoded_image" in cols or {"pid", "question_type", "answer_type"} <= cols or {"unit", "precision"} <= cols:
        return "mathvista"
    if "query_wo" in cols or "problem_version" in cols:
        return "mathverse"
    if "option" in cols and ("image_path" in cols or "knowledge concept" in cols):
        return "wemath"
    if "imagename" in cols:
        return "logicvista"
    if "problem" in cols and "question" not in cols and cols & {"images", "image"}:
        return "geometry3k"
    if "subject" in cols and "question" in cols and cols & {"image", "images"}:
        return "mmk12"
    return "generic"


# --- one mapper per benchmark ----------------------------------------------------------------------

def _mathvista(row: dict, where: str) -> Fields:
    choices = _text_list(row.get("choices"), where, "choices")
    question = _first(row, ("question", "query"))
    answer = row.get("answer")
    if choices:
        answer = _to_letter(answer, choices, where)
    meta = _pick(row, ("pid", "unit", "precision", "question_type", "answer_type"))
    return Fields(_first(row, ("decoded_image", "image")), question, answer, choices, meta)


def _geometry3k(row: dict, where: str) -> Fields:
    problem = row.get("problem")
    if isinstance(problem, str):
        problem = problem.replace("<image>", "").strip()
    meta = _pick(row, ("id", "choices", "ground_truth"))
    return Fields(_first(row, ("images", "image")), problem, row.get("answer"), None, meta)


def _mathverse(row: dict, where: str) -> Fields:
    question = _first(row, ("question", "query_wo"))
    answer = row.get("answer")
    choices = None
    if isinstance(question, str) and _is_letter(answer):
        question, choices = split_choice_block(question)
    meta = _pick(row, ("sample_index", "problem_index", "problem_version", "question_type"))
    return Fields(row.get("image"), question, answer, choices, meta)


def _wemath(row: dict, where: str) -> Fields:
    question = row.get("question")
    choices = None
    option = row.get("option")
    if isinstance(option, str) and option.strip():
        choices = parse_option_string(option)
        if choices is None:
            raise DataError(f"{where}: cannot read options from 'option' {option[:60]!r} (expected 'A. x; B. y')")
    meta = _pick(row, ("ID", "split", "knowledge concept", "key"))
    return Fields(_first(row, ("image_path", "image")), question, row.get("answer"), choices, meta)


def _mmk12(row: dict, where: str) -> Fields:
    meta = _pick(row, ("id", "subject"))
    return Fields(_first(row, ("image", "images")), row.get("question"), row.get("answer"),
                  _text_list(row.get("choices"), where, "choices"), meta)


def _logicvista(row: dict, where: str) -> Fields:
    meta = _pick(row, ("skill", "reasoningtype", "reasoning_type"))
    return Fields(_first(row, ("imagename", "image")), row.get("question"), row.get("answer"), None, meta)


MAPPERS: dict[str, Callable[[dict, str], Fields]] = {
    "mathvista": _mathvista,
    "geometry3k": _geometry3k,
    "mathverse": _mathverse,
    "wemath": _wemath,
    "mmk12": _mmk12,
    "logicvista": _logicvista,
}
BENCHMARKS = (*MAPPERS, "generic")


# --- option helpers --------------------------------------------------------------------------------

_CHOICE_LINE = re.compile(r"^\s*\(?([A-J])\)?\s*[:.)：]\s*(.*\S)\s*$")


def split_choice_block(question: str) -> tuple[str, list[str] | None]:
    """Cut a trailing 'Choices:' block (one 'A: x' / 'A. x' / '(A) x' line per option) off the question.

    Returns ``(stem, options)``, or ``(question, None)`` unchanged when there is no such block or any
    line after 'Choices:' is not an option line.
    """
    match = None
    for match in re.finditer(r"choices\s*:?[ \t]*$", question, flags=re.IGNORECASE | re.MULTILINE):
        pass  # the last 'Choices:' line
    if match is None:
        return question, None
    lines = [line for line in question[match.end():].splitlines() if line.strip()]
    found = [_CHOICE_LINE.match(line) for line in lines]
    if not found or not all(found):
        return question, None
    options = _consecutive([(m.group(1), m.group(2)) for m in found])
    stem = question[:match.start()].rstrip()
    if options is None or not stem:
        return question, None
    return stem, options


def parse_option_string(option: str) -> list[str] | None:
    """We-Math style 'A. 1; B. 2; C. 3' -> ['1', '2', '3'], or None if it does not parse."""
    pairs = re.findall(r"([A-J])\s*[.:：]\s*(.*?)\s*(?=;\s*[A-J]\s*[.:：]|$)", option.strip(), flags=re.S)
    return _consecutive(pairs)


def _consecutive(pairs: list[tuple[str, str]]) -> list[str] | None:
    letters = [letter for letter, _ in pairs]
    if len(pairs) < 2 or letters != list(LETTERS[: len(pairs)]):
        return None
    return [text.strip().rstrip(";").strip() for _, text in pairs]


def _to_letter(answer: Any, choices: list[str], where: str) -> Any:
    """An answer given as option text becomes its letter; a letter in range stays."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        return answer  # make_sample reports the bad type
    text = answer.strip()
    if text in choices:
        return LETTERS[choices.index(text)]
    if _is_letter(text) and LETTERS.index(text) < len(choices):
        return text
    raise DataError(f"{where}: answer {text[:60]!r} is neither one of the choices nor an option letter")


def _is_letter(value: Any) -> bool:
    return isinstance(value, str) and len(value.strip()) == 1 and value.strip() in LETTERS


# --- small helpers ---------------------------------------------------------------------------------

def _locate(images: Any, root: Path) -> Any:
    """Relative paths missing under ``root`` are also looked for in ``root/images`` (benchmark layout)."""
    if isinstance(images, (list, tuple)):
        return [_locate(item, root) for item in images]
    if isinstance(images, str) and not images.startswith(("data:", "http://", "https://")):
        try:
            if not (root / images).exists() and (root / "images" / images).is_file():
                return str(root / "images" / images)
        except (OSError, ValueError):
            pass  # load_image reports unusable paths
    return images


def _first(row: dict, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if row.get(key) is not None:
            return row[key]
    return None


def _pick(row: dict, keys: tuple[str, ...]) -> dict:
    return {key: row[key] for key in keys if row.get(key) is not None}


def _text_list(value: Any, where: str, field: str) -> list[str] | None:
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int, float)) for v in value):
        raise DataError(f"{where}: '{field}' must be a list of option texts")
    return [str(v).strip() for v in value]
