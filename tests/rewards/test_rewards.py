"""Answer extraction, equivalence, format reward and the weighted reward registry."""
from __future__ import annotations

import threading
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lite_srpo.data.prompts import ResponseFormat
from lite_srpo.data.tasks.base import Sample
from lite_srpo.errors import ConfigError
from lite_srpo.rewards.builtin import (REWARD_FUNCTIONS, accuracy_reward, compute_rewards, extract_answer,
                                       format_reward, is_equivalent)

CHOICES = ["3 apples", "7", "1/2", "blue"]
GOOD = "<perception>two bars: 3 and 5</perception>\n<think>5 > 3</think>\n\\boxed{B}"


def _sample(answer="B", choices=None) -> Sample:
    return Sample(images=[], question="q", answer=answer, choices=choices)


EQUIVALENT = [
    # (prediction, gold, choices)
    ("\\frac{1}{2}", "0.5", None),
    ("0.5", "\\frac{1}{2}", None),
    ("\\dfrac{3}{4}", "0.75", None),
    ("\\tfrac{3}{4}", "3/4", None),
    ("\\frac12", "0.5", None),
    ("3/4", "0.75", None),
    ("1,000", "1000", None),
    ("1{,}000", "1000", None),
    ("12,345.5", "12345.50", None),
    ("-3", "-3.0", None),
    ("\u22123", "-3", None),  # Unicode minus
    ("+4", "4", None),
    (".5", "0.5", None),
    ("50%", "0.5", None),  # a percentage equals its fraction …
    ("50\\%", "50", None),  # … and its number
    ("$42$", "42", None),
    ("\\(7\\)", "7", None),
    ("x=3", "3", None),
    ("\\sqrt{4}", "2", None),
    ("2\\pi", "\\pi \\cdot 2", None),
    ("\\{1,2\\}", "\\{2,1\\}", None),
    ("[0,1)", "[0,1)", None),
    ("2x+1", "1+2x", None),
    ("10^{3}", "1000", None),
    ("B", "B", CHOICES),
    ("(B)", "B", CHOICES),
    ("B.", "B", CHOICES),
    ("b", "B", CHOICES),
    ("B) 7", "B", CHOICES),
    ("Option B", "B", CHOICES),
    ("7", "B", CHOICES),  # the option's text for the gold letter
    ("\\text{blue}", "D", CHOICES),
    ("3 Apples", "A", CHOICES),
    ("0.5", "C", CHOICES),  # the option "1/2" by value
    ("C", "1/2", CHOICES),  # gold given as the option's text
    ("(C)", "C", None),  # a letter without the options at hand
    ("c.", "C", None),
    ("Blue ", "blue", None),
    ("New  York", "new york", None),
    ("5.", "5", None),
    ("0.333333", "1/3", None),  # within 1e-6
]

NOT_EQUIVALENT = [
    ("0.33", "1/3", None),
    ("1000000", "999999", None),  # the 1e-6 tolerance is absolute
    ("-5", "5", None),
    ("1001", "1,000", None),
    ("12,34", "1234", None),  # not a thousands separator
    ("(0,1)", "[0,1]", None),
    ("3.14", "\\pi", None),
    ("x=4", "3", None),
    ("A", "B", CHOICES),
    ("(D)", "B", CHOICES),
    ("3", "B", CHOICES),  # a value that is not the gold option's
    ("blue", "B", CHOICES),  # another option's text
    ("E", "B", CHOICES),  # out of range letter, and not the gold text
    ("red", "der", None),  # words are not products of symbols
    ("B", "C", None),
    (None, "1", None),
    ("", "1", None),
    ("   ", "", None),
]


@pytest.mark.parametrize("pred,gold,choices", EQUIVALENT)
def test_equivalent(pred, gold, choices):
    assert is_equivalent(pred, gold, choices)


@pytest.mark.parametrize("pred,gold,choices", NOT_EQUIVALENT)
def test_not_equivalent(pred, gold, choices):
    assert not is_equivalent(pred, gold, choices)


def test_enough_cases():
    assert len(EQUIVALENT) >= 30 and len(NOT_EQUIVALENT) >= 10


def test_math_verify_works_off_the_main_thread():
    # math_verify's default timeouts use signal.alarm, which raises outside the main thread.
    out: list[tuple[bool, bool]] = []
    t = threading.Thread(target=lambda: out.append((is_equivalent("\\frac{6}{8}", "0.75"),
                                                    is_equivalent("\\sqrt{16}", "5"))))
    t.start()
    t.join(timeout=30)
    assert out == [(True, False)]


# ------------------------------------------------------------------------------------------ extraction


def test_extracts_last_box_with_nested_braces():
    text = "first \\boxed{1} then \\boxed{\\frac{x^{2}}{\\{y\\}}} done"
    assert extract_answer(text) == "\\frac{x^{2}}{\\{y\\}}"
    assert extract_answer("\\fbox{ 42 }") == "42"
    assert extract_answer("\\boxed {7}") == "7"


def test_unclosed_box_is_skipped():
    assert extract_answer("\\boxed{3} and then \\boxed{4") == "3"
    assert extract_answer("cut \\boxed{4") is None


@pytest.mark.parametrize("text,fallback,expected", [
    ("no box here, 12 then 3/4.", "last_number", "3/4"),
    ("we get 1,000 apples", "last_number", "1,000"),
    ("minus -2.5 in the end", "last_number", "-2.5"),
    ("no digits", "last_number", None),
    ("work\n\n  final: 7  \n\n", "last_line", "final: 7"),
    ("   \n", "last_line", None),
    ("so 5", "none", None),
    ("\\boxed{9} beats 5", "last_number", "9"),  # a box wins over any fallback
])
def test_fallbacks(text, fallback, expected):
    assert extract_answer(text, fallback) == expected


def test_unknown_fallback_is_a_config_error():
    with pytest.raises(ConfigError, match="last_number"):
        extract_answer("x", "first_word")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("\\boxedfbx{}()$ 0123456789.,-/%abc\n")), max_size=60),
       st.sampled_from(["none", "last_number", "last_line"]))
def test_extract_answer_never_raises(text, fallback):
    out = extract_answer(text, fallback)
    assert out is None or isinstance(out, str)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40))
def test_extract_answer_never_raises_on_any_text(text):
    boxed = extract_answer(text, "none")
    for fallback in ("last_number", "last_line"):
        out = extract_answer(text, fallback)
        assert out is None or (isinstance(out, str) and out in text)
        if boxed is not None:
            assert out == boxed  # a boxed answer wins over every fallback
    if boxed is None:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        assert extract_answer(text, "last_line") == (lines[-1] if lines else None)
        number = extract_answer(text, "last_number")
        assert number is None or any(c.isdigit() for c in number)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=-10**9, max_value=10**9))
def test_integers_equal_themselves_in_every_form(n):
    assert is_equivalent(str(n), str(n))
    assert is_equivalent(f"{n:,}", str(n))
    assert is_equivalent(extract_answer(f"so \\boxed{{{n}}}"), f"{n}.0")
    assert not is_equivalent(str(n + 1), str(n))


@settings(max_examples=100, deadline=None)
@given(st.decimals(min_value=-10**6, max_value=10**6, places=3, allow_nan=False, allow_infinity=False))
def test_decimals_equal_themselves(x: Decimal):
    assert is_equivalent(f"{x:f}", f"{x:.4f}")  # trailing zeros do not matter
    assert not is_equivalent(f"{x:f}", f"{x + Decimal('0.001'):f}")  # one unit in the last place does


# ------------------------------------------------------------------------------------------ reward functions


def test_accuracy_reward_uses_the_fallback():
    s = _sample("5")
    assert accuracy_reward("\\boxed{5}", s, ResponseFormat()) == 1.0
    assert accuracy_reward("it is 5", s, ResponseFormat()) == 0.0
    assert accuracy_reward("it is 5", s, ResponseFormat(), fallback="last_number") == 1.0


@pytest.mark.parametrize("response,structured,think,plain", [
    (GOOD, 1, 0, 1),
    ("<think>5 > 3</think> so \\boxed{B}", 0, 1, 1),
    ("  <think>x</think>\\boxed{B} trailing", 0, 1, 1),
    ("<perception>a</perception><think>b</think>", 0, 0, 0),  # no box
    ("<perception>a</perception><think>b</think>\\boxed{B", 0, 0, 0),  # truncated box
    ("<perception>a</perception>\\boxed{B}<think>b</think>", 0, 0, 1),  # box before the think block ends
    ("<think>a</think><think>b</think>\\boxed{1}", 0, 0, 1),  # duplicated think
    ("\\boxed{3}", 0, 0, 1),
    ("Sure. <think>a</think>\\boxed{1}", 0, 0, 1),
    # structured: nothing but whitespace after the one box (a run-on repeat of the box loses the format bonus)
    ("<perception>a</perception><think>b</think>\\boxed{3}\n\\boxed{3}", 0, 0, 1),
    ("<perception>a</perception><think>b</think>\\boxed{3} and more", 0, 0, 1),
    ("<perception>a</perception><think>b</think>\nso \\boxed{3}\n  ", 1, 0, 1),
])
def test_format_reward_per_template(response, structured, think, plain):
    s = _sample()
    assert format_reward(response, s, ResponseFormat(template="structured")) == structured
    assert format_reward(response, s, ResponseFormat(template="think")) == think
    assert format_reward(response, s, ResponseFormat(template="plain")) == plain


def test_compute_rewards_weights_and_raw_values():
    samples = [_sample("B", CHOICES), _sample("B", CHOICES), _sample("7")]
    responses = [GOOD, "<think>x</think>\\boxed{A}", "answer 7"]
    totals, raw = compute_rewards(responses, samples, {"accuracy": 0.9, "format": 0.1}, ResponseFormat())
    assert raw == {"accuracy": [1.0, 0.0, 0.0], "format": [1.0, 0.0, 0.0]}
    # 0.9*1 + 0.1*1 = 1.0; 0.9*0 + 0.1*0 = 0; 0
    assert totals == pytest.approx([1.0, 0.0, 0.0])
    # the template override re-checks the format: response 2 is a good "think" response
    totals, raw = compute_rewards(responses, samples, {"accuracy": 0.9, "format": 0.1}, ResponseFormat(), "think",
                                  answer_fallback="last_number")
    assert raw["format"] == [0.0, 1.0, 0.0] and raw["accuracy"] == [1.0, 0.0, 1.0]
    # 0.9*1 + 0.1*0 = 0.9; 0.9*0 + 0.1*1 = 0.1; 0.9*1 + 0.1*0 = 0.9
    assert totals == pytest.approx([0.9, 0.1, 0.9])


def test_compute_rewards_rejects_unknown_names_and_mismatched_lengths():
    with pytest.raises(ConfigError) as err:
        compute_rewards(["x"], [_sample()], {"accuracy": 1.0, "length": 0.5}, ResponseFormat())
    assert "'length'" in str(err.value)
    assert all(name in str(err.value) for name in REWARD_FUNCTIONS)
    with pytest.raises(ValueError):
        compute_rewards(["x", "y"], [_sample()], {"accuracy": 1.0}, ResponseFormat())
    with pytest.raises(ConfigError):
        compute_rewards(["x"], [_sample()], {"accuracy": 1.0}, ResponseFormat(), answer_fallback="bad")


def test_the_builtins_are_registered_under_the_names_validation_knows():
    """Validation (config layer) checks names against BUILTIN_REWARDS and the registry without importing the
    rewards layer; importing it registers exactly those built-ins, as the same functions."""
    from lite_srpo.config.user_rewards import BUILTIN_REWARDS, check_reward_name
    from lite_srpo.rewards.builtin import BUILTINS

    assert tuple(BUILTINS) == BUILTIN_REWARDS
    assert REWARD_FUNCTIONS["accuracy"] is accuracy_reward and REWARD_FUNCTIONS["format"] is BUILTINS["format"]
    assert check_reward_name("accuracy") is None and "unknown reward" in check_reward_name("accuracyy")
