"""Chat prompts, the structured response format, and per-token roles (DESIGN.md §4, SRPO step 1).

Roles are integers: 0 other (tags, whitespace or text outside the structure, special tokens),
1 perception content, 2 reasoning (think content and the final `\\boxed{…}` after the think block).
A response whose blocks are missing, duplicated, nested, out of order or unclosed has role 0 everywhere
and is reported invalid, so SRPO treats it as plain GRPO and counts a format violation.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from ..config import DataConfig
from ..errors import ConfigError
from .tasks.base import Sample

OTHER, PERCEPTION, REASONING = 0, 1, 2

_BOX_INSTRUCTION = "provide your final answer enclosed within \\boxed{}."
# Format instructions; {p} and {t} stand for the perception and think tag names.
TEMPLATES: dict[str, str] = {
    # SRPO: visual evidence first, then reasoning that only uses that evidence (algorithms.md §5.2).
    "structured": (
        "First, read the visual evidence needed to answer (quantities, labels, positions and relations seen in the "
        "image) and write it inside <{p}> </{p}> tags. Then reason step by step using only that evidence, enclosed "
        "within <{t}> </{t}> tags. Finally, " + _BOX_INSTRUCTION
    ),
    # The EasyR1 suffix used by PAPO, VPPO and VGPO (algorithms.md §1.1), verbatim with the default tag.
    "think": (
        "You first think through the reasoning process as an internal monologue, enclosed within <{t}> </{t}> tags. "
        "Then, " + _BOX_INSTRUCTION
    ),
    "plain": "Answer the question and " + _BOX_INSTRUCTION,
}
_CHOICE_INSTRUCTION = "Put only the letter of the correct option in \\boxed{}."
_TAG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*\Z")


@dataclass(frozen=True)
class ResponseFormat:
    """The tags a response must use and which template asked for them.

    `template` lives here (not only in the prompt call) so a reward function with the fixed signature
    `fn(response, sample, fmt)` knows which format to check.
    """

    perception_tag: str = "perception"
    think_tag: str = "think"
    answer: str = "boxed"
    template: str = "structured"

    def __post_init__(self) -> None:
        for key, tag in (("perception_tag", self.perception_tag), ("think_tag", self.think_tag)):
            if not _TAG_NAME.match(tag):
                raise ConfigError(f"data.{key}={tag!r}: a tag name is letters, digits, '_' or '-' (e.g. 'perception')")
        if self.perception_tag == self.think_tag:
            raise ConfigError(f"data.perception_tag and data.think_tag are both {self.think_tag!r}: they must differ")
        if self.answer != "boxed":
            raise ConfigError(f"answer={self.answer!r}: only 'boxed' (\\boxed{{…}}) answers are supported")
        if self.template not in TEMPLATES:
            raise ConfigError(f"data.template={self.template!r}: use one of {', '.join(TEMPLATES)}")

    def tags(self, name: str) -> tuple[str, str]:
        return f"<{name}>", f"</{name}>"

    def blocks(self) -> list[str]:
        """Tag names of the blocks this template requires, in order."""
        names = {"structured": [self.perception_tag, self.think_tag], "think": [self.think_tag], "plain": []}
        return names[self.template]


def response_format(data: DataConfig) -> ResponseFormat:
    """The response format the recipe's `data` section asks for: its template and tags."""
    return ResponseFormat(perception_tag=data.perception_tag, think_tag=data.think_tag, template=data.template)


def template_is_structured(name: str) -> bool:
    """True for templates whose responses carry a perception block (the ones SRPO can weight)."""
    if name not in TEMPLATES:
        raise ConfigError(f"template {name!r}: use one of {', '.join(TEMPLATES)}")
    return name == "structured"


def choice_letter(index: int) -> str:
    return chr(ord("A") + index)


def build_user_text(question: str, choices: list[str] | None, template: str, fmt: ResponseFormat) -> str:
    """Question, lettered options (if any), then the template's format instruction."""
    if template not in TEMPLATES:
        raise ConfigError(f"template {template!r}: use one of {', '.join(TEMPLATES)}")
    if choices is not None and not 1 <= len(choices) <= 26:
        raise ConfigError(f"{len(choices)} choices: between 1 and 26 are supported (letters A-Z)")
    parts = [question.strip()]
    if choices:
        parts.append("Options:\n" + "\n".join(f"{choice_letter(i)}. {c}" for i, c in enumerate(choices)))
    instruction = TEMPLATES[template].replace("{p}", fmt.perception_tag).replace("{t}", fmt.think_tag)
    if choices:
        instruction += " " + _CHOICE_INSTRUCTION
    parts.append(instruction)
    return "\n\n".join(parts)


def build_messages(sample: Sample, template: str, fmt: ResponseFormat, system: str | None = None) -> list[dict]:
    """HF chat messages: one `{"type": "image"}` per image, then the text (processors expand the images)."""
    messages: list[dict] = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    content: list[dict] = [{"type": "image"} for _ in sample.images]
    content.append({"type": "text", "text": build_user_text(sample.question, sample.choices, template, fmt)})
    messages.append({"role": "user", "content": content})
    return messages


def render_reference_response(perception: str, reasoning: str, answer: str, fmt: ResponseFormat) -> str:
    """A well-formed response for `fmt.template` (SFT warm-up traces); the think template folds perception in."""
    p_open, p_close = fmt.tags(fmt.perception_tag)
    t_open, t_close = fmt.tags(fmt.think_tag)
    box = f"\\boxed{{{answer}}}"
    if fmt.template == "plain":
        return box
    if fmt.template == "think":
        reasoning = f"{perception.strip()} {reasoning.strip()}".strip()
        return f"{t_open}{reasoning}{t_close}\n{box}"
    return f"{p_open}{perception}{p_close}\n{t_open}{reasoning}{t_close}\n{box}"


# ---------------------------------------------------------------------------------------------------------------
# Character roles


def boxed_spans(text: str, start: int = 0) -> list[tuple[int, int]]:
    """`(begin, end)` of every complete `\\boxed{…}` / `\\fbox{…}` at or after `start`, nested braces included.

    An unclosed box (a truncated response) is left out.
    """
    spans = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text[start:]):
        begin = start + m.start()
        depth, i = 1, start + m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            spans.append((begin, i))
    return spans


@dataclass(frozen=True)
class _Structure:
    """Character spans of a valid response: each block's content and every tag."""

    contents: list[tuple[int, int]]  # one (begin, end) per required block, tags excluded
    tags: list[tuple[int, int]]
    after: int  # first character after the last closing tag


def parse_structure(text: str, fmt: ResponseFormat) -> _Structure | None:
    """The template's blocks, each exactly once, in order, with only whitespace before and between them."""
    names = fmt.blocks()
    if not names:
        return None
    contents, tags, pos = [], [], 0
    every_tag = [t for n in names for t in fmt.tags(n)]
    if any(text.count(t) != 1 for t in every_tag):
        return None  # a missing or duplicated tag; with single tags, the order check below rules out nesting
    for name in names:
        open_tag, close_tag = fmt.tags(name)
        begin = text.find(open_tag)
        end = text.find(close_tag)
        if begin < pos or end < begin + len(open_tag) or text[pos:begin].strip():
            return None
        inner = (begin + len(open_tag), end)
        contents.append(inner)
        tags += [(begin, inner[0]), (end, end + len(close_tag))]
        pos = end + len(close_tag)
    return _Structure(contents=contents, tags=tags, after=pos)


def _roles_and_tags(text: str, fmt: ResponseFormat) -> tuple[list[int], list[bool], bool]:
    roles = [OTHER] * len(text)
    is_tag = [False] * len(text)
    s = parse_structure(text, fmt)
    if s is None:
        return roles, is_tag, False
    block_roles = [PERCEPTION, REASONING] if len(s.contents) == 2 else [REASONING]
    for (begin, end), role in zip(s.contents, block_roles):
        roles[begin:end] = [role] * (end - begin)
    boxes = boxed_spans(text, s.after)
    if boxes:
        begin, end = boxes[-1]  # the graded answer
        roles[begin:end] = [REASONING] * (end - begin)
    for begin, end in s.tags:
        is_tag[begin:end] = [True] * (end - begin)
    return roles, is_tag, True


def char_roles(text: str, fmt: ResponseFormat) -> tuple[list[int], bool]:
    """Role of every character and whether the response has the template's structure (invalid → all 0)."""
    roles, _, valid = _roles_and_tags(text, fmt)
    return roles, valid


# ---------------------------------------------------------------------------------------------------------------
# Token ↔ character spans


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to chr(256 + k)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _utf8_len(ch: str) -> int:
    c = ord(ch)
    return 1 if c < 0x80 else 2 if c < 0x800 else 3 if c < 0x10000 else 4


def _decode_bytes_tracked(data: bytes) -> tuple[str, list[int]]:
    """`data.decode("utf-8", "replace")` plus, for every byte, the index of the character it ended up in."""
    pieces: list[str] = []
    char_of_byte: list[int] = []
    n_chars, pos = 0, 0
    while pos < len(data):
        bad: tuple[int, int] | None = None
        try:
            segment = data[pos:].decode("utf-8")
        except UnicodeDecodeError as e:  # same (start, end) the 'replace' handler would get
            segment = data[pos:pos + e.start].decode("utf-8")
            bad = (pos + e.start, pos + e.end)
        for ch in segment:
            char_of_byte += [n_chars] * _utf8_len(ch)
            n_chars += 1
        pieces.append(segment)
        if bad is None:
            break
        pieces.append("\ufffd")
        char_of_byte += [n_chars] * (bad[1] - bad[0])
        n_chars += 1
        pos = bad[1]
    return "".join(pieces), char_of_byte


def _byte_level_spans(tokenizer, ids: list[int], text: str) -> list[tuple[int, int]] | None:
    """Spans from the byte-level alphabet; None when the tokenizer is not byte-level (or decodes differently)."""
    decoder = _byte_decoder()
    added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    data = bytearray()
    byte_spans = []
    for tid, tok in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
        begin = len(data)
        if tid in added:
            data += added[tid].encode("utf-8")
        elif tok is None:
            return None
        else:
            try:
                data += bytes(decoder[c] for c in tok)
            except KeyError:
                return None  # not a byte-level token (e.g. SentencePiece '▁')
        byte_spans.append((begin, len(data)))
    decoded, char_of_byte = _decode_bytes_tracked(bytes(data))
    if decoded != text:
        return None
    spans = []
    for begin, end in byte_spans:
        if end == begin:
            at = char_of_byte[begin] if begin < len(char_of_byte) else len(decoded)
            spans.append((at, at))
        else:
            # A token holding part of a multi-byte character covers that whole character.
            spans.append((char_of_byte[begin], char_of_byte[end - 1] + 1))
    return spans


def _common_prefix_len(a: str, b: str) -> int:
    if b.startswith(a):
        return len(a)
    k = min(len(a), len(b))
    while k and not b.startswith(a[:k]):
        k -= 1
    return k


def _prefix_decode_spans(tokenizer, ids: list[int], text: str) -> list[tuple[int, int]]:
    """Fallback for any tokenizer: token i ends where decode(ids[:i+1]) stops agreeing with the full text.

    Quadratic in the number of tokens, so used only when the byte-level path does not apply.
    """
    spans, prev = [], 0
    for i in range(len(ids)):
        end = max(prev, _common_prefix_len(tokenizer.decode(ids[:i + 1]), text))
        spans.append((prev, end))
        prev = end
    return spans


def token_char_spans(tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """`(begin, end)` character span of each token in `tokenizer.decode(ids)`.

    Byte-level BPE (GPT-2/Qwen/Llama-3 style): tokens → bytes via the byte alphabet, bytes → characters
    of the decoded text, in linear time. A character split over several tokens (emoji, CJK) is covered by
    each of them, so spans may overlap by one character. Special and added tokens span their own text.
    Other tokenizers fall back to incremental prefix decoding (spans tile the text, never overlap).
    """
    ids = [int(i) for i in ids]
    return _spans_in(tokenizer, ids, tokenizer.decode(ids))


def _spans_in(tokenizer, ids: list[int], text: str) -> list[tuple[int, int]]:
    spans = _byte_level_spans(tokenizer, ids, text)
    return spans if spans is not None else _prefix_decode_spans(tokenizer, ids, text)


def token_roles(tokenizer, ids: list[int], fmt: ResponseFormat) -> tuple[list[int], bool]:
    """Role of every token of a generated response and whether the response is well-formed.

    A token gets 0 if it touches any tag character (or spans no character); otherwise the most frequent
    role among its non-whitespace characters (all its characters if it is only whitespace), ties going
    to the content role. Invalid responses get 0 everywhere.
    """
    ids = [int(i) for i in ids]
    text = tokenizer.decode(ids)
    roles, is_tag, valid = _roles_and_tags(text, fmt)
    if not valid:
        return [OTHER] * len(ids), False
    out = []
    for begin, end in _spans_in(tokenizer, ids, text):
        if end <= begin or any(is_tag[begin:end]):
            out.append(OTHER)
            continue
        chars = [k for k in range(begin, end) if not text[k].isspace()] or list(range(begin, end))
        counts = [0, 0, 0]
        for k in chars:
            counts[roles[k]] += 1
        out.append(max(range(3), key=lambda r: (counts[r], r)))
    return out, True


def remove_perception_ids(ids: list[int], roles: list[int]) -> tuple[list[int], list[int]]:
    """Drop perception tokens (tags kept) for SRPO's consistency pass; also return the kept positions."""
    if len(ids) != len(roles):
        raise ValueError(f"{len(ids)} ids but {len(roles)} roles")
    kept_index = [i for i, r in enumerate(roles) if r != PERCEPTION]
    return [ids[i] for i in kept_index], kept_index


def count_format_violations(valid: list[bool]) -> int:
    return sum(1 for v in valid if not v)
