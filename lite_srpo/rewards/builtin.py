"""Verifiable rewards: answer extraction, answer equivalence, format check, and the weighted registry.

Equivalence is decided in this order, cheapest first:
1. multiple choice: a letter in any usual form ("B", "(B)", "B.", "b", "B) text") or the option's text
   ↔ the gold letter or the gold option's text;
2. plain numbers: integers, decimals, "1,000", fractions "3/4"; a percentage "50%" equals both 50 and 0.5
   (papers write either); equal within 1e-6 absolute (so 0.333333 matches 1/3);
3. plain words (letters and spaces only): case- and space-insensitive string equality — kept away from
   math_verify, which would read "red" and "der" as the same product of symbols;
4. anything else: `math_verify` (LaTeX fractions, roots, π, sets, intervals, `x=3` vs `3`, …), then the
   normalised string.
"""
from __future__ import annotations

import functools
import re
import threading
from dataclasses import replace
from fractions import Fraction
from typing import Callable

from ..config.user_rewards import REWARD_FUNCTIONS
from ..data.prompts import ResponseFormat, boxed_spans, parse_structure
from ..data.tasks.base import Sample
from ..errors import ConfigError

FALLBACKS = ("none", "last_number", "last_line")
_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?"
_LAST_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|[-+]?\.\d+")
_MATH_VERIFY_MAX_CHARS = 400  # longer strings skip math_verify: no timeout guards it off the main thread


def extract_answer(text: str, fallback: str = "none") -> str | None:
    """Content of the last complete `\\boxed{…}` (or `\\fbox{…}`); without one, the fallback's pick or None."""
    if fallback not in FALLBACKS:
        raise ConfigError(f"reward.answer_fallback={fallback!r}: use one of {', '.join(FALLBACKS)}")
    spans = boxed_spans(text)
    if spans:
        begin, end = spans[-1]
        inner = text[begin:end]
        return inner[inner.index("{") + 1:-1].strip()
    if fallback == "last_number":
        numbers = _LAST_NUMBER.findall(text)
        return numbers[-1].strip() if numbers else None
    if fallback == "last_line":
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return lines[-1] if lines else None
    return None


# ---------------------------------------------------------------------------------------------------------------
# Normalisation


def _unwrap(s: str) -> str:
    """Strip math delimiters, text wrappers and trailing punctuation that carry no value."""
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left):len(s) - len(right)].strip()
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf|textit|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\!", "").replace("\\,", "").replace("{,}", ",").replace("\\%", "%").replace("\u2212", "-")
    return s.strip().rstrip(".").strip()


def _norm_text(s: str) -> str:
    return re.sub(r"\s+", " ", _unwrap(s)).strip().lower()


_LETTER = re.compile(r"(?:(?:option|choice|answer)\s*:?\s*)?\(?([A-Za-z])\)?(?:\s*[.:)]\s*.*)?",
                     re.IGNORECASE | re.DOTALL)


def _letter(s: str) -> str | None:
    """"B", "(b)", "B.", "B)", "B: text", "Option B" → "B"; anything else → None."""
    m = _LETTER.fullmatch(_unwrap(s))
    return m.group(1).upper() if m else None


def _numbers(s: str) -> list[Fraction] | None:
    """The values a plain number string may mean (two for a percentage), or None if it is not one."""
    s = _unwrap(s).replace(" ", "")
    percent = s.endswith("%")
    s = s.rstrip("%")
    m = re.fullmatch(rf"({_NUMBER})(?:/({_NUMBER}))?", s)
    if not m or not re.search(r"\d", m.group(1)) or (m.group(2) is not None and not re.search(r"\d", m.group(2))):
        return None
    try:
        value = Fraction(m.group(1).replace(",", ""))
        if m.group(2) is not None:
            value /= Fraction(m.group(2).replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None
    return [value, value / 100] if percent else [value]


def _close(a: Fraction, b: Fraction) -> bool:
    """Within 1e-6 absolute, like math_verify's 6-decimal rounding: 0.333333 == 1/3, 999999 != 1000000."""
    return abs(a - b) <= Fraction(1, 10**6)


def _is_words(s: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z][A-Za-z\s'’\-]*", _unwrap(s)))


@functools.lru_cache(maxsize=4096)
def _math_equal(pred: str, gold: str) -> bool:
    """math_verify with its signal-based timeouts only on the main thread (signals fail elsewhere)."""
    if len(pred) > _MATH_VERIFY_MAX_CHARS or len(gold) > _MATH_VERIFY_MAX_CHARS:
        return False
    from math_verify import parse, verify

    limit = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        g = parse(f"${gold}$", parsing_timeout=limit)
        p = parse(f"${pred}$", parsing_timeout=limit)
        return bool(g and p and verify(g, p, timeout_seconds=limit))
    except Exception:  # noqa: BLE001 - sympy/latex2sympy raise many types on odd input; not equivalent
        return False


def _values_equal(pred: str, gold: str) -> bool:
    """Equality of two free-form answers (numbers, words, math)."""
    if _norm_text(pred) == _norm_text(gold):
        return True
    pn, gn = _numbers(pred), _numbers(gold)
    if pn is not None and gn is not None:
        return any(_close(a, b) for a in pn for b in gn)
    if _is_words(pred) and _is_words(gold):
        return False
    return _math_equal(_unwrap(pred), _unwrap(gold))


def _choice_index(s: str, choices: list[str]) -> int | None:
    letter = _letter(s)
    if letter is not None and ord(letter) - ord("A") < len(choices):
        return ord(letter) - ord("A")
    norm = _norm_text(s)
    for i, c in enumerate(choices):
        if _norm_text(c) == norm:
            return i
    return None


def is_equivalent(pred: str | None, gold: str, choices: list[str] | None = None) -> bool:
    """Whether a predicted answer matches the gold one (see the module docstring for the rules)."""
    if pred is None or not pred.strip():
        return False
    if choices:
        gold_i = _choice_index(gold, choices)
        if gold_i is not None:
            pred_i = _choice_index(pred, choices)
            if pred_i is not None:
                return pred_i == gold_i
            return _values_equal(pred, choices[gold_i])
    if re.fullmatch(r"\(?[A-Z]\)?\.?", gold.strip()):  # a choice letter without the options at hand
        letter = _letter(pred)
        if letter is not None:
            return letter == gold.strip().strip("().")
    return _values_equal(pred, gold)


# ---------------------------------------------------------------------------------------------------------------
# Reward functions: fn(response, sample, fmt) -> float


def accuracy_reward(response: str, sample: Sample, fmt: ResponseFormat, fallback: str = "none") -> float:
    """1 if the extracted answer equals the sample's answer, else 0."""
    return float(is_equivalent(extract_answer(response, fallback), sample.answer, sample.choices))


def format_reward(response: str, sample: Sample, fmt: ResponseFormat) -> float:
    """1 if the response follows `fmt.template`.

    structured: one perception block, then one think block (only whitespace before and between), then
    exactly one complete `\\boxed{…}` after the think block, with nothing but whitespace after it. The end
    is strict on purpose: a policy that repeats `\\boxed{3}` until the length cap must not keep the
    format bonus (accuracy alone reads the last box and cannot see it).
    think: one think block, then a box — EasyR1's `<think>.*</think>.*\\boxed{.*}.*`, stricter in
    refusing duplicated tags, lenient about leading whitespace and trailing text (EasyR1's behaviour).
    plain: a complete `\\boxed{…}` anywhere.
    """
    if fmt.template == "plain":
        return float(bool(boxed_spans(response)))
    structure = parse_structure(response, fmt)
    if structure is None:
        return 0.0
    boxes = boxed_spans(response, structure.after)
    if fmt.template == "structured":
        return float(len(boxes) == 1 and not response[boxes[0][1]:].strip())
    return float(bool(boxes))


BUILTINS: dict[str, Callable[[str, Sample, ResponseFormat], float]] = {"accuracy": accuracy_reward, "format": format_reward}
# Register the built-ins in the recipe's registry (a function registered under the same name earlier wins).
REWARD_FUNCTIONS.update({name: fn for name, fn in BUILTINS.items() if name not in REWARD_FUNCTIONS})


def compute_rewards(responses: list[str], samples: list[Sample], weights: dict[str, float], fmt: ResponseFormat,
                    template: str | None = None, *, answer_fallback: str = "none",
                    ) -> tuple[list[float], dict[str, list[float]]]:
    """Weighted total per response and each named function's raw values.

    `template` (default `fmt.template`) overrides the format checked; `answer_fallback` goes to accuracy.
    """
    unknown = sorted(set(weights) - set(REWARD_FUNCTIONS))
    if unknown:
        raise ConfigError(f"reward.weights: unknown reward {', '.join(map(repr, unknown))}; "
                          f"valid names: {', '.join(REWARD_FUNCTIONS)}")
    if len(responses) != len(samples):
        raise ValueError(f"{len(responses)} responses but {len(samples)} samples")
    if template is not None and template != fmt.template:
        fmt = replace(fmt, template=template)
    if answer_fallback not in FALLBACKS:
        raise ConfigError(f"reward.answer_fallback={answer_fallback!r}: use one of {', '.join(FALLBACKS)}")
    raw: dict[str, list[float]] = {}
    for name in weights:
        fn = REWARD_FUNCTIONS[name]
        if fn is accuracy_reward:
            fn = functools.partial(accuracy_reward, fallback=answer_fallback)
        raw[name] = [float(fn(r, s, fmt)) for r, s in zip(responses, samples)]
    totals = [sum(weights[name] * raw[name][i] for name in weights) for i in range(len(responses))]
    return totals, raw
