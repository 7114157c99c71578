"""The CUDA branches around a step: CUDA RNG state in checkpoints and OOM snapshots, offloaded activations,
the optimizer choice, `train.auto_fit` on a 24 GiB card, and which card each rank uses.

The branches run on the CUDA build of torch, with emulated cuda tensors where tensors are involved. Where a
branch asks the driver something this machine cannot answer (a GPU count, a card's memory, the CUDA
generators), only that call is replaced, by a stand-in that says what it stands for (conftest.py,
`FakeCudaState` in the root conftest); each test first shows what the driverless call does without it."""
from __future__ import annotations

import logging
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import FakeCudaState
from lite_srpo.config import OptimConfig, load_config
from lite_srpo.model.activation_memory import ActivationOffload
from lite_srpo.model.memory.fit import auto_fit
from lite_srpo.model.memory.plan import plan
from lite_srpo.model.policy import pick_device
from lite_srpo.rl.optim import build_optimizer
from lite_srpo.rl.passes import rows_logprobs
from lite_srpo.run import checkpoint as ckpt
from lite_srpo.run import distributed
from lite_srpo.run.runtime import restore_before_step, state_before_step

from .conftest import CUDA0, CudaGenerators, FakeCards, load_on_cuda
from .cuda_emulation import fake_cuda, is_emulated_cuda
from .test_cuda_rollout import rollout

pytestmark = pytest.mark.fake_cuda
RECIPE_7B = Path(__file__).resolve().parents[2] / "recipes" / "qwen2_5_vl_7b_srpo_24gb.yaml"
NO_DRIVER = "NVIDIA driver"  # what the CUDA build says when a call needs the driver


def tiny_trainer() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """A LoRA model, its optimizer and scheduler: the objects `save_checkpoint` stores with the RNG states."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0", "2"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------------------ CUDA RNG state


def test_without_a_driver_torch_has_no_cuda_generators_to_save():
    """Why the generators need a stand-in: on this build `get_rng_state_all` is empty and `get_rng_state`
    raises, and the checkpoint's `torch.cuda.is_available()` guard keeps the branch off."""
    assert not torch.cuda.is_available() and torch.cuda.get_rng_state_all() == []
    with pytest.raises(RuntimeError, match=NO_DRIVER):
        torch.cuda.get_rng_state(0)
    assert "cuda" not in ckpt.rng_state()


def test_checkpoint_saves_every_cuda_generator_and_resume_puts_them_back(monkeypatch, tmp_path):
    gens = CudaGenerators(count=2).install(monkeypatch)
    gens.draw(0)
    saved = gens.get_rng_state_all()
    model, opt, sched = tiny_trainer()
    path = ckpt.save_checkpoint(tmp_path, 3, model, opt, sched, "name: t\n")
    state = ckpt.load_trainer_state(path)  # weights_only=True: the CUDA states are plain uint8 tensors
    assert same(state["rng"]["cuda"], saved) and all(s.dtype is torch.uint8 for s in state["rng"]["cuda"])
    gens.draw(0), gens.draw(1)  # the run went on drawing after the save
    assert not same(gens.states, saved)
    ckpt.restore(path, model, opt, sched)
    assert same(gens.states, saved) and gens.sets == 1


def test_an_out_of_memory_retry_restores_the_cuda_generators(monkeypatch):
    gens = CudaGenerators(count=1).install(monkeypatch)
    model, opt, sched = tiny_trainer()
    params = [p for p in model.parameters() if p.requires_grad]
    before = state_before_step(params, opt, sched)
    saved = gens.get_rng_state_all()
    gens.draw(0)  # the failed step's rollout sampled on the card
    restore_before_step(params, opt, sched, before)
    assert same(gens.states, saved)  # the retried step draws the same samples


def test_a_cpu_checkpoint_resumes_on_a_gpu_without_touching_its_generators(monkeypatch, tmp_path):
    model, opt, sched = tiny_trainer()
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, "name: t\n")  # written without a GPU
    assert "cuda" not in ckpt.load_trainer_state(path)["rng"]
    gens = CudaGenerators(count=2).install(monkeypatch)
    fresh = gens.get_rng_state_all()
    ckpt.restore(path, model, opt, sched)
    assert gens.sets == 0 and same(gens.states, fresh)


def test_a_gpu_checkpoint_resumes_on_this_driverless_build_without_deferred_cuda_calls(monkeypatch, tmp_path):
    """Without a driver torch does not refuse `set_rng_state_all`: it queues the call until CUDA initialises
    (`torch.cuda._queued_calls`), which here never happens. The restore's `is_available()` guard must keep
    the saved CUDA states out of that queue (remove the guard and this fails)."""
    model, opt, sched = tiny_trainer()
    with monkeypatch.context() as m:
        CudaGenerators(count=2).install(m)
        path = ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, "name: t\n")  # written on a 2-GPU node
    state = ckpt.load_trainer_state(path)
    assert len(state["rng"]["cuda"]) == 2
    queued = len(torch.cuda._queued_calls)
    try:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])  # what an unguarded restore would do
        assert len(torch.cuda._queued_calls) == queued + 2, "this build no longer defers CUDA RNG calls"
    finally:
        del torch.cuda._queued_calls[queued:]
    ckpt.restore(path, model, opt, sched)
    assert len(torch.cuda._queued_calls) == queued


# ------------------------------------------------------------------------------------------ offloaded activations


def test_offload_copies_a_card_activation_to_host_memory_and_back():
    with fake_cuda(), torch.no_grad():
        off = ActivationOffload(CUDA0)
        assert off.pin is False  # no driver: `torch.cuda.is_available()` is False, so pageable host buffers
        t = torch.randn(4, 8, device="cuda", dtype=torch.bfloat16)
        device, host = off.pack(t)
        assert device == CUDA0 and host.device.type == "cpu" and not is_emulated_cuda(host)
        assert host.dtype is torch.bfloat16 and torch.equal(host, t.cpu())
        back = off.unpack((device, host))
        assert is_emulated_cuda(back) and back.device == CUDA0 and torch.equal(back.cpu(), t.cpu())
        assert off.stats.moved_bytes == off.stats.peak_resident_bytes == 64 and off.stats.packed == 1
        kept = ActivationOffload(CUDA0, move=False)  # the count of what stays on the card without offload
        assert kept.pack(t) is t and kept.stats.kept_bytes == 64


def test_the_pinned_side_stream_branch_needs_a_driver(monkeypatch):
    """The offload's GPU branch (`pin`: pinned pooled host buffers, copies on a side stream) is out of
    reach: pinned host memory is allocated by the CUDA driver (cudaHostAlloc) and a stream is a driver
    object, so on this build both raise, and a stand-in would replace the very thing the branch does. The
    branch choice itself is checked: CPU never pins; a card pins when the driver reports a GPU."""
    with pytest.raises(RuntimeError, match=NO_DRIVER):
        torch.empty(4, pin_memory=True)
    assert ActivationOffload(torch.device("cpu")).pin is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # stand-in: the driver reports a GPU
    assert ActivationOffload(torch.device("cpu")).pin is False
    with fake_cuda(), torch.no_grad(), pytest.raises(RuntimeError, match=NO_DRIVER):
        offload = ActivationOffload(CUDA0)
        assert offload.pin is True
        offload.pack(torch.randn(4, 8, device="cuda"))


# ------------------------------------------------------------------------------------------ optimizer


def test_auto_on_the_card_is_paged_adamw_8bit_and_steps_there(monkeypatch):
    """`auto` picks bitsandbytes' PagedAdamW8bit for a cuda device without touching CUDA. Its step syncs the
    device first (`torch.cuda.synchronize`, which needs the driver: shown first), so that call is stood in
    for; the 8-bit update then runs on the emulated card (bitsandbytes' CPU kernel computes it). Paging is
    not reached: bitsandbytes pages only tensors of 1e5+ elements, into CUDA managed memory (the driver)."""
    cfg = OptimConfig(optimizer="auto", lr=1e-2, weight_decay=0.0, betas=[0.9, 0.95])
    with fake_cuda(), torch.no_grad():
        params = [torch.nn.Parameter(torch.randn(64, 64, device="cuda")) for _ in range(2)]
        for q in params:
            q.grad = torch.randn(64, 64, device="cuda")
        driverless, opt = (build_optimizer([q], cfg, CUDA0) for q in params)
        assert type(driverless) is type(opt) is bnb.optim.PagedAdamW8bit
        with pytest.raises(RuntimeError, match=NO_DRIVER):
            driverless.step()
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)  # stand-in: nothing to wait for
        p = params[1]
        before = p.detach().clone()
        opt.step()
        state = [v for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        assert state and {v.device for v in state} == {CUDA0}
        assert torch.uint8 in {v.dtype for v in state}  # the 8-bit moments, kept on the card
        assert (before - p).abs().max().item() == pytest.approx(1e-2, rel=1e-3)  # Adam's first step: lr


# ------------------------------------------------------------------------------------------ auto_fit


def test_auto_fit_fits_the_current_card_less_its_margin(monkeypatch, caplog):
    cfg = load_config(RECIPE_7B, ["train.auto_fit=true", "rollout.max_new_tokens=32768"])
    assert auto_fit(cfg) is cfg  # no driver: no card to fit, the recipe as written
    with pytest.raises(RuntimeError, match=NO_DRIVER):
        torch.cuda.get_device_properties(0)  # what auto_fit reads on a GPU; needs the stand-in below
    gpus = FakeCudaState(count=2)
    gpus.install(monkeypatch)
    cards = FakeCards({0: 80.0, 1: 24.0}).install(monkeypatch)
    torch.cuda.set_device(1)  # this rank's card is cuda:1, the 24 GiB one
    with caplog.at_level(logging.INFO, logger="lite_srpo.model.memory.fit"):
        fitted = auto_fit(cfg)
    assert cards.asked == [1]
    assert "24.0 GiB card, 21.6 GiB planned for (auto_fit_margin 0.1)" in caplog.text
    assert not plan(cfg, 24.0)["fits"] and plan(fitted, 21.6)["fits"]
    torch.cuda.set_device(0)
    roomy = auto_fit(cfg)
    assert cards.asked == [1, 0] and plan(roomy, 72.0)["fits"] and not plan(roomy, 21.6)["fits"]


# ------------------------------------------------------------------------------------------ ranks and cards


def join(monkeypatch: pytest.MonkeyPatch, rank: int, local: int, world: int) -> tuple[distributed.DistContext, list]:
    """`init_from_env` under torchrun's environment, with the process group's join recorded, not made."""
    for key, value in {"WORLD_SIZE": world, "RANK": rank, "LOCAL_RANK": local}.items():
        monkeypatch.setenv(key, str(value))
    joined: list[str] = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend, **kw: joined.append(backend))
    return distributed.init_from_env(), joined


def test_without_a_driver_ranks_join_over_gloo_on_the_cpu(monkeypatch):
    with pytest.raises(RuntimeError, match=NO_DRIVER):
        torch.cuda.set_device(1)  # why the GPU node needs the FakeCudaState stand-in
    ctx, joined = join(monkeypatch, rank=1, local=1, world=2)
    assert joined == ["gloo"] and ctx.local_rank == 1 and pick_device() == torch.device("cpu")


def test_a_rank_loads_decodes_and_reduces_on_its_own_card(monkeypatch, tiny_factory, samples):
    FakeCudaState(count=2).install(monkeypatch)
    ctx, joined = join(monkeypatch, rank=3, local=1, world=4)  # rank 3 of 2 nodes x 2 GPUs: its node's cuda:1
    cuda1 = torch.device("cuda", 1)
    assert joined == ["nccl"] and pick_device() == cuda1
    policy = load_on_cuda(tiny_factory("qwen2_5_vl"), device=None)  # train.setup: load_policy -> pick_device
    assert policy.device == cuda1 and {p.device for p in policy.model.parameters()} == {cuda1}
    with fake_cuda(), torch.no_grad():
        batch = rollout(policy, samples)
        logp = rows_logprobs(policy, batch, list(range(batch.size)), chunk=4, temperature=1.0)
    assert logp.device == cuda1 and logp.shape == batch.response_ids.shape
    # NCCL collectives run on the rank's card: the status table and the summed tensor both go to cuda:1
    seen: list[torch.device] = []

    def all_reduce(t: torch.Tensor) -> None:
        seen.append(t.device)
        t.mul_(4)  # what a sum over 4 ranks that all hold the same tensor gives

    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    grads = torch.ones(3)
    with fake_cuda():
        out = distributed.all_reduce_sum(ctx, grads)
    assert out is grads and not is_emulated_cuda(grads) and torch.equal(grads, torch.full((3,), 4.0))
    assert seen == [cuda1, cuda1]
