"""Tiny offline VLMs: build, reload offline, process, forward, generate, 4-bit; and the processor helpers."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image

from lite_srpo.errors import ModelError
from lite_srpo.model.processors import image_token_id, load_processor, model_family, vision_token_ids
from lite_srpo.model.tiny import available_archs, main, make_tiny

ARCHS = available_archs()
QWEN_ARCHS = [a for a in ARCHS if a.startswith("qwen")]
MODEL_CLASS = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
}
VISION_PREFIXES = {"idefics3": ["model.vision_model", "model.connector"]}  # Qwen: ["model.visual"]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """One "test"-size model per arch, shared by the tests of this module (build is ~0.15 s each)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny(arch, root / arch) for arch in ARCHS}


@pytest.fixture
def offline(monkeypatch):
    """HF offline mode, and any attempt to open a network connection fails the test."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _load(path: Path):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path)
    return model.eval(), load_processor(path)


def _prompt(processor, n_images: int = 1, text: str = "How many red circles?") -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def _images_arg(family: str, per_prompt: list[list[Image.Image]]):
    # Idefics3 takes one list of images per prompt; the Qwen processors take them flat.
    return per_prompt if family == "idefics3" else [im for ims in per_prompt for im in ims]


def _image(w: int, h: int, colour=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (w, h), colour)


@pytest.mark.parametrize("arch", ARCHS)
def test_reload_offline_and_forward(arch, tiny_dirs, offline):
    model, proc = _load(tiny_dirs[arch])
    assert type(model).__name__ == MODEL_CLASS[arch]
    assert model_family(model.config) == arch
    assert proc.tokenizer.padding_side == "left"

    text = _prompt(proc)
    if arch == "idefics3":
        assert text == "User:<image>How many red circles?<end_of_utterance>\nAssistant:"
    else:
        assert text == (
            "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
            "How many red circles?<|im_end|>\n<|im_start|>assistant\n"
        )
    enc = proc(text=[text], images=_images_arg(arch, [[_image(56, 56)]]), return_tensors="pt")
    img_id = image_token_id(model.config)
    assert img_id == image_token_id(proc)
    # 56x56 px: Qwen2/2.5 patches of 14 -> 4x4, merged 2x2 -> 4 tokens; Qwen3 resizes to 64x64
    # (multiple of 32) -> 4 tokens; Idefics3 64x64 -> 4x4 patches of 16, pixel shuffle 2 -> 4 tokens.
    assert int((enc["input_ids"] == img_id).sum()) == 4

    if arch == "idefics3":
        assert "mm_token_type_ids" not in enc
    else:
        # The Qwen processors mark image placeholders with 1; it must reach every forward.
        assert torch.equal(enc["mm_token_type_ids"].bool(), enc["input_ids"] == img_id)

    with torch.no_grad():
        logits = model(**enc).logits  # [1, T, V]
    assert logits.shape == (1, enc["input_ids"].shape[1], len(proc.tokenizer))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_generates_without_vision_tokens(arch, tiny_dirs, offline):
    model, proc = _load(tiny_dirs[arch])
    suppress = vision_token_ids(proc, model.config)
    # Push the suppressed ids to the top of every distribution, so that only suppression keeps them out.
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: out.index_add(
        -1, torch.tensor(suppress), torch.full((*out.shape[:-1], len(suppress)), 50.0)))
    try:
        texts = [_prompt(proc, text="What colour is the bar?"), _prompt(proc, text="Count.")]
        images = _images_arg(arch, [[_image(56, 56)], [_image(84, 56, (20, 200, 20))]])
        enc = proc(text=texts, images=images, return_tensors="pt", padding=True)
        assert enc["attention_mask"][1, 0] == 0 and enc["attention_mask"][:, -1].all()  # left padding

        with torch.no_grad():
            top = model(**enc).logits[:, -1].argmax(-1)  # [2]
        assert all(int(t) in suppress for t in top)

        torch.manual_seed(0)
        out = model.generate(
            **enc, do_sample=True, max_new_tokens=8, min_new_tokens=8, suppress_tokens=suppress
        )
    finally:
        hook.remove()
    new = out[:, enc["input_ids"].shape[1]:]  # [2, 8]
    assert new.shape == (2, 8)
    assert not torch.isin(new, torch.tensor(suppress)).any()


def test_vision_token_ids_by_family(tiny_dirs):
    for arch in ARCHS:
        proc = load_processor(tiny_dirs[arch])
        config = json.loads((tiny_dirs[arch] / "config.json").read_text())
        tok = proc.tokenizer
        ids = vision_token_ids(proc, config)
        if arch == "idefics3":
            names = ["<image>", "<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<row_6_col_6>"]
            assert len(ids) == 3 + 36
        else:
            names = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
            assert len(ids) == 4
        assert {tok.convert_tokens_to_ids(n) for n in names} <= set(ids)
        assert tok.eos_token_id not in ids and tok.pad_token_id not in ids


@pytest.mark.parametrize("arch", ARCHS)
def test_two_images_in_one_prompt(arch, tiny_dirs, offline):
    model, proc = _load(tiny_dirs[arch])
    text = _prompt(proc, n_images=2, text="Which is larger?")
    enc = proc(text=[text], images=_images_arg(arch, [[_image(56, 56), _image(56, 84)]]), return_tensors="pt")
    n_img = int((enc["input_ids"] == image_token_id(proc)).sum())
    if arch == "idefics3":
        assert n_img == 4 + 4  # every image is resized to the same 64x64 square
    else:
        assert enc["image_grid_thw"].shape == (2, 3)
        # Qwen2/2.5: 56x56 -> 4 tokens, 56x84 -> 2x3 = 6 tokens. Qwen3: 64x64 -> 4, 64x96 -> 6.
        assert n_img == 4 + 6 == int(enc["image_grid_thw"].prod(-1).sum()) // 4
    with torch.no_grad():
        assert torch.isfinite(model(**enc).logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_4bit_load_forwards(arch, tiny_dirs, offline):
    import bitsandbytes as bnb
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    vision = VISION_PREFIXES.get(arch, ["model.visual"])
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=[*vision, "lm_head"],
    )
    q = AutoModelForImageTextToText.from_pretrained(tiny_dirs[arch], quantization_config=quant, device_map="cpu")
    four_bit = [n for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    lm = "model.text_model." if arch == "idefics3" else "model.language_model."
    # 2 layers x (q, k, v, o, gate, up, down), all in the language model, none in the vision tower.
    assert len(four_bit) == 14 and all(n.startswith(lm) for n in four_bit)

    model, proc = _load(tiny_dirs[arch])
    enc = proc(text=[_prompt(proc)], images=_images_arg(arch, [[_image(56, 56)]]), return_tensors="pt")
    with torch.no_grad():
        got, ref = q(**enc).logits, model(**enc).logits
    assert got.shape == ref.shape and torch.isfinite(got).all()
    # nf4 error on these tiny random weights is ~0.1 in the logits; a broken load is far off.
    assert (got - ref).abs().max() < 0.5


def test_llm_linear_widths_are_multiples_of_64(tmp_path):
    for size in ("test", "demo"):
        model, _ = _load(make_tiny("qwen2_5_vl", tmp_path / size, size=size))
        widths = {
            n: m.in_features
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and (n.startswith("model.language_model") or n == "lm_head")
        }
        assert len(widths) == 7 * model.config.text_config.num_hidden_layers + 1
        assert all(w % 64 == 0 for w in widths.values()), widths


def test_demo_size(tmp_path, offline):
    path = make_tiny("qwen2_5_vl", tmp_path / "demo", size="demo")
    model, proc = _load(path)
    cfg = model.config.text_config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (128, 256, 4)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert sum(cfg.rope_parameters["mrope_section"]) == 128 // 4 // 2  # head_dim / 2
    assert model.config.vision_config.hidden_size == 64 and model.config.vision_config.depth == 2
    assert len(proc.tokenizer) == 1024
    enc = proc(text=[_prompt(proc)], images=[_image(112, 112)], return_tensors="pt")
    assert int((enc["input_ids"] == image_token_id(proc)).sum()) == 16  # 8x8 patches of 14, merged 2x2


def test_seed_controls_weights_not_tokenizer(tmp_path):
    from safetensors.torch import load_file

    a = make_tiny("qwen2_5_vl", tmp_path / "a", seed=0)
    b = make_tiny("qwen2_5_vl", tmp_path / "b", seed=0)
    c = make_tiny("qwen2_5_vl", tmp_path / "c", seed=1)
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # Saved in the hub's key layout ("model.layers.*", "visual.*"), as real Qwen2.5-VL checkpoints are.
    assert not torch.equal(wa["model.layers.0.self_attn.q_proj.weight"], wc["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(wa["visual.blocks.0.attn.qkv.weight"], wc["visual.blocks.0.attn.qkv.weight"])
    assert (a / "tokenizer.json").read_text() == (c / "tokenizer.json").read_text()


def test_tokenizer_pieces(tiny_dirs):
    tok = load_processor(tiny_dirs["qwen2_5_vl"]).tokenizer
    assert len(tok) == 512
    ids = tok("2026", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["2", "0", "2", "6"]  # digits are single tokens
    text = "<perception> 3 red circles </perception> <think> 3 + 4 = 7 </think> \\boxed{7}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert "<think>" not in tok.all_special_tokens  # learned as plain text, not special
    for special in ("<|im_start|>", "<|im_end|>", "<|image_pad|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text


def test_generation_config_and_saved_names(tiny_dirs):
    for arch, eos in (("qwen2_5_vl", "<|im_end|>"), ("idefics3", "<end_of_utterance>")):
        path = tiny_dirs[arch]
        tok = load_processor(path).tokenizer
        gen = json.loads((path / "generation_config.json").read_text())
        assert gen["eos_token_id"] == tok.convert_tokens_to_ids(eos)
        assert gen["pad_token_id"] == tok.convert_tokens_to_ids("<|endoftext|>")
        stock = "Idefics3Processor" if arch == "idefics3" else "Qwen2_5_VLProcessor"
        for name in ("processor_config.json", "tokenizer_config.json"):
            assert json.loads((path / name).read_text())["processor_class"] == stock


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "idefics3"])
def test_load_processor_hub_layout(arch, tiny_dirs, tmp_path, offline):
    """Hub checkpoints keep image settings in preprocessor_config.json, the template in chat_template.json,
    and only other processor settings (Idefics3's image_seq_len) in processor_config.json."""
    hub = tmp_path / "hub"
    shutil.copytree(tiny_dirs[arch], hub)
    saved = json.loads((hub / "processor_config.json").read_text())
    (hub / "processor_config.json").unlink()
    image_cfg = {**saved.pop("image_processor"), "processor_class": saved["processor_class"]}
    (hub / "preprocessor_config.json").write_text(json.dumps(image_cfg))
    if len(saved) > 1:
        (hub / "processor_config.json").write_text(json.dumps(saved))
    template = (hub / "chat_template.jinja").read_text()
    (hub / "chat_template.jinja").unlink()
    (hub / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    tok_cfg = json.loads((hub / "tokenizer_config.json").read_text())
    tok_cfg.pop("padding_side")
    (hub / "tokenizer_config.json").write_text(json.dumps(tok_cfg))

    proc = load_processor(hub)
    assert proc.tokenizer.padding_side == "left"
    enc = proc(text=[_prompt(proc)], images=_images_arg(arch, [[_image(56, 56)]]), return_tensors="pt")
    assert int((enc["input_ids"] == image_token_id(proc)).sum()) == 4


def test_processor_resaves_and_reloads(tiny_dirs, tmp_path):
    proc = load_processor(tiny_dirs["qwen2_vl"])
    out = tmp_path / "export"
    proc.save_pretrained(out)
    shutil.copy(tiny_dirs["qwen2_vl"] / "config.json", out / "config.json")
    again = load_processor(out)
    assert type(again) is type(proc)
    assert again.chat_template == proc.chat_template
    assert json.loads((out / "processor_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"


def test_model_family_and_errors():
    assert model_family({"model_type": "qwen2_5_vl"}) == "qwen2_5_vl"
    assert model_family({"model_type": "smolvlm"}) == "idefics3"
    with pytest.raises(ModelError, match="llava"):
        model_family({"model_type": "llava"})
    with pytest.raises(ModelError, match="qwen2_vl"):
        make_tiny("llava", "/nonexistent")
    with pytest.raises(ModelError, match="demo"):
        make_tiny("qwen2_vl", "/nonexistent", size="huge")
    with pytest.raises(ModelError, match="image_token_id"):
        image_token_id({"model_type": "qwen2_vl"})


def test_cli_main(tmp_path, capsys):
    assert main(["--arch", "idefics3", "--size", "test", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= {
        p.name for p in (tmp_path / "m").iterdir()
    }
    with pytest.raises(SystemExit):
        main(["--arch", "llava", str(tmp_path / "x")])


PUBLISHED = [  # checkpoint, tiny arch, vocabulary, tied embeddings, image token id, eos token (the checkpoints' own facts)
    ("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", 152064, False, 151655, "<|im_end|>"),
    ("Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl", 151936, True, 151655, "<|im_end|>"),
    ("Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl", 151936, True, 151655, "<|im_end|>"),
    ("Qwen/Qwen3-VL-4B-Instruct", "qwen3_vl", 151936, True, 151655, "<|im_end|>"),
    ("HuggingFaceTB/SmolVLM-256M-Instruct", "idefics3", 49280, False, 49190, "<end_of_utterance>"),
]


@pytest.mark.parametrize("name,arch,vocab,tie,image_id,eos", PUBLISHED, ids=[p[0].split("/")[1] for p in PUBLISHED])
def test_hub_option_carries_the_published_files(tmp_path, name, arch, vocab, tie, image_id, eos):
    """make_tiny(hub=...): the published generation config verbatim, the real vocabulary, tying and
    special-token ids (every published added token at its published id, including SmolVLM's at 0-16),
    the published pixel bounds and the chat template."""
    import json

    from transformers import AutoConfig

    from lite_srpo.model.processors import load_processor

    from lite_srpo.model.tiny import make_tiny
    from lite_srpo.model.tiny_hub import folder_of, load_hub_files

    out = make_tiny(arch, tmp_path / name.split("/")[1], hub=name)
    assert json.loads((out / "generation_config.json").read_text()) == json.loads(
        (folder_of(name) / "generation_config.json").read_text())
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.get_text_config().vocab_size == vocab and cfg.tie_word_embeddings == tie
    assert cfg.image_token_id == image_id
    proc = load_processor(str(out))
    assert proc.tokenizer.eos_token == eos
    for i, content, _ in load_hub_files(name).added_tokens():
        assert proc.tokenizer.convert_tokens_to_ids(content) == i, content
    if arch == "idefics3":
        return  # the tiny Idefics3 keeps its own image side (its tower is tiny); SmolVLM's template is checked above
    assert cfg.vision_start_token_id == 151652
    size = json.loads((out / "processor_config.json").read_text())["image_processor"]["size"]
    published = json.loads((folder_of(name) / "preprocessor_config.json").read_text())
    assert (size["shortest_edge"], size["longest_edge"]) == (
        published.get("min_pixels", published.get("size", {}).get("shortest_edge")),
        published.get("max_pixels", published.get("size", {}).get("longest_edge")))
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], tokenize=False)
    assert text.startswith("<|im_start|>")
    if arch == "qwen2_5_vl":
        assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
