"""The emulation itself (cuda_emulation.py): the CUDA rules the other fake_cuda tests rely on it to enforce,
and the devices it must leave alone (a `meta` tensor once came out as uninitialised CPU memory, which gave a
model garbage rotary tables and NaN log-probs now and then)."""
from __future__ import annotations

import pytest
import torch

from .conftest import CUDA0
from .cuda_emulation import fake_cuda, is_emulated_cuda

pytestmark = pytest.mark.fake_cuda


def test_cuda_tensors_keep_dtype_shape_and_values():
    host = torch.randn(3, 4)
    with fake_cuda(), torch.no_grad():
        x = host.to("cuda", torch.bfloat16)
        assert is_emulated_cuda(x) and x.device == CUDA0 and x.is_cuda and x.dtype is torch.bfloat16
        y = (x @ x.T).float()
        assert y.device == CUDA0 and y.shape == (3, 3) and y.dtype is torch.float32
        assert torch.equal(y.cpu(), (host.bfloat16() @ host.bfloat16().T).float())
        assert torch.zeros(2, device="cuda").device == CUDA0 and x.new_ones(2).device == CUDA0
        assert not is_emulated_cuda(x.cpu()) and x.cpu().device.type == "cpu"
        assert x.sum().item() == pytest.approx(host.bfloat16().float().sum().item(), abs=0.1)


def test_ops_that_mix_devices_fail_as_on_a_gpu():
    with fake_cuda(), torch.no_grad():
        x = torch.ones(3, device="cuda")
        with pytest.raises(RuntimeError, match="same device"):
            x + torch.ones(3)
        with pytest.raises(RuntimeError, match="same device"):
            x + torch.ones(3, device="cuda:1")
        with pytest.raises(RuntimeError, match="generator"):
            torch.rand(3, device="cuda", generator=torch.Generator())
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        assert torch.equal((x + torch.tensor(2.0)).cpu(), torch.full((3,), 3.0))  # a 0-dim CPU tensor is a scalar
        x[torch.tensor([0])] = torch.tensor([5.0])  # indexing and assignment cross devices, as on CUDA
        host = torch.zeros(3)
        assert host.copy_(x) is host and torch.equal(host, torch.tensor([5.0, 1.0, 1.0]))


def test_in_place_views_and_moves_between_cards():
    with fake_cuda(), torch.no_grad():
        x = torch.zeros(2, 3, device="cuda")
        assert x.add_(1) is x
        x[:, 0].mul_(7)  # a view writes through to its base
        assert x.cpu()[:, 0].tolist() == [7.0, 7.0]
        y = x.to("cuda:1")
        assert y is not x and y.device == torch.device("cuda", 1)
        y.zero_()
        assert x.sum().item() == 18.0  # a copy to another card is a copy
        assert x.to("cuda:0") is x and x.to(torch.float32) is x


def test_cpu_and_meta_tensors_are_left_alone():
    with fake_cuda(), torch.no_grad():
        m = torch.empty(4, device="meta")
        assert m.device.type == "meta" and m.to("meta").device.type == "meta"
        with torch.device("meta"):
            assert torch.arange(3.0).device.type == "meta"
        c = torch.arange(4.0, device="cpu")
        assert not is_emulated_cuda(c) and c.to("cpu") is c


def test_autograd_is_refused_rather_than_silently_dropped():
    with fake_cuda():
        w = torch.nn.Parameter(torch.ones(3, device="cuda"))
        assert w.device == CUDA0 and w.requires_grad
        with pytest.raises(RuntimeError, match="no-grad"):
            (w * 2).sum()
        with torch.no_grad():
            assert (w * 2).sum().item() == 6.0
