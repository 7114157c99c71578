"""The live-bytes counter of the step trace, and the meta 4-bit model it counts (real bitsandbytes layers)."""
from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from lite_srpo.model.chunking import NF4_DQ_BYTES_PER_PARAM
from lite_srpo.model.memory.live_bytes import LiveBytes
from lite_srpo.model.meta_model import meta_base, quantize_on_meta, read_config
from lite_srpo.model.tiny_hub import PUBLISHED_DIR

MIB = 2**20


def test_counts_each_storage_once_and_drops_it_when_freed():
    lb = LiveBytes()
    with lb:
        a = torch.empty(1024, 256, device="meta")  # 1 MiB of fp32
        assert lb.live == MIB
        view = a.view(-1)[: 10]  # views share the storage
        a.add_(1)  # in place: same storage
        assert lb.live == MIB
        b = a * 2
        assert lb.live == 2 * MIB and lb.peak == 2 * MIB
        del b
        assert lb.live == MIB
        del a
        assert lb.live == MIB  # the view keeps the storage alive
        del view
        assert lb.live == 0 and lb.peak == 2 * MIB
        cpu = torch.empty(1024, 256)  # another device: not counted
        assert lb.live == 0 and cpu.numel()


def test_phase_peaks_host_buffers_and_backward():
    lb = LiveBytes()
    layer = torch.nn.Linear(512, 512, bias=False, device="meta")  # made before the mode: tracked by hand
    lb.track_module(layer)
    assert lb.live == MIB
    with lb:
        with lb.phase("forward") as rec:
            x = torch.empty(256, 512, device="meta", requires_grad=True)  # 0.5 MiB
            y = layer(x)  # 0.5 MiB, saved x for the weight's grad
            loss = y.sum()
        assert rec.start_bytes == MIB and rec.peak_bytes >= 2 * MIB
        with lb.phase("backward") as back:
            loss.backward()
        assert layer.weight.grad is not None and back.peak_bytes >= lb.live >= 2 * MIB + MIB  # the grad: 1 MiB
        with lb.host():
            pinned = torch.empty(1024, 256, device="meta")
        assert lb.host_live == MIB and pinned.numel()


def test_scalar_reads_are_refused_except_for_metrics():
    lb = LiveBytes()
    with lb:
        t = torch.ones(3, device="meta")
        with pytest.raises(Exception):
            float(t.sum())
        with lb.metric_scalars():
            assert float(t.sum()) == 1.0


def test_meta_4bit_weights_hold_the_bytes_of_double_quantized_nf4():
    """The hand-built Params4bit has bitsandbytes' storage layout; the planner's constant must match it."""
    linear = torch.nn.Linear(3584, 18944, bias=False, device="meta")
    holder = torch.nn.Module()
    holder.proj = linear
    assert quantize_on_meta(holder, [], torch.bfloat16) == 1
    assert isinstance(holder.proj, bnb.nn.Linear4bit)
    lb = LiveBytes()
    lb.track_module(holder)
    n = 3584 * 18944
    assert lb.live == pytest.approx(n * NF4_DQ_BYTES_PER_PARAM, rel=1e-4)
    with LiveBytes(), torch.no_grad():
        out = holder.proj(torch.empty(2, 5, 3584, dtype=torch.bfloat16, device="meta"))
    assert out.shape == (2, 5, 18944) and out.dtype == torch.bfloat16


def test_the_7b_base_on_meta_is_quantized_as_load_base_would_quantize_it():
    config = read_config(PUBLISHED_DIR / "Qwen--Qwen2.5-VL-7B-Instruct")
    model, family = meta_base(config, torch.bfloat16, load_in_4bit=True)
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert family == "qwen2_5_vl" and len(quantized) == 7 * config["num_hidden_layers"]
    assert all(".language_model.layers." in n for n in quantized)  # never the vision tower or the lm_head
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.shape == (152064, 3584)
    assert all(p.device.type == "meta" and not p.requires_grad for p in model.parameters())
