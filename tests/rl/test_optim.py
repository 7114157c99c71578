"""Which optimizer a recipe gets: `auto` is paged 8-bit AdamW on CUDA and AdamW on CPU. bitsandbytes'
8-bit optimizers also run on CPU, so each choice is built and stepped here for real (only the paging of
optimizer state to host memory needs a GPU)."""
from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from lite_srpo.config import OptimConfig
from lite_srpo.rl.optim import build_optimizer


@pytest.mark.parametrize("name, device, expected", [
    ("auto", "cpu", torch.optim.AdamW),
    ("auto", "cuda", bnb.optim.PagedAdamW8bit),  # the CUDA default; the class is chosen without touching CUDA
    ("adamw", "cuda", torch.optim.AdamW),
    ("adamw8bit", "cpu", bnb.optim.AdamW8bit),
    ("paged_adamw8bit", "cpu", bnb.optim.PagedAdamW8bit),
])
def test_optimizer_selection(name, device, expected):
    params = [torch.nn.Parameter(torch.randn(64, 64))]
    cfg = OptimConfig(optimizer=name, lr=1e-3, weight_decay=0.01, betas=[0.9, 0.95])
    opt = build_optimizer(params, cfg, torch.device(device))
    assert type(opt) is expected
    group = opt.param_groups[0]
    assert group["lr"] == 1e-3 and group["weight_decay"] == 0.01 and tuple(group["betas"]) == (0.9, 0.95)
    if device == "cpu":  # one real step moves the weights
        before = params[0].detach().clone()
        params[0].grad = torch.randn(64, 64)
        opt.step()
        assert not torch.equal(before, params[0].detach())
