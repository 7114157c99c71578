"""Export on tiny models: adapter and merged exports reproduce the trained adapter model; bad input writes nothing."""
import json
import os
import subprocess
import sys
import textwrap

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_recipe
from lite_srpo.config import config_from_dict, dump_yaml
from lite_srpo.data.prompts import ResponseFormat
from lite_srpo.errors import LiteSrpoError, ModelError
from lite_srpo.model.export.cli import export_main
from lite_srpo.model.export.source import ExportError, resolve_checkpoint
from lite_srpo.model.export.verify import compare_logits, probe_inputs, within_tolerance
from lite_srpo.model.policy import load_policy
from lite_srpo.model.processors import load_processor
from lite_srpo.rewards import builtin as rewards
from lite_srpo.run.checkpoint import save_checkpoint

FMT = ResponseFormat()


@pytest.fixture(scope="module")
def trained_run(tiny_qwen, tmp_path_factory):
    """Two real RL steps on the 4-bit tiny model, a checkpoint after each.

    PAPO with conftest's length reward: its perception-KL term has a gradient even when all rewards of a
    group are equal; with Adam at lr 0.05 that moves LoRA B clearly away from zero.
    """
    from lite_srpo.rl.train import train

    root = tmp_path_factory.mktemp("runs4")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(rewards.REWARD_FUNCTIONS, "test_length", lambda response, sample, fmt: len(response) / 50.0)
        cfg = config_from_dict(tiny_recipe(tiny_qwen, root, train__steps=2, train__save_every=1, optim__lr=0.05,
                                           algorithm__name="papo", rollout__prompts_per_step=1,
                                           rollout__max_new_tokens=4, model__gradient_checkpointing=False))
        train(cfg, quiet=True)
    return cfg.run_dir


@pytest.fixture(scope="module")
def full_precision_run(tiny_qwen, tmp_path_factory):
    """A non-4-bit run whose checkpoint holds a clearly non-zero adapter (seeded random LoRA weights)."""
    root = tmp_path_factory.mktemp("runs32")
    cfg = config_from_dict(tiny_recipe(tiny_qwen, root, model__load_in_4bit=False, reward__weights={"accuracy": 1.0}))
    policy = load_policy(cfg.model, cfg.lora)
    gen = torch.Generator().manual_seed(0)
    for name, p in policy.model.named_parameters():
        if "lora_" in name:
            p.data += 0.1 * torch.randn(p.shape, generator=gen)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "recipe.yaml").write_text(dump_yaml(cfg))
    opt = torch.optim.AdamW(policy.trainable_parameters())
    save_checkpoint(cfg.run_dir, 1, policy.model, opt, None, dump_yaml(cfg), metrics={"reward/mean": 0.5})
    return cfg.run_dir


@pytest.fixture(scope="module")
def merged_4bit(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "merged"
    assert export_main([str(trained_run), "--mode", "merged", "--out", str(out), "--quantize", "4bit",
                        "--max-shard-size", "300KB"]) == 0
    return out


def adapter_model_logits(ckpt, inputs):
    """Logits of the trained adapter model, loaded the way training loads it (independent of export.py)."""
    src = resolve_checkpoint(ckpt)
    policy = load_policy(src.cfg.model, src.cfg.lora, adapter_path=str(src.adapter_dir), trainable=False)
    policy.model.eval()
    with torch.no_grad():
        return policy.model(**inputs).logits


def lora_norm(adapter_dir):
    return sum(float(t.abs().sum()) for k, t in load_file(str(adapter_dir / "adapter_model.safetensors")).items()
               if "lora_B" in k)


def test_adapter_export_reloads_identically(trained_run, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert export_main([str(trained_run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max |Δlogit| = 0 " in printed and "peak memory" in printed
    ckpt = trained_run / "checkpoints" / "step_000002"
    exported, trained = (load_file(str(d / "adapter_model.safetensors")) for d in (out, ckpt / "adapter"))
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    assert lora_norm(out) > 1.0, "two steps at lr 0.05 should have moved LoRA B away from zero"
    info = json.loads((out / "export.json").read_text())
    assert info["mode"] == "adapter" and info["step"] == 2 and info["verification"]["max_abs_diff"] == 0.0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == info["base"]
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "algorithm:" in card and "## Training metrics at step 2" in card
    assert (out / "chat_template.jinja").is_file() and (out / "tokenizer.json").is_file()
    # a user's reload: fresh 4-bit base + exported adapter + exported processor == the trained model
    processor = load_processor(info["base"])
    inputs = probe_inputs(processor, FMT)
    from peft import PeftModel

    from lite_srpo.config import ModelConfig
    from lite_srpo.model.policy import load_base

    base, _, _ = load_base(ModelConfig(path=info["base"], load_in_4bit=True, dtype="float32"))
    with torch.no_grad():
        mine = PeftModel.from_pretrained(base, str(out)).eval()(**inputs).logits
    assert torch.equal(mine, adapter_model_logits(ckpt, inputs))


def test_merged_4bit_export_matches_adapter_model_without_peft(merged_4bit, trained_run, tmp_path):
    config = json.loads((merged_4bit / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (merged_4bit / "model.safetensors.index.json").is_file(), "300KB shards should give a sharded save"
    weights = {}
    for shard in merged_4bit.glob("model-*.safetensors"):
        weights.update(load_file(str(shard)))
    assert weights and not any("lora_" in k for k in weights)
    assert all(t.dtype == torch.float32 for t in weights.values())
    info = json.loads((merged_4bit / "export.json").read_text())
    assert info["verification"]["passed"] and info["verification"]["max_abs_diff"] < 1e-4
    assert info["peak_rss_gib"] >= info["peak_anon_gib"] > 0
    assert set(info["peak_by_stage"]) == {"reference", "merge", "verify", "quantize"}

    inputs = probe_inputs(load_processor(merged_4bit), FMT)
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent("""
        import sys
        sys.modules["peft"] = None  # `import peft` raises ImportError; importlib.util.find_spec says it is absent
        import torch
        from transformers import AutoModelForImageTextToText
        from transformers.utils import is_peft_available
        assert not is_peft_available()
        model = AutoModelForImageTextToText.from_pretrained(sys.argv[1]).eval()
        assert all(type(m).__name__ != "Linear4bit" for m in model.modules())
        with torch.no_grad():
            torch.save(model(**torch.load(sys.argv[2])).logits, sys.argv[3])
        try:
            import peft
        except ImportError:
            print("no peft")
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(merged_4bit), str(tmp_path / "inputs.pt"),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no peft" in proc.stdout
    merged_logits = torch.load(tmp_path / "logits.pt")
    reference = adapter_model_logits(trained_run / "checkpoints" / "step_000002", inputs)
    mask = inputs["attention_mask"].bool()
    assert (merged_logits - reference)[mask].abs().max() < 1e-4


def test_quantized_copy_is_labelled_4bit(merged_4bit):
    q = merged_4bit / "4bit"
    config = json.loads((q / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert "QUANTIZED" in (q / "README.md").read_text() and "not bit-exact" in (q / "README.md").read_text()
    info = json.loads((merged_4bit / "export.json").read_text())
    # re-quantizing W + BA moves logits: reported, never passed off as exact (anchors.md §7.4)
    assert info["quantized_copy"]["max_abs_diff"] > info["verification"]["max_abs_diff"]
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(q), device_map={"": "cpu"})
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_merged_full_precision_export_matches(full_precision_run, tmp_path):
    out = tmp_path / "merged32"
    assert export_main([str(full_precision_run), "--mode", "merged", "--out", str(out)]) == 0
    from transformers import AutoModelForImageTextToText

    inputs = probe_inputs(load_processor(out), FMT)
    with torch.no_grad():
        merged = AutoModelForImageTextToText.from_pretrained(str(out)).eval()(**inputs).logits
    reference = adapter_model_logits(full_precision_run / "checkpoints" / "step_000001", inputs)
    mask = inputs["attention_mask"].bool()
    base_logits = _base_logits(full_precision_run, inputs)
    assert (merged - reference)[mask].abs().max() < 1e-4
    assert (base_logits - reference)[mask].abs().max() > 1e-2, "the adapter must matter for this test to mean much"


def _base_logits(run_dir, inputs):
    from lite_srpo.model.policy import load_base

    cfg = resolve_checkpoint(run_dir).cfg
    base, _, _ = load_base(cfg.model)
    with torch.no_grad():
        return base.eval()(**inputs).logits


def test_export_from_the_middle_of_a_run(trained_run, tmp_path):
    step1, step2 = (trained_run / "checkpoints" / f"step_00000{s}" for s in (1, 2))
    out = tmp_path / "mid"
    assert export_main([str(step1), "--out", str(out)]) == 0
    info = json.loads((out / "export.json").read_text())
    assert info["step"] == 1 and info["checkpoint"] == str(step1) and info["verification"]["max_abs_diff"] == 0.0
    assert "step 1 of 2" in (out / "README.md").read_text()
    exported, first, last = (load_file(str(d / "adapter_model.safetensors"))
                             for d in (out, step1 / "adapter", step2 / "adapter"))
    assert all(torch.equal(exported[k], first[k]) for k in first)
    assert any(not torch.equal(exported[k], last[k]) for k in last), "step 2 changed the adapter"


def test_run_without_checkpoint_is_an_error(tiny_qwen, tmp_path):
    run = tmp_path / "empty_run"
    run.mkdir()
    (run / "recipe.yaml").write_text(dump_yaml(config_from_dict(tiny_recipe(tiny_qwen, tmp_path))))  # no checkpoints/
    with pytest.raises(ExportError, match="no checkpoint"):
        export_main([str(run), "--out", str(tmp_path / "x")])
    with pytest.raises(ExportError, match="not a run"):
        export_main([str(tmp_path), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_non_empty_output_needs_force_and_force_replaces(full_precision_run, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_main([str(full_precision_run), "--out", str(out)])
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert export_main([str(full_precision_run), "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))
    with pytest.raises(ExportError, match="would replace"):  # --force must never delete the run it reads
        export_main([str(full_precision_run), "--out", str(full_precision_run.parent), "--force"])
    assert (full_precision_run / "checkpoints").is_dir()


def test_mismatched_base_is_a_clear_error_and_writes_nothing(full_precision_run, tiny_factory, tmp_path):
    other = tiny_factory("qwen2_5_vl", "demo")  # same architecture, hidden 128 instead of 64
    out = tmp_path / "mismatch"
    with pytest.raises(ModelError, match=r"does not fit base .*in_features=64, the base has 128"):
        export_main([str(full_precision_run), "--mode", "merged", "--out", str(out), "--base", str(other)])
    with pytest.raises(ModelError, match="not found"):
        export_main([str(full_precision_run), "--out", str(out), "--base", str(tmp_path / "nowhere")])
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_failed_verification_fails_loudly_and_writes_nothing(full_precision_run, tmp_path):
    out = tmp_path / "strict"
    with pytest.raises(ExportError, match="verification FAILED"):
        export_main([str(full_precision_run), "--mode", "merged", "--out", str(out), "--tolerance", "0"])
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(LiteSrpoError, match="needs --mode merged"):
        export_main([str(full_precision_run), "--out", str(out), "--quantize", "4bit"])


def test_compare_logits_tolerance_is_relative_above_unit_scale():
    ref = torch.tensor([[[0.5, -0.2], [9.0, 20.0]]])  # [B=1, L=2, V=2]
    exp = ref + torch.tensor([[[0.0, 0.0], [0.0, 0.3]]])
    mask = torch.tensor([[1, 1]])
    cmp = compare_logits(ref, exp, mask)
    assert cmp["max_abs_diff"] == pytest.approx(0.3, rel=1e-5) and cmp["logit_scale"] == 20.0
    assert cmp["top1_agreement"] == 1.0
    assert within_tolerance(cmp, 0.02)  # 0.3 <= 0.02 * 20 = 0.4
    assert not within_tolerance(cmp, 0.01)  # 0.3 > 0.01 * 20 = 0.2
    masked = compare_logits(ref, exp, torch.tensor([[1, 0]]))  # only the first token counts
    assert masked["max_abs_diff"] == 0.0 and masked["tokens"] == 1
    assert within_tolerance(masked, 0.0)
