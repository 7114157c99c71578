"""EOS masking of sampled responses (`rollout.response_mask_from_ids`) on hand-built ids, and the roles of
responses that end in the EOS token, on the tiny model's real tokenizer."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from conftest import tiny_recipe
from lite_srpo.config import config_from_dict
from lite_srpo.data.prompts import OTHER, PERCEPTION, REASONING, ResponseFormat, render_reference_response, token_roles
from lite_srpo.rl.rollout import RolloutBatch, response_mask_from_ids

EOS, EOS2, PAD = 2, 3, 0


def mask_of(rows: list[list[int]], eos: list[int]) -> tuple[list[list[int]], list[bool]]:
    mask, truncated = response_mask_from_ids(torch.tensor(rows), eos)
    assert mask.dtype == torch.long and truncated.dtype == torch.bool
    return mask.tolist(), truncated.tolist()


def test_mask_runs_through_the_first_eos_inclusive_and_pad_after_it_is_masked():
    mask, truncated = mask_of([
        [5, 6, EOS, PAD, PAD],   # EOS at 2, pads after it
        [5, 6, 7, 8, 9],         # no EOS: truncated, every token kept
        [5, EOS, 7, EOS, 9],     # tokens after the first EOS are masked, even a second EOS and non-pad ids
        [5, 6, 7, 8, EOS],       # EOS as the last token
    ], [EOS])
    assert mask == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1],
    ]
    assert truncated == [False, True, False, False]


def test_eos_at_position_zero_keeps_only_that_token():
    mask, truncated = mask_of([[EOS, PAD, PAD], [EOS, 5, 6]], [EOS])
    assert mask == [[1, 0, 0], [1, 0, 0]]
    assert truncated == [False, False]


def test_several_eos_ids_each_end_a_response():
    mask, truncated = mask_of([
        [5, EOS2, PAD, PAD],  # the second EOS id ends it
        [5, 6, EOS, EOS2],    # whichever comes first
        [EOS2, EOS, 5, 6],
        [5, 6, 7, 8],
    ], [EOS, EOS2])
    assert mask == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert truncated == [False, False, False, True]
    # with only the first id declared, EOS2 is an ordinary token
    mask, truncated = mask_of([[5, EOS2, PAD, PAD]], [EOS])
    assert mask == [[1, 1, 1, 1]] and truncated == [True]


def test_pad_equal_to_eos_is_still_masked_after_the_first():
    """A tokenizer without a pad token pads with EOS (`rollout.pad_token_id`)."""
    mask, truncated = mask_of([[5, 6, EOS, EOS, EOS], [5, 6, 7, 8, 9]], [EOS])
    assert mask == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated == [False, True]


# ------------------------------------------------------------------------------------------ roles with EOS


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen):
    return AutoTokenizer.from_pretrained(str(tiny_qwen))


FMT = ResponseFormat()
PERCEPTION_TEXT = "There are 3 red circles and 2 blue squares."
REASONING_TEXT = "3 plus 2 is 5, so the total is 5."


def structured_ids(tokenizer) -> list[int]:
    text = render_reference_response(PERCEPTION_TEXT, REASONING_TEXT, "5", FMT)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_eos_token_gets_role_zero_and_content_roles_are_unchanged(tokenizer):
    ids = structured_ids(tokenizer)
    eos = tokenizer.eos_token_id
    assert eos is not None and eos not in ids
    plain, valid_plain = token_roles(tokenizer, ids, FMT)
    with_eos, valid = token_roles(tokenizer, ids + [eos], FMT)
    assert valid and valid_plain
    assert len(with_eos) == len(ids) + 1
    assert with_eos[-1] == OTHER
    assert with_eos[:-1] == plain
    # the content roles are right: the role-1 tokens spell the perception text, the role-2 tokens the
    # reasoning text and the boxed answer
    perception = tokenizer.decode([i for i, r in zip(ids, with_eos) if r == PERCEPTION])
    reasoning = tokenizer.decode([i for i, r in zip(ids, with_eos) if r == REASONING])
    assert perception.strip() == PERCEPTION_TEXT
    assert reasoning.replace(" ", "") == (REASONING_TEXT + "\\boxed{5}").replace(" ", "")
    assert OTHER in with_eos[:-1]  # the tags


def test_batch_roles_of_eos_terminated_rows_with_padding(tiny_qwen, tmp_path):
    """`train.batch_roles` on a batch whose rows end in EOS and are right-padded: each row's roles are
    those of its own ids through EOS, the EOS gets 0, and the padding after it stays 0."""
    from lite_srpo.rl import train as train_mod

    cfg = config_from_dict(tiny_recipe(tiny_qwen, tmp_path, train__steps=1))
    run = train_mod.setup(cfg)
    tok = run.policy.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id
    good = structured_ids(tok) + [eos]
    bad = tok("no structure here \\boxed{5}", add_special_tokens=False)["input_ids"] + [eos]
    width = len(good) + 3
    ids = torch.full((2, width), pad, dtype=torch.long)
    ids[0, :len(good)] = torch.tensor(good)
    ids[1, :len(bad)] = torch.tensor(bad)
    mask, truncated = response_mask_from_ids(ids, [eos])
    assert mask[0].sum() == len(good) and mask[1].sum() == len(bad) and not truncated.any()
    batch = RolloutBatch(prompts=[], prompt_of=[0, 0], response_ids=ids, response_mask=mask, texts=["", ""],
                         truncated=truncated)
    roles, violations = train_mod.batch_roles(run, batch)
    assert violations == 1
    expected, _ = token_roles(tok, good, run.fmt)
    assert roles[0, :len(good)].tolist() == expected
    assert roles[0, len(good) - 1] == OTHER  # the EOS
    assert (roles[0, len(good):] == 0).all() and (roles[1] == 0).all()
    assert (roles[0] == PERCEPTION).sum() > 0 and (roles[0] == REASONING).sum() > 0
