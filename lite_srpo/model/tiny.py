"""Build a tiny random VLM on disk, fully offline: a real HF architecture, tokenizer and processor.

Tests, the CPU demo and CI train these instead of downloading a checkpoint. The directory has the
same files as a hub checkpoint (config, safetensors, tokenizer, processor, chat template,
generation config), so every code path that loads a real model loads this one too.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import ModelError

SIZES = ("test", "demo")
_ALL_ARCHS = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "idefics3")

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
IDEFICS3_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
)

# One vision block per image item; plain-string content is allowed too. Newlines are written as
# jinja string escapes so that whitespace control (`{%-`) cannot eat them.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

IDEFICS3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] | capitalize }}:"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_utterance>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


@dataclass(frozen=True)
class _Dims:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vision_hidden: int
    vision_intermediate: int
    vision_depth: int
    vision_heads: int
    max_image_units: int  # Qwen: largest image side, in merged image tokens
    idefics_side: int  # Idefics3: every image is resized to this square (pixels)


# Every LLM linear in_features (hidden, intermediate, heads*head_dim) is a multiple of 64, because
# the CPU 4-bit kernels quantise in blocks of 64 (platform.md §3).
_DIMS = {
    "test": _Dims(512, 64, 128, 2, 4, 2, 32, 64, 2, 2, max_image_units=3, idefics_side=64),
    "demo": _Dims(1024, 128, 256, 4, 4, 2, 64, 128, 2, 2, max_image_units=4, idefics_side=128),
}


def available_archs() -> list[str]:
    """The archs this install of transformers can build (Qwen3-VL needs a recent release)."""
    import transformers

    archs = ["qwen2_5_vl", "qwen2_vl", "idefics3"]
    if hasattr(transformers, "Qwen3VLConfig") and hasattr(transformers, "Qwen3VLProcessor"):
        archs.append("qwen3_vl")
    return sorted(archs, key=_ALL_ARCHS.index)


# ---------------------------------------------------------------------------------------------
# corpus and tokenizer


_WORDS = (
    "the a an of and or to in on at is are was be it this that what which how many much "
    "there here with without from by for as not no yes one two three four five six seven eight "
    "nine ten image picture shows show see look count number answer question choose option "
    "left right top bottom above below middle next between inside outside largest smallest "
    "more less than most least same different total sum difference product half double "
    "red green blue yellow orange purple black white grey gray pink brown colour color "
    "circle square triangle rectangle bar bars chart clock hour hours minute minutes hand "
    "shape shapes dot dots line lines grid row column cell point points time o'clock "
    "first second third last height width long short tall big small large "
    "think reason step so therefore because then first finally final check verify "
    "plus minus times divided equals add subtract multiply divide "
    "User Assistant system You helpful assistant please Let me "
    "about after again all also always any around ask away back because before begin being "
    "best better both bring call came can carry change children city close come could cut "
    "day did does done down draw during each early earth end even every eye face fact far "
    "fast few find fire follow food form found four full get give go good great group grow "
    "hand hard have head hear help high hold home house idea important into just keep kind "
    "know land later learn leave light like little live make man may mean might move must "
    "name near need never new night now off often old only open other our over own page "
    "paper part people place play put read real remember run said saw say school sea seem "
    "set should side since sound start state still stop story study such sure take tell "
    "their them these thing those thought through together too tree try turn under until "
    "upon use very walk want watch water way well went were when where while why will word "
    "work world would write year young your animal apple ball bird book box car cat dog door "
    "fish flower game hat kite leaf moon star sun table toy train wheel window angle area "
    "degree edge even odd fraction graph label mark measure pair pattern percent plot range "
    "scale side symbol value axis vertical horizontal diagonal parallel equal greater smaller"
).split()
_COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "black", "white")
_SHAPES = ("circle", "square", "triangle", "rectangle", "bar", "dot")


def _corpus_lines() -> Iterator[str]:
    """A fixed English/arithmetic/visual-reasoning corpus; BPE learns the project's tags from it."""
    rng = random.Random(1234)  # the tokenizer must not depend on the weight seed
    yield " ".join(_WORDS)
    yield " ".join(str(d) for d in range(10))
    for _ in range(600):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op, value = rng.choice((("+", a + b), ("-", a - b), ("*", a * b)))
        colour, shape = rng.choice(_COLOURS), rng.choice(_SHAPES)
        n = rng.randint(1, 9)
        hour = rng.randint(1, 12)
        yield f"{a} {op} {b} = {value}"
        yield f"There are {n} {colour} {shape}s in the image."
        yield f"The clock shows {hour} o'clock, so the hour hand points at {hour}."
        yield (
            f"<perception> The image shows {n} {colour} {shape}s and a {rng.choice(_COLOURS)} bar. "
            f"</perception> <think> {a} {op} {b} = {value}, so the answer is {value}. </think> "
            f"The answer is \\boxed{{{value}}}."
        )
        yield " ".join(rng.choice(_WORDS) for _ in range(12))
        yield f"system\nYou are a helpful assistant.\nuser\nHow many {shape}s are {colour}?\nassistant\n{n}"
    yield from _prompt_lines(rng)


def _prompt_lines(rng: random.Random) -> Iterator[str]:
    """The project's own prompt templates, so a tiny model's prompts are short sequences, as on real tokenizers."""
    from ..data.prompts import TEMPLATES, ResponseFormat, build_user_text

    fmt = ResponseFormat()
    for _ in range(40):
        colour, shape = rng.choice(_COLOURS), rng.choice(_SHAPES)
        for template in TEMPLATES:
            yield build_user_text(f"How many {colour} {shape}s are in the image?", None, template, fmt)
            yield build_user_text("Which bar is tallest?", [rng.choice(_COLOURS) for _ in range(3)], template, fmt)


def _train_tokenizer(special_tokens: tuple[str, ...], vocab_size: int) -> Any:
    """Byte-level BPE over the built-in corpus; digits split one per token so numbers compose."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer)
    return tok


def _hf_tokenizer(arch: str, vocab_size: int) -> Any:
    from transformers import PreTrainedTokenizerFast

    if arch == "idefics3":
        backend = _train_tokenizer(IDEFICS3_SPECIAL_TOKENS, vocab_size)
        extra = [t for t in IDEFICS3_SPECIAL_TOKENS if t not in ("<|endoftext|>", "<end_of_utterance>")]
        return PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token="<|im_start|>",
            eos_token="<end_of_utterance>",
            pad_token="<|endoftext|>",
            additional_special_tokens=extra,
            padding_side="left",  # saved only when given to the constructor (platform.md §4)
        )
    backend = _train_tokenizer(QWEN_SPECIAL_TOKENS, vocab_size)
    extra = [t for t in QWEN_SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")]
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=extra,
        padding_side="left",
    )


# ---------------------------------------------------------------------------------------------
# configs


def _text_kwargs(d: _Dims, vocab: int, pad_id: int, eos_id: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab,
        hidden_size=d.hidden,
        intermediate_size=d.intermediate,
        num_hidden_layers=d.layers,
        num_attention_heads=d.heads,
        num_key_value_heads=d.kv_heads,
        max_position_embeddings=2048,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
    )


def _mrope_section(head_dim: int, interleaved: bool) -> list[int]:
    """Split head_dim/2 rotary frequencies between (time, height, width)."""
    half = head_dim // 2
    if interleaved:
        # Qwen3-VL interleaves t,h,w: h and w take every third frequency, as in its [24, 20, 20] of 64.
        # head_dim 16 -> [4, 2, 2]; 32 -> [6, 5, 5]
        hw = (half - 1) // 3
        return [half - 2 * hw, hw, hw]
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]  # head_dim 16 -> [2, 3, 3] (platform.md §4); 32 -> [4, 6, 6]


def _qwen_config(arch: str, d: _Dims, tok: Any) -> Any:
    import transformers

    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"),
        ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"),
        ("vision_end_token_id", "<|vision_end|>"),
    )}
    text = _text_kwargs(d, len(tok), tok.pad_token_id, tok.eos_token_id)
    text["bos_token_id"] = tok.pad_token_id  # Qwen uses <|endoftext|> as bos in its configs
    head_dim = d.hidden // d.heads
    if arch == "qwen3_vl":
        text.update(
            head_dim=head_dim,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": _mrope_section(head_dim, interleaved=True),
                "mrope_interleaved": True,
            },
        )
        vision = dict(
            depth=d.vision_depth,
            hidden_size=d.vision_hidden,
            intermediate_size=d.vision_intermediate,
            num_heads=d.vision_heads,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=d.hidden,
            num_position_embeddings=64,  # an 8x8 learned grid, interpolated to each image
            deepstack_visual_indexes=[d.vision_depth - 1],
        )
        return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)

    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 1_000_000.0,
        "mrope_section": _mrope_section(head_dim, interleaved=False),
    }
    if arch == "qwen2_5_vl":
        vision = dict(
            depth=d.vision_depth,
            hidden_size=d.vision_hidden,
            intermediate_size=d.vision_intermediate,
            num_heads=d.vision_heads,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            out_hidden_size=d.hidden,
            fullatt_block_indexes=[d.vision_depth - 1],
        )
        cfg_cls = transformers.Qwen2_5_VLConfig
    else:
        vision = dict(
            depth=d.vision_depth,
            embed_dim=d.vision_hidden,
            hidden_size=d.hidden,  # Qwen2-VL's vision "hidden_size" is the merger's output width
            mlp_ratio=d.vision_intermediate // d.vision_hidden,
            num_heads=d.vision_heads,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        cfg_cls = transformers.Qwen2VLConfig
    return cfg_cls(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


def _idefics3_config(d: _Dims, tok: Any) -> Any:
    import transformers

    text = _text_kwargs(d, len(tok), tok.pad_token_id, tok.eos_token_id)
    text.update(model_type="llama", bos_token_id=tok.bos_token_id, rms_norm_eps=1e-5)
    vision = dict(
        hidden_size=d.vision_hidden,
        intermediate_size=d.vision_intermediate,
        num_hidden_layers=d.vision_depth,
        num_attention_heads=d.vision_heads,
        image_size=d.idefics_side,
        patch_size=16,
    )
    return transformers.Idefics3Config(
        text_config=text,
        vision_config=vision,
        scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )


def _idefics3_seq_len(d: _Dims) -> int:
    # 64 px -> 4x4 patches of 16 px -> 16 / 2^2 (pixel shuffle, scale_factor 2) = 4 tokens; 128 px -> 16.
    patches = d.idefics_side // 16
    return patches * patches // 4


# ---------------------------------------------------------------------------------------------
# processor


def _processor(arch: str, d: _Dims, tok: Any, hub: Any = None) -> Any:
    """`hub` (tiny_hub.HubFiles): the published chat template and Qwen pixel bounds (Idefics3 keeps its tiny side)."""
    from .processors import processor_class

    if arch == "idefics3":
        from transformers import Idefics3ImageProcessorPil

        side = d.idefics_side
        image_processor = Idefics3ImageProcessorPil(
            do_image_splitting=False,
            size={"longest_edge": side},
            max_image_size={"longest_edge": side},
        )
        return processor_class("idefics3")(
            image_processor=image_processor,
            tokenizer=tok,
            image_seq_len=_idefics3_seq_len(d),
            chat_template=hub.chat_template if hub else IDEFICS3_CHAT_TEMPLATE,
        )

    from transformers import Qwen2VLImageProcessorPil

    patch = 16 if arch == "qwen3_vl" else 14
    unit = patch * 2  # one merged image token covers unit x unit pixels
    # At least 2x2 merged tokens (a 56x56 image gives 4 for patch 14); at most 3x3 = 9 for "test"
    # and 4x4 = 16 for "demo" (a 112x112 image).
    settings = dict(min_pixels=(2 * unit) ** 2, max_pixels=(d.max_image_units * unit) ** 2, patch_size=patch,
                    temporal_patch_size=2, merge_size=2)
    if hub is not None:
        from .tiny_hub import image_processor_kwargs

        settings = image_processor_kwargs(hub)
        if settings["patch_size"] != patch:
            raise ModelError(f"hub={hub.name!r}: published patch_size {settings['patch_size']}, the tiny {arch} has {patch}")
    image_processor = Qwen2VLImageProcessorPil(**settings)
    template = hub.chat_template if hub else QWEN_CHAT_TEMPLATE
    return processor_class(arch)(image_processor=image_processor, tokenizer=tok, chat_template=template)


# ---------------------------------------------------------------------------------------------
# entry points


def make_tiny(arch: str, out_dir: str | Path, size: str = "test", seed: int = 0, hub: str | None = None) -> Path:
    """Write a tiny random `arch` model (seeded weights) with tokenizer and processor to `out_dir`.

    `hub`: a checkpoint name from `tiny_hub.CHECKPOINT_ARCH`; the model then carries that checkpoint's
    published generation config, processor settings, chat template, special-token ids, vocabulary size
    and embedding tying (`tiny_hub.py`)."""
    archs = available_archs()
    if arch not in archs:
        raise ModelError(f"unknown or unavailable arch {arch!r}; available: {archs}")
    if size not in _DIMS:
        raise ModelError(f"unknown size {size!r}; choose one of {list(SIZES)}")
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    d = _DIMS[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    files = None
    if hub is not None:
        from .tiny_hub import apply_to_config, hub_tokenizer, load_hub_files

        files = load_hub_files(hub)
        if files.arch != arch:
            raise ModelError(f"hub={hub!r} is a {files.arch} checkpoint, not {arch}")
    tok = hub_tokenizer(files, d.vocab, _train_tokenizer) if files else _hf_tokenizer(arch, d.vocab)
    config = _idefics3_config(d, tok) if arch == "idefics3" else _qwen_config(arch, d, tok)
    if files:
        apply_to_config(config, files)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(out)
    _processor(arch, d, tok, files).save_pretrained(out)
    if files:
        from .tiny_hub import write_published

        write_published(out, files)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m lite_srpo.model.tiny --arch ARCH [--size test|demo] OUT_DIR`."""
    parser = argparse.ArgumentParser(prog="lite-srpo make-tiny", description=make_tiny.__doc__)
    parser.add_argument("--arch", required=True, choices=list(_ALL_ARCHS))
    parser.add_argument("--size", default="test", choices=list(SIZES))
    parser.add_argument("--hub", default=None, help="carry this checkpoint's published hub files (tiny_hub.py)")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    try:
        path = make_tiny(args.arch, args.out_dir, size=args.size, hub=args.hub)
    except ModelError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
