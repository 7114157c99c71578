"""Rollouts and evaluation decode with lite-srpo's own generation settings, never the checkpoint's.

A hub checkpoint ships a `generation_config.json` of chat defaults: Qwen2.5-VL-Instruct's holds
`repetition_penalty: 1.05` next to its sampling defaults. transformers' `generate` starts from the
call's settings and fills every field the call leaves unset, or sets to None, from
`model.generation_config`; an explicit `GenerationConfig` argument is filled the same way. A
penalised or truncated draw would then be scored by the passes as a draw from the plain softmax, which
biases the policy gradient and puts the importance ratio off 1 before any update (sampling ≠ scoring).

So every `generate` call of lite-srpo runs inside `own_generation_settings(model)`: the checkpoint's
config is swapped for one that keeps only its token ids (EOS and padding still come from the
checkpoint), and the call passes `NEUTRAL_LOGIT_SETTINGS`, an explicit neutral value for every field
that reshapes the next-token distribution. The checkpoint's config is put back afterwards, so an
exported model still carries the file its authors published. TRL passes `repetition_penalty=1.0` for
the same reason; this covers the other fields too.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")

NEUTRAL_LOGIT_SETTINGS: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "sequence_bias": None,
    "min_length": 0,
    "min_new_tokens": None,
    "exponential_decay_length_penalty": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "begin_suppress_tokens": None,
    "typical_p": 1.0,
    "min_p": None,
    "top_h": None,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "renormalize_logits": False,
    "guidance_scale": None,
    "watermarking_config": None,
    "num_beams": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "penalty_alpha": None,
    "dola_layers": None,
    "stop_strings": None,
}
"""Every `GenerationConfig` field that changes which token is drawn, at the value that leaves softmax
sampling (or greedy argmax) unchanged. `temperature`, `top_k`, `top_p` and `suppress_tokens` are set by
`rollout.generate` itself, from the recipe."""


def neutral_generation_config(checkpoint_config: Any) -> Any:
    """A fresh `GenerationConfig` holding only the checkpoint's token ids."""
    from transformers import GenerationConfig

    ids = {k: getattr(checkpoint_config, k, None) for k in TOKEN_ID_FIELDS}
    return GenerationConfig(**{k: v for k, v in ids.items() if v is not None})


@contextlib.contextmanager
def own_generation_settings(model: Any) -> Iterator[None]:
    """Inside: `model.generation_config` is `neutral_generation_config` of the checkpoint's; restored after."""
    original = model.generation_config
    model.generation_config = neutral_generation_config(original)
    try:
        yield
    finally:
        model.generation_config = original
