"""Prompt building, role parsing and token spans, on real byte-level BPE tokenizers trained here offline."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lite_srpo.data import prompts
from lite_srpo.data.prompts import (TEMPLATES, ResponseFormat, build_messages, build_user_text, char_roles,
                                    count_format_violations, remove_perception_ids, render_reference_response,
                                    template_is_structured, token_char_spans, token_roles)
from lite_srpo.data.tasks.base import Sample
from lite_srpo.errors import ConfigError

FMT = ResponseFormat()
CORPUS = [
    "<perception>There are two red bars of height 3 and 5.</perception>\n<think>5 is larger than 3, so the answer "
    "is B.</think>\n\\boxed{B}",
    "The gauge reads 40 units. Counting the circles gives 7 in total. 你好世界 😀 café",
    "<think>We add 2 and 3 to get 5.</think> \\boxed{\\frac{1}{2}}",
    "<perception>(3) bars</perception>",  # teaches the merge ">(": a token that straddles a tag
] * 20


def _train(pre, dec, alphabet) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    tok.decoder = dec
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=alphabet, special_tokens=["<|end|>"],
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>")


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE: tags are several tokens, emoji and CJK are split into byte tokens."""
    return _train(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(),
                  pre_tokenizers.ByteLevel.alphabet())


@pytest.fixture(scope="module")
def bpe_tags() -> PreTrainedTokenizerFast:
    """The same, with the four tags added as single tokens (as a user may do before SFT)."""
    tok = _train(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(),
                 pre_tokenizers.ByteLevel.alphabet())
    tok.add_tokens(["<perception>", "</perception>", "<think>", "</think>"])
    return tok


@pytest.fixture(scope="module")
def metaspace() -> PreTrainedTokenizerFast:
    """SentencePiece-style (Metaspace '▁') BPE: not byte-level, so spans come from the prefix-decoding fallback."""
    return _train(pre_tokenizers.Metaspace(), decoders.Metaspace(), [])


def _good(perception="two red bars, 3 and 5", reasoning="5 > 3 so B", answer="B") -> str:
    return f"<perception>{perception}</perception>\n<think>{reasoning}</think>\nThe answer: \\boxed{{{answer}}}"


# ------------------------------------------------------------------------------------------ prompt text


def test_user_text_lists_choices_and_asks_for_the_letter():
    text = build_user_text("Which bar is taller?", ["left", "right"], "structured", FMT)
    assert "A. left\nB. right" in text
    assert "letter" in text and "\\boxed{}" in text
    assert text.index("Which bar") < text.index("A. left") < text.index("<perception>")
    assert "letter" not in build_user_text("How many?", None, "structured", FMT)


def test_think_template_is_the_easyr1_suffix():
    text = build_user_text("Q?", None, "think", FMT)
    assert text == ("Q?\n\nYou first think through the reasoning process as an internal monologue, enclosed within "
                    "<think> </think> tags. Then, provide your final answer enclosed within \\boxed{}.")


def test_structured_template_uses_configured_tags():
    fmt = ResponseFormat(perception_tag="see", think_tag="reason")
    text = build_user_text("Q?", None, "structured", fmt)
    assert "<see> </see>" in text and "<reason> </reason>" in text and "<perception>" not in text
    assert "<think>" not in build_user_text("Q?", None, "plain", FMT)


def test_template_names_and_errors():
    assert set(TEMPLATES) == {"structured", "think", "plain"}
    assert template_is_structured("structured") and not template_is_structured("think")
    with pytest.raises(ConfigError, match="structured"):
        build_user_text("Q", None, "fancy", FMT)
    with pytest.raises(ConfigError):
        template_is_structured("fancy")
    with pytest.raises(ConfigError, match="differ"):
        ResponseFormat(perception_tag="x", think_tag="x")
    with pytest.raises(ConfigError):
        ResponseFormat(think_tag="bad tag")
    with pytest.raises(ConfigError):
        ResponseFormat(template="nope")


def test_build_messages_puts_one_image_entry_per_image_before_the_text():
    img = Image.new("RGB", (8, 8), (9, 9, 9))
    sample = Sample(images=[img, img], question="Compare the images.", answer="A", choices=["same", "different"])
    msgs = build_messages(sample, "think", FMT, system="Be brief.")
    assert msgs[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    content = msgs[1]["content"]
    assert msgs[1]["role"] == "user" and [c["type"] for c in content] == ["image", "image", "text"]
    assert content[-1]["text"] == build_user_text("Compare the images.", ["same", "different"], "think", FMT)
    assert [m["role"] for m in build_messages(sample, "think", FMT)] == ["user"]


def test_reference_response_is_well_formed_for_each_template():
    for template in ("structured", "think"):
        fmt = ResponseFormat(template=template)
        text = render_reference_response("3 bars", "so 3", "3", fmt)
        roles, valid = char_roles(text, fmt)
        assert valid and text.endswith("\\boxed{3}")
        assert (1 in roles) == (template == "structured")
    assert render_reference_response("p", "r", "7", ResponseFormat(template="plain")) == "\\boxed{7}"


# ------------------------------------------------------------------------------------------ character roles


def test_char_roles_of_a_good_response():
    p, r = "two red bars", "5 > 3 so B"
    text = _good(p, r)
    roles, valid = char_roles(text, FMT)
    assert valid and len(roles) == len(text)
    p_at = text.index(p)
    assert roles[p_at:p_at + len(p)] == [1] * len(p)
    assert roles[:p_at] == [0] * len("<perception>")
    r_at = text.index(r)
    assert roles[r_at:r_at + len(r)] == [2] * len(r)
    box_at = text.index("\\boxed")
    assert roles[box_at:] == [2] * len("\\boxed{B}")
    # every other character (4 tags, newlines, "The answer: ") is 0
    n_other = len(text) - len(p) - len(r) - len("\\boxed{B}")
    assert roles.count(0) == n_other


def test_boxed_answer_with_nested_braces_is_reasoning_and_only_the_last_box_counts():
    text = "<perception>a</perception><think>b</think>\\boxed{1} then \\boxed{\\frac{1}{2}} end"
    roles, valid = char_roles(text, FMT)
    last = text.index("\\boxed{\\frac")
    span = len("\\boxed{\\frac{1}{2}}")
    assert valid and roles[last:last + span] == [2] * span
    assert roles[last + span:] == [0] * len(" end")
    first = text.index("\\boxed{1}")
    assert roles[first:first + 9] == [0] * 9


@pytest.mark.parametrize("text", [
    "<perception>a<think>b</think></perception>\\boxed{1}",  # nested
    "<think>b</think>\\boxed{1}",  # no perception
    "<perception>a</perception>\\boxed{1}",  # no think
    "<perception>a</perception><perception>c</perception><think>b</think>",  # duplicated perception
    "<perception>a</perception><think>b</think><think>c</think>",  # duplicated think
    "<think>b</think><perception>a</perception>\\boxed{1}",  # wrong order
    "<perception>a</perception><think>b is cut off at max len",  # truncated: unclosed think
    "<perception>a</perception>",  # truncated before the think block
    "Sure! <perception>a</perception><think>b</think>\\boxed{1}",  # text before the structure
    "<perception>a</perception> and then <think>b</think>\\boxed{1}",  # text between the blocks
    "<perception>a</think>b</perception><think>",  # tags interleaved
    "",
])
def test_invalid_structures_give_all_zero(text):
    roles, valid = char_roles(text, FMT)
    assert not valid and roles == [0] * len(text)


def test_whitespace_around_blocks_is_allowed_and_custom_tags_work():
    fmt = ResponseFormat(perception_tag="see", think_tag="why")
    text = "  \n<see>x</see>\n\n<why>z</why>"
    roles, valid = char_roles(text, fmt)
    assert valid and roles[text.index("x")] == 1 and roles[text.index("z")] == 2
    assert not char_roles(_good(), fmt)[1]  # default tags are plain text under custom tags


def test_think_template_roles_are_reasoning_only():
    fmt = ResponseFormat(template="think")
    text = "<think>count 3</think>\\boxed{3}"
    roles, valid = char_roles(text, fmt)
    assert valid and set(roles) == {0, 2} and roles.count(2) == len("count 3") + len("\\boxed{3}")
    assert not char_roles("\\boxed{3}", ResponseFormat(template="plain"))[1]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("<>/\\{}ab \nperceptionthinkboxed😀")), max_size=80))
def test_char_roles_never_raises_and_has_one_role_per_character(text):
    roles, valid = char_roles(text, FMT)
    assert len(roles) == len(text) and set(roles) <= {0, 1, 2}
    if not valid:
        assert not any(roles)


_plain = st.text(alphabet=st.characters(blacklist_characters="<>{}\\", blacklist_categories=("Cs",)), max_size=30)


@settings(max_examples=100, deadline=None)
@given(_plain, _plain, st.text(alphabet="0123456789xyB+-", min_size=1, max_size=5))
def test_rendered_responses_have_exact_role_counts(p, r, a):
    text = render_reference_response(p, r, a, FMT)
    roles, valid = char_roles(text, FMT)
    assert valid
    assert roles.count(1) == len(p)
    assert roles.count(2) == len(r) + len(f"\\boxed{{{a}}}")


# ------------------------------------------------------------------------------------------ token spans


def _pieces(text: str, spans) -> str:
    return "".join(text[s:e] for s, e in spans)


def test_tags_are_several_tokens_in_the_test_tokenizer(bpe, bpe_tags):
    assert len(bpe.tokenize("<perception>")) > 1 and len(bpe.tokenize("</think>")) > 1
    assert bpe_tags.tokenize("<perception>") == ["<perception>"]


def test_spans_tile_an_ascii_response_on_the_byte_level_path(bpe, monkeypatch):
    monkeypatch.setattr(prompts, "_prefix_decode_spans", lambda *a: pytest.fail("slow fallback used"))
    text = _good()
    ids = bpe.encode(text)
    spans = token_char_spans(bpe, ids)
    assert len(spans) == len(ids)
    assert _pieces(text, spans) == text
    assert [bpe.decode([i]) for i in ids] == [text[s:e] for s, e in spans]


def test_spans_cover_multibyte_characters_split_over_tokens(bpe):
    text = "<perception>😀 猫 café</perception><think>ok</think>\\boxed{1}"
    ids = bpe.encode(text)
    decoded = bpe.decode(ids)
    assert decoded == text
    spans = token_char_spans(bpe, ids)
    emoji = text.index("😀")
    covering = [k for k, (s, e) in enumerate(spans) if s <= emoji < e]
    assert len(covering) >= 2  # the 4 UTF-8 bytes of the emoji are separate tokens here
    assert all(spans[k] == (emoji, emoji + 1) for k in covering)
    # every character is covered, spans never go backwards
    assert set().union(*[range(s, e) for s, e in spans]) == set(range(len(text)))
    assert all(s1 <= s2 and e1 <= e2 for (s1, e1), (s2, e2) in zip(spans, spans[1:]))


def test_special_and_added_tokens_span_their_own_text(bpe, bpe_tags):
    ids = bpe.encode("ok") + [bpe.eos_token_id]
    spans = token_char_spans(bpe, ids)
    assert bpe.decode(ids)[slice(*spans[-1])] == "<|end|>"
    text = _good()
    ids = bpe_tags.encode(text)
    spans = token_char_spans(bpe_tags, ids)
    assert _pieces(text, spans) == text
    assert text[slice(*spans[0])] == "<perception>"


def test_truncated_utf8_at_the_end_still_maps(bpe):
    ids = bpe.encode("ab 😀")[:-2]  # cut inside the emoji, as max_new_tokens can
    text = bpe.decode(ids)
    spans = token_char_spans(bpe, ids)
    assert text.endswith("\ufffd") and spans[-1][1] == len(text)


def test_non_byte_level_tokenizer_uses_the_prefix_fallback(metaspace):
    text = "<perception>two bars</perception> <think>5 is larger</think> \\boxed{B}"
    ids = metaspace.encode(text)
    decoded = metaspace.decode(ids)
    spans = token_char_spans(metaspace, ids)
    assert len(spans) == len(ids) and _pieces(decoded, spans) == decoded
    roles, valid = token_roles(metaspace, ids, FMT)
    assert valid and 1 in roles and 2 in roles


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_spans_cover_any_text(bpe, text):
    ids = bpe.encode(text)
    decoded = bpe.decode(ids)
    spans = token_char_spans(bpe, ids)
    assert len(spans) == len(ids)
    assert all(0 <= s <= e <= len(decoded) for s, e in spans)
    assert set().union(set(), *[range(s, e) for s, e in spans]) == set(range(len(decoded)))


# ------------------------------------------------------------------------------------------ token roles


def _by_role(tok, ids, roles, role) -> str:
    return "".join(tok.decode([i]) for i, r in zip(ids, roles) if r == role)


@pytest.mark.parametrize("fixture", ["bpe", "bpe_tags"])
def test_token_roles_of_a_good_response(fixture, request):
    tok = request.getfixturevalue(fixture)
    p, r = "two red bars, 3 and 5", "5 is larger than 3, so B"
    text = _good(p, r)
    ids = tok.encode(text)
    roles, valid = token_roles(tok, ids, FMT)
    assert valid and len(roles) == len(ids)
    assert _by_role(tok, ids, roles, 1) == p
    assert _by_role(tok, ids, roles, 2) == r + "\\boxed{B}"
    assert "perception" in _by_role(tok, ids, roles, 0) and "think" in _by_role(tok, ids, roles, 0)


def test_token_touching_a_tag_is_other(bpe):
    text = "<perception>(3) bars</perception><think>ok</think>\\boxed{3}"
    ids = bpe.encode(text)
    roles, valid = token_roles(bpe, ids, FMT)
    pieces = [bpe.decode([i]) for i in ids]
    merged = [k for k, piece in enumerate(pieces) if ">(" in piece]
    assert valid and merged, pieces  # ">(" is one token here, so it touches the tag
    assert all(roles[k] == 0 for k in merged)
    assert _by_role(bpe, ids, roles, 1) == "3) bars"  # "(" shares its token with the tag's ">"


def test_emoji_and_cjk_content_keep_their_role(bpe):
    text = "<perception>😀 猫</perception><think>猫 ok</think>\\boxed{1}"
    ids = bpe.encode(text)
    roles, valid = token_roles(bpe, ids, FMT)
    spans = token_char_spans(bpe, ids)
    emoji = text.index("😀")
    assert valid and all(roles[k] == 1 for k, (s, e) in enumerate(spans) if s <= emoji < e)
    cat2 = text.rindex("猫")
    assert all(roles[k] == 2 for k, (s, e) in enumerate(spans) if s <= cat2 < e)


def test_truncated_response_is_invalid_at_token_level(bpe):
    text = _good()
    cut = text.index("</think>") + 3
    ids = bpe.encode(text[:cut])
    roles, valid = token_roles(bpe, ids, FMT)
    assert not valid and roles == [0] * len(ids)


def test_remove_perception_ids_keeps_tags_and_everything_else(bpe):
    p = "two red bars"
    text = _good(p)
    ids = bpe.encode(text)
    roles, _ = token_roles(bpe, ids, FMT)
    kept, index = remove_perception_ids(ids, roles)
    assert bpe.decode(kept) == text.replace(p, "")
    assert [ids[i] for i in index] == kept and index == sorted(index)
    assert len(ids) - len(kept) == roles.count(1) > 0
    with pytest.raises(ValueError):
        remove_perception_ids(ids, roles[:-1])


def test_count_format_violations():
    assert count_format_violations([True, False, False, True]) == 2
