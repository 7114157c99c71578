"""Streamed log-probs / entropy / KL equal the full-logits reference, with grads, in bounded memory."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lite_srpo.model.streaming import token_logprobs, token_logprobs_and_entropy, two_pass_kl

N, T, H, V = 3, 5, 8, 37  # N*T = 15 rows
CHUNKS = [1, 4, 7, 15, 1024]  # 4 and 7 do not divide 15; 1024 > N*T


def make(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype)
    bias = torch.randn(V, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (N, T), generator=g)
    return hidden, weight, bias, targets


def ref_log_softmax(hidden, weight, bias, temperature):
    logits = hidden.float() @ weight.float().T  # [N, T, V] — the tensor streaming never builds
    if bias is not None:
        logits = logits + bias.float()
    return torch.log_softmax(logits / temperature, dim=-1)


def ref_logprobs(hidden, weight, bias, targets, temperature):
    return ref_log_softmax(hidden, weight, bias, temperature).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def ref_entropy(hidden, weight, bias, temperature):
    lp = ref_log_softmax(hidden, weight, bias, temperature)
    return -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("temperature,use_bias", [(1.0, False), (0.7, True), (1.3, True)])
def test_logprobs_match_full_reference(chunk, temperature, use_bias):
    hidden, weight, bias, targets = make()
    b = bias if use_bias else None
    with torch.no_grad():
        got = token_logprobs(hidden, weight, targets, chunk=chunk, temperature=temperature, lm_head_bias=b)
    assert got.shape == (N, T) and got.dtype == torch.float32 and got.grad_fn is None
    assert torch.allclose(got, ref_logprobs(hidden, weight, b, targets, temperature), atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [1, 4, 7, 1024])
def test_logprob_gradients_match_reference(chunk):
    hidden, weight, bias, targets = make(1)
    coef = torch.randn(N, T, generator=torch.Generator().manual_seed(9))  # arbitrary upstream gradient

    def grads(fn):
        h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
        (fn(h, w, b) * coef).sum().backward()
        return h.grad, w.grad, b.grad

    got = grads(lambda h, w, b: token_logprobs(h, w, targets, chunk=chunk, temperature=0.8, lm_head_bias=b))
    ref = grads(lambda h, w, b: ref_logprobs(h, w, b, targets, 0.8))
    for g, r in zip(got, ref):
        assert torch.allclose(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 7, 1024])
@pytest.mark.parametrize("temperature,use_bias", [(1.0, False), (0.8, True)])
def test_frozen_lm_head_fused_gradient_matches_reference(chunk, temperature, use_bias):
    """A frozen lm_head (LoRA) takes the fused path: d logp / d h is computed in the forward, and must be
    the full-logits reference's gradient, ignored targets included."""
    hidden, weight, bias, targets = make(4)
    b = bias if use_bias else None
    tgt = targets.clone()
    tgt[1, :2] = -100
    coef = torch.randn(N, T, generator=torch.Generator().manual_seed(5))
    h = hidden.clone().requires_grad_()
    got = token_logprobs(h, weight, tgt, chunk=chunk, temperature=temperature, lm_head_bias=b)
    nodes, seen = [got.grad_fn], []
    while nodes:  # the autograd graph contains the fused node
        fn = nodes.pop()
        seen.append(type(fn).__name__)
        nodes += [f for f, _ in fn.next_functions if f is not None]
    assert any("Fused" in name for name in seen), seen
    (got * coef).sum().backward()
    h_ref = hidden.clone().requires_grad_()
    ref = torch.where(tgt >= 0, ref_logprobs(h_ref, weight, b, tgt.clamp(min=0), temperature), 0.0)
    (ref * coef).sum().backward()
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)
    assert torch.allclose(h.grad, h_ref.grad, atol=1e-5, rtol=1e-5)
    assert torch.equal(h.grad[1, :2], torch.zeros(2, H))


def test_fused_path_runs_two_lm_head_matmuls_per_chunk_not_three():
    """The speed claim, counted: forward + backward of a frozen lm_head costs 2 `[c, H] x [H, V]`
    matmuls per chunk fused, against 3 (forward, recompute, backward) on the checkpointed path."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountVocabMatmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default) \
                    and V in tuple(args[-1].shape) + tuple(args[-2].shape):
                self.n += 1
            return out

    hidden, weight, _, targets = make(6)
    counts = {}
    for name, w in (("fused", weight), ("checkpointed", weight.clone().requires_grad_())):
        h = hidden.clone().requires_grad_()
        with CountVocabMatmuls() as c:
            token_logprobs(h, w, targets, chunk=4).sum().backward()
        counts[name] = c.n
    chunks = -(-N * T // 4)
    assert counts["fused"] == 2 * chunks
    assert counts["checkpointed"] >= 3 * chunks  # (+ the weight's own gradient when it is trained)


def test_grad_mode_checkpoints_each_chunk():
    """With grad on, forward must not save any [chunk, V] tensor (backward recomputes them)."""
    hidden, weight, bias, targets = make(2)
    h = hidden.clone().requires_grad_()
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    def logits_saved(fn) -> bool:
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        return out, any(len(s) >= 2 and s[-1] == V for s in saved)

    _, ref_saves = logits_saved(lambda: ref_logprobs(h, weight, bias, targets, 1.0))
    assert ref_saves  # control: the plain path keeps [.., V] tensors for backward
    logp, ours_saves = logits_saved(lambda: token_logprobs(h, weight, targets, chunk=4, lm_head_bias=bias))
    assert logp.requires_grad and not ours_saves, saved
    logp.sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_strided_hidden_slice_and_ignore_index():
    hidden, weight, bias, targets = make(3)
    full = torch.randn(N, T + 4, H)
    full[:, 2:2 + T] = hidden  # response positions are a slice of the whole sequence, as in passes.py
    tgt = targets.clone()
    tgt[0, -2:] = -100
    h = full.clone().requires_grad_()
    got = token_logprobs(h[:, 2:2 + T], weight, tgt, chunk=4, lm_head_bias=bias)
    ref = ref_logprobs(hidden, weight, bias, targets, 1.0)
    keep = tgt >= 0
    assert torch.allclose(got[keep], ref[keep], atol=1e-5)
    assert torch.equal(got[~keep], torch.zeros(2))
    got.sum().backward()
    assert torch.equal(h.grad[0, 2 + T - 2: 2 + T], torch.zeros(2, H))  # ignored targets get no gradient
    assert torch.equal(h.grad[:, :2], torch.zeros(N, 2, H))  # positions outside the slice neither


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_entropy_and_its_gradient_match_reference(chunk):
    hidden, weight, bias, targets = make(4)
    h = hidden.clone().requires_grad_()
    logp, ent = token_logprobs_and_entropy(h, weight, targets, chunk=chunk, temperature=1.5, lm_head_bias=bias)
    assert torch.allclose(logp, ref_logprobs(hidden, weight, bias, targets, 1.5), atol=1e-5)
    h_ref = hidden.clone().requires_grad_()
    ent_ref = ref_entropy(h_ref, weight, bias, 1.5)
    assert torch.allclose(ent, ent_ref, atol=1e-5)
    assert bool((ent > 0).all()) and bool((ent <= torch.log(torch.tensor(float(V))) + 1e-5).all())
    (ent.sum() + logp.sum()).backward()
    (ent_ref.sum() + ref_logprobs(h_ref, weight, bias, targets, 1.5).sum()).backward()
    assert torch.allclose(h.grad, h_ref.grad, atol=1e-5)


def test_entropy_of_uniform_is_log_v():
    hidden = torch.randn(1, 3, H)
    logp, ent = token_logprobs_and_entropy(hidden, torch.zeros(V, H), torch.zeros(1, 3, dtype=torch.long), chunk=2)
    # zero weights: every logit is 0, p = 1/V, so H = log V and log p = -log V
    log_v = torch.log(torch.tensor(float(V)))
    assert torch.allclose(ent, log_v.expand(1, 3), atol=1e-6)
    assert torch.allclose(logp, -log_v.expand(1, 3), atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_two_pass_kl_matches_reference(chunk):
    hidden_p, weight, bias, _ = make(5)
    hidden_q = hidden_p + 0.5 * torch.randn(N, T, H, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        kl = two_pass_kl(hidden_p, hidden_q, weight, chunk=chunk, temperature=0.9, lm_head_bias=bias)
    lp = ref_log_softmax(hidden_p, weight, bias, 0.9)
    lq = ref_log_softmax(hidden_q, weight, bias, 0.9)
    ref = (lp.exp() * (lp - lq)).sum(-1)
    assert kl.shape == (N, T)
    assert torch.allclose(kl, ref, atol=1e-5)
    assert bool((ref > 1e-3).all())  # the two passes really differ, so the check has teeth
    same = two_pass_kl(hidden_p, hidden_p, weight, chunk=chunk, lm_head_bias=bias)
    assert torch.allclose(same, torch.zeros(N, T), atol=1e-6)


def test_two_pass_kl_works_with_grad_on():
    hidden_p, weight, bias, _ = make(7)
    h = hidden_p.clone().requires_grad_()
    q = torch.randn(N, T, H)
    kl = two_pass_kl(h, q, weight, chunk=4, lm_head_bias=bias)
    kl.sum().backward()
    h_ref = hidden_p.clone().requires_grad_()
    lp, lq = ref_log_softmax(h_ref, weight, bias, 1.0), ref_log_softmax(q, weight, bias, 1.0)
    (lp.exp() * (lp - lq)).sum().backward()
    assert torch.allclose(h.grad, h_ref.grad, atol=1e-5)


def test_half_precision_inputs():
    hidden, weight, bias, targets = make(8)
    h16 = hidden.bfloat16()
    # bf16 hidden, fp32 weight: hidden is upcast per chunk, so the result is the fp32 reference on h16
    got = token_logprobs(h16, weight, targets, chunk=4, lm_head_bias=bias)
    assert got.dtype == torch.float32
    assert torch.allclose(got, ref_logprobs(h16.float(), weight, bias, targets, 1.0), atol=1e-5)
    # bf16 hidden and weight: bf16 matmul (as the model's lm_head), softmax in fp32
    w16 = weight.bfloat16()
    got16 = token_logprobs(h16, w16, targets, chunk=4, lm_head_bias=bias)
    ref16 = torch.log_softmax((h16 @ w16.T).float() + bias, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert got16.dtype == torch.float32
    assert torch.allclose(got16, ref16, atol=1e-4)
    h_req = h16.clone().requires_grad_()
    token_logprobs(h_req, w16, targets, chunk=4).sum().backward()
    assert h_req.grad.dtype == torch.bfloat16 and torch.isfinite(h_req.grad.float()).all()


def test_empty_and_bad_inputs():
    w = torch.randn(V, H)
    assert token_logprobs(torch.randn(2, 0, H), w, torch.zeros(2, 0, dtype=torch.long)).shape == (2, 0)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(torch.randn(2, 3, H), w, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="lm_head_weight"):
        token_logprobs(torch.randn(2, 3, H), torch.randn(V, H + 1), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk"):
        token_logprobs(torch.randn(2, 3, H), w, torch.zeros(2, 3, dtype=torch.long), chunk=0)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.randn(2, 3, H), w, torch.zeros(2, 3, dtype=torch.long), temperature=0.0)


# ---- memory: the peak is bounded by chunk × V, not by T × V -------------------------------------------

_MEM_SCRIPT = r"""
import re
import torch
torch.set_num_threads(2)
from lite_srpo.model.streaming import token_logprobs

V, H, CHUNK = 151_936, 64, 128
g = torch.Generator().manual_seed(0)
weight = torch.randn(V, H, generator=g) * 0.05  # frozen lm_head, as in LoRA training

def status_kib(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))

def extra_bytes(run):
    try:  # reset the RSS high-water mark (Linux); else VmHWM is an upper bound of this run's peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = status_kib("VmRSS")
    run()
    return (status_kib("VmHWM") - before) * 1024

def streamed(T):
    hidden = torch.randn(1, T, H, generator=g).requires_grad_()
    targets = torch.randint(0, V, (1, T), generator=g)
    return lambda: token_logprobs(hidden, weight, targets, chunk=CHUNK).sum().backward()

def full(T):  # control: the [T, V] logits the streaming never builds (no grad, no softmax)
    hidden = torch.randn(T, H, generator=g)
    def run():
        with torch.no_grad():
            (hidden @ weight.T).max()
    return run

streamed(8)()  # warm-up: one-off allocations (thread pools, kernels) are not per-token memory
print(extra_bytes(streamed(512)), extra_bytes(streamed(2048)), extra_bytes(full(2048)))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS/VmHWM from /proc (Linux)")
def test_peak_memory_is_bounded_by_chunk_not_length():
    """Forward + backward at V = 151,936, chunk 128, measured in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _MEM_SCRIPT], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert out.returncode == 0, out.stderr
    short, long, control = (int(v) for v in out.stdout.split()[-3:])
    gib = 1024 ** 3
    full_logits = 2048 * 151_936 * 4  # 1.16 GiB of fp32 logits for T = 2048
    # the measurement sees a materialised [T, V]
    assert control > 0.95 * full_logits, f"control only measured {control / gib:.2f} GiB"
    # one 128-row chunk is 78 MB of fp32 logits; forward + backward keep a few of them at a time
    assert long < 0.5 * gib, f"streamed T=2048 fwd+bwd used {long / gib:.2f} GiB extra"
    assert long - short < 0.15 * gib, f"peak grew with T: {short / gib:.2f} -> {long / gib:.2f} GiB"
