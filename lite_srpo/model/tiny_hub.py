"""A real checkpoint's hub files for the tiny builder: `make_tiny(..., hub="Qwen/Qwen2.5-VL-7B-Instruct")`.

The tiny models keep their tiny widths, but with `hub` they carry what a user's download carries and
what the code reads from it: the published `generation_config.json` (verbatim: Qwen2.5-VL-Instruct's
`repetition_penalty: 1.05` and sampling defaults reach `generate` exactly as they would from the hub),
the image processor's min/max pixels and patch sizes, the chat template, the special tokens at their
real ids, the real vocabulary size and `tie_word_embeddings`.

The published files are stored under `hub_published/<owner>--<name>/` (facts copied from the public
checkpoints; `hub_published/SOURCES.md` says where each came from). The tokenizer is still the tiny
corpus BPE: its tokens take the ids the published added tokens leave free, and unreachable filler
tokens pad the rest up to the last special token, so every special token sits where the real tokenizer
puts it and the embedding matrix has the real number of rows. No merge produces a filler, so text encodes as it does in the tiny tokenizer;
a random model may sample fillers, which decode to their names.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import ModelError

PUBLISHED_DIR = Path(__file__).with_name("hub_published")

CHECKPOINT_ARCH = {
    "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2_5_vl",
    "Qwen/Qwen2.5-VL-3B-Instruct": "qwen2_5_vl",
    "Qwen/Qwen2-VL-2B-Instruct": "qwen2_vl",
    "Qwen/Qwen3-VL-4B-Instruct": "qwen3_vl",
    "HuggingFaceTB/SmolVLM-256M-Instruct": "idefics3",
}
"""Checkpoints whose files are stored, and the tiny arch that carries them (hub_published/SOURCES.md
says where each copy came from; no Qwen3-VL-2B copy was found, so Qwen3-VL is the 4B)."""

FILLER = "<|tiny_filler_{}|>"


@dataclass(frozen=True)
class HubFiles:
    """The parsed published files of one checkpoint."""

    name: str
    arch: str
    folder: Path
    config: dict[str, Any]
    preprocessor: dict[str, Any]
    tokenizer_config: dict[str, Any]
    chat_template: str

    @property
    def text_config(self) -> dict[str, Any]:
        """The language model's keys: nested in `text_config` (newer files) or at the top (Qwen2/2.5-VL)."""
        return {**self.config, **self.config.get("text_config", {})}

    @property
    def vocab_size(self) -> int:
        return int(self.text_config["vocab_size"])

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", self.text_config.get("tie_word_embeddings", False)))

    def added_tokens(self) -> list[tuple[int, str, bool]]:
        """(id, content, special) of every added token, in id order."""
        decoder = self.tokenizer_config.get("added_tokens_decoder", {})
        return sorted((int(i), t["content"], bool(t.get("special", True))) for i, t in decoder.items())

    def token_id(self, key: str) -> Any:
        """A token id from config.json (top level or text_config), e.g. "image_token_id"."""
        return self.config.get(key, self.text_config.get(key))


def folder_of(name: str) -> Path:
    return PUBLISHED_DIR / name.replace("/", "--")


def load_hub_files(name: str) -> HubFiles:
    """The stored files of checkpoint `name`; a clear error lists the stored ones."""
    if name not in CHECKPOINT_ARCH:
        raise ModelError(f"hub={name!r}: no stored hub files; stored: {sorted(CHECKPOINT_ARCH)}")
    folder = folder_of(name)

    def read(file: str) -> dict[str, Any]:
        path = folder / file
        if not path.is_file():
            raise ModelError(f"hub={name!r}: {path} is missing")
        return json.loads(path.read_text())

    tokenizer_config = read("tokenizer_config.json")
    read("generation_config.json")  # copied verbatim by write_published: here only checked to be there and JSON
    template = tokenizer_config.get("chat_template")
    if (folder / "chat_template.json").is_file():
        template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if not template:
        raise ModelError(f"hub={name!r}: no chat template in {folder}")
    return HubFiles(name=name, arch=CHECKPOINT_ARCH[name], folder=folder, config=read("config.json"),
                    preprocessor=read("preprocessor_config.json"), tokenizer_config=tokenizer_config,
                    chat_template=template)


def hub_tokenizer(files: HubFiles, vocab_size: int, train_tokenizer: Callable[..., Any]) -> Any:
    """The tiny corpus BPE (`train_tokenizer((), vocab_size)`: tiny.py's, passed in so that this module
    does not import the builder that imports it), padded with fillers so that the published added
    tokens get their published ids; eos/pad/bos as the published tokenizer_config names them."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    added = files.added_tokens()
    reserved = {i for i, _, _ in added}
    top = max(reserved)
    backend = train_tokenizer((), vocab_size)
    spec = json.loads(backend.to_str())
    # the tiny BPE's tokens take the lowest ids the published added tokens leave free (SmolVLM's sit at
    # 0-16 and from 49,152; Qwen's from 151,643), in their own order; fillers take the rest below the last
    free = (i for i in range(top) if i not in reserved)
    vocab: dict[str, int] = {}
    published = {c for _, c, _ in added}
    for token, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]):
        if token in published:  # the tiny BPE's own copy of a published special token: the published id wins
            continue
        i = next(free, None)
        if i is None:
            raise ModelError(f"hub={files.name!r}: the tiny vocabulary ({len(spec['model']['vocab'])}) does not fit "
                             f"below the last special id {top}")
        vocab[token] = i
    for i in free:
        vocab[FILLER.format(i)] = i
    # the published tokens sit in the model's vocabulary at their ids: tokenizers gives an added token
    # that is not in the vocabulary the next id after it, which only matches when they come last (Qwen)
    vocab.update({c: i for i, c, _ in added})
    spec["model"]["vocab"] = vocab
    spec["added_tokens"] = [
        {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": special} for i, c, special in added
    ]
    tok = Tokenizer.from_str(json.dumps(spec))
    tc = files.tokenizer_config

    def name(key: str) -> str | None:
        value = tc.get(key)
        return value.get("content") if isinstance(value, dict) else value

    specials = [c for _, c, special in added if special and c not in (name("eos_token"), name("pad_token"))]
    kwargs = {k: name(k) for k in ("eos_token", "pad_token", "bos_token", "unk_token") if name(k)}
    out = PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=specials, padding_side="left",
                                  model_max_length=tc.get("model_max_length", 32768), **kwargs)
    for i, c, _ in added:
        got = out.convert_tokens_to_ids(c)
        if got != i:
            raise ModelError(f"hub={files.name!r}: token {c!r} got id {got}, published {i}")
    return out


def apply_to_config(config: Any, files: HubFiles) -> None:
    """Real vocabulary size, embedding tying and special-token ids on a tiny model's config."""
    text = config.get_text_config()
    text.vocab_size = files.vocab_size
    config.tie_word_embeddings = files.tie_word_embeddings
    if hasattr(text, "tie_word_embeddings"):
        text.tie_word_embeddings = files.tie_word_embeddings
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        value = files.token_id(key)
        if value is not None and hasattr(config, key):
            setattr(config, key, value)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = files.text_config.get(key)
        if value is not None:
            setattr(text, key, value)


def image_processor_kwargs(files: HubFiles) -> dict[str, Any]:
    """The published Qwen image-processor settings: pixel bounds (either spelling), patch and merge sizes,
    normalisation. They must agree with the vision tower's patch size, which the caller checks."""
    p = files.preprocessor
    size = p.get("size") or {}
    out = {
        "min_pixels": p.get("min_pixels", size.get("shortest_edge")),
        "max_pixels": p.get("max_pixels", size.get("longest_edge")),
        "patch_size": p["patch_size"],
        "temporal_patch_size": p["temporal_patch_size"],
        "merge_size": p["merge_size"],
        "image_mean": p.get("image_mean"),
        "image_std": p.get("image_std"),
    }
    return {k: v for k, v in out.items() if v is not None}


def write_published(out: Path, files: HubFiles) -> None:
    """Put the published generation config in place, verbatim (what `from_pretrained` will merge)."""
    shutil.copyfile(files.folder / "generation_config.json", out / "generation_config.json")
