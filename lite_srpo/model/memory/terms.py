"""The terms of the memory plan: every buffer one training step holds, by phase (fixed, generation,
no-grad passes, update), in GiB, for a given group size and response length.

The constants marked "measured" come from bench/planner_accuracy.py on CPU.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...config import RunConfig, check_divisible
from ..chunking import LOGITS_COPIES_GRAD, NF4_DQ_BYTES_PER_PARAM, resolved_logprob_chunk
from ..dims import DTYPE_BYTES, ModelDims, image_tokens
from .activation_terms import (checkpoint_inputs_device_bytes, checkpoint_inputs_host_bytes, mlp_chunk_tokens,
                               mlp_intermediate_bytes, recomputed_layer_bytes)

GIB = 2**30
NF4_BYTES_PER_PARAM = 0.5 + 4 / 64  # without double quant: fp32 absmax per 64-value block
CPU_BASELINE_GIB = 0.40  # measured: python + torch + transformers + peft + bitsandbytes + lite_srpo, processor, data
CPU_HEAP_RETAINED_LAYERS = 1.0  # fitted on 24 CPU runs (bench/results): freed heap glibc keeps, in layer sets
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20  # larger blocks are mmapped and given back to the OS when freed
LOGITS_COPIES_NOGRAD = 2.0  # measured: fp32 [chunk, V] logits + the logsumexp temporary
GEN_LOGITS_COPIES = 5  # generate: fp32 last-token logits, processors, softmax, sampling buffers
OFFLOAD_DEVICE_LAYERS = 2  # offloaded checkpoints: the layer input being recomputed + the next one in transfer
TEXT_PROMPT_TOKENS = 150  # chat template + question + format instructions of the procedural tasks (tiny tokenizer)


@dataclass
class Term:
    name: str
    phase: str  # fixed | generation | passes | update | host (pinned host memory, not on the card)
    gib: float
    how: str
    moment: str = ""
    """Within the update: "lm_head" (alive only while the streamed lm_head runs, before backward reaches
    the decoder) or "layers" (alive only while backward recomputes a decoder layer); "" = the whole
    update. Live bytes (a card's allocator) peak at the larger moment; CPU RSS keeps both (plan.py)."""


def compute_bytes(cfg: RunConfig, device: str) -> int:
    if cfg.model.dtype == "auto":
        return 2 if device == "cuda" else 4
    return DTYPE_BYTES[cfg.model.dtype]


def logprob_chunk(cfg: RunConfig, dims: ModelDims, device: str) -> int:
    """train.logprob_chunk as the trainer resolves it (`auto`: chunking.py's rule from the same dims)."""
    return resolved_logprob_chunk(cfg.train.logprob_chunk, dims, cfg.model.load_in_4bit, compute_bytes(cfg, device))


def _lora_params(dims: ModelDims, cfg: RunConfig) -> int:
    r, h, i = cfg.lora.r, dims.hidden, dims.intermediate
    per = {"q_proj": h + dims.q_dim, "k_proj": h + dims.kv_dim, "v_proj": h + dims.kv_dim, "o_proj": dims.q_dim + h,
           "gate_proj": h + i, "up_proj": h + i, "down_proj": i + h}
    n = dims.layers * r * sum(per.get(m, 0) for m in cfg.lora.target_modules)
    if cfg.lora.vision:
        d, iv = dims.vision_hidden, dims.vision_intermediate
        n += dims.vision_depth * r * (4 * d + 2 * d + 3 * (d + iv))
    return n


def _optimizer_bytes(cfg: RunConfig, device: str) -> tuple[float, str]:
    name = cfg.optim.optimizer
    if name == "auto":
        name = "paged_adamw8bit" if device == "cuda" else "adamw"
    return (8.0, name) if name == "adamw" else (2.0, name)


PASS_ALGORITHMS = ("srpo", "papo", "vppo", "vgpo")
"""Algorithms with a no-grad pass of their own (old scores, corrupted image, focus): the planner's copy
of `rl/algorithms.ALGORITHM_SPECS` (the model layer cannot import it; a test keeps the two equal)."""


def runs_no_grad_pass(cfg: RunConfig) -> bool:
    """Whether a step runs any no-grad scoring pass: the algorithm's own, the reference for a KL term,
    or the old log-probs that several mini-batches need (`rl/algorithms.old_pass_needed`). Without one
    the update's own forward gives the old log-probs and the passes phase holds nothing."""
    return cfg.algorithm.name in PASS_ALGORITHMS or cfg.algorithm.beta > 0 or cfg.train.mini_batches > 1


LORA_H_INPUTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")


def _fp32_lora_mlp(cfg: RunConfig, device: str) -> bool:
    """peft's fp32 adapter outputs show on a card when LoRA is on the MLP's up or gate projection."""
    return device == "cuda" and bool({"up_proj", "gate_proj"} & set(cfg.lora.target_modules))


def nograd_mlp_bytes(cfg: RunConfig, device: str, b: int) -> tuple[int, str]:
    """Bytes per token and per intermediate unit (I) alive at a no-grad MLP's peak.

    Without LoRA on the MLP: the activated gate, the up projection and their product, 3 x b. With fp32
    LoRA adapters on `up_proj` (or `gate_proj`) over a half-precision base (QLoRA on a card), peft computes the adapter's
    output in fp32 and then scales it (two fp32 `[tokens, I]`) while the activated gate and the base up
    projection are alive: 2 x b + 8 (the step trace shows these four at the prefill's peak). On CPU the
    fitted terms stay as measured."""
    if _fp32_lora_mlp(cfg, device):
        return max(3 * b, 2 * b + 8), "gate, up, and the fp32 LoRA output and its scaled copy"
    return 3 * b, "gate, up, their product"


def recompute_mlp_bytes(cfg: RunConfig, device: str, b: int) -> tuple[int, str]:
    """`nograd_mlp_bytes` for a layer recomputed with grad: the gate, its activation, the up projection
    and the product are kept for backward (4 x b); peft's fp32 adapter output and its scaled copy are
    alive next to three of them (3 x b + 8)."""
    if _fp32_lora_mlp(cfg, device):
        return max(4 * b, 3 * b + 8), "gate, activation, up, and the fp32 LoRA output and its scaled copy"
    return 4 * b, "gate, activation, up, product"


def lora_input_copies(cfg: RunConfig, device: str, b: int) -> int:
    """H-wide LoRA'd projections of one layer whose input peft casts to fp32 and autograd keeps for the
    adapter's gradient (only when the compute dtype is not fp32 already)."""
    if device != "cuda" or b >= 4:
        return 0
    return len(set(LORA_H_INPUTS) & set(cfg.lora.target_modules))


def prompt_length(cfg: RunConfig, dims: ModelDims, prompt_tokens: int | None) -> tuple[int, int | None, str]:
    """(prompt tokens, image tokens or None, how the prompt length was chosen)."""
    if prompt_tokens is not None:
        return prompt_tokens, None, "given"
    if cfg.data.task:
        img = image_tokens(dims, cfg.data.image_size, cfg.data.image_size)
        p = min(cfg.data.max_prompt_length, img + TEXT_PROMPT_TOKENS)
        return p, img, (f"{img} image tokens ({cfg.data.image_size}x{cfg.data.image_size} px) + ~{TEXT_PROMPT_TOKENS} "
                        "text tokens")
    return cfg.data.max_prompt_length, None, "data.max_prompt_length (image tokens included; the longest prompt kept)"


def generation_rows(cfg: RunConfig, group_size: int) -> int:
    """Rows one generate call decodes together: G x prompts per call, capped by rollout.generation_rows."""
    gen_prompts = cfg.rollout.generation_batch_size or cfg.rollout.prompts_per_step
    rows = group_size * min(gen_prompts, cfg.rollout.prompts_per_step)
    return min(rows, cfg.rollout.generation_rows) if cfg.rollout.generation_rows > 0 else rows


def has_dense_mask(cfg: RunConfig, micro_batch: int, dense_mask: bool | None = None) -> bool:
    """Whether a forward materialises an [L, L] attention mask: eager attention always; SDPA/flash with
    a causal flag only when rows of different lengths share a micro-batch (padding). `dense_mask`
    forces the answer (True: the code before the causal-flag change, which built it for every batch)."""
    if dense_mask is not None:
        return dense_mask
    return cfg.model.attn_implementation == "eager" or micro_batch > 1


def phase_terms(cfg: RunConfig, dims: ModelDims, device: str, prompt: int, group_size: int,
                 response: int, ranks: int = 1, dense_mask: bool | None = None, image: int | None = None) -> list[Term]:
    """Every term of the plan for a given G and response length (all in GiB), on one rank of `ranks`:
    a rank holds the whole model and adapter but samples and scores only prompts_per_step / ranks prompts.
    Terms in phase `host` (pinned host memory of offloaded activations) are not on the card. `image`: the
    prompt's image tokens (None: all but the ~150 text tokens of a prompt are image tokens)."""
    cfg = per_rank_config(cfg, ranks)
    b = compute_bytes(cfg, device)
    v, h, i, n_layers, kvd = dims.vocab, dims.hidden, dims.intermediate, dims.layers, dims.kv_dim
    n_rows = group_size * cfg.rollout.prompts_per_step
    gen_rows = generation_rows(cfg, group_size)
    m = min(cfg.train.micro_batch_size, n_rows)
    s = prompt + response
    chunk = min(logprob_chunk(cfg, dims, device), m * response)
    quant = cfg.model.load_in_4bit
    terms: list[Term] = []

    def add(name: str, phase: str, nbytes: float, how: str, moment: str = "") -> None:
        terms.append(Term(name, phase, nbytes / GIB, how, moment))

    # Update moments exist only with checkpointing: without it every layer's activations live through
    # the streamed lm_head too, so nothing in the update is freed before something else is allocated.
    def moment(name: str) -> str:
        return name if cfg.model.gradient_checkpointing else ""

    # fixed: weights, adapter, process
    if device == "cpu":
        add("process baseline", "fixed", CPU_BASELINE_GIB * GIB, "python + torch + transformers + peft (measured)")
    if quant:
        add("weights: LLM linears (NF4 + double quant)", "fixed", dims.llm_linear_params * NF4_DQ_BYTES_PER_PARAM,
            f"{dims.llm_linear_params / 1e9:.3f}B x 4.127 bit")
        if device == "cpu":
            # the checkpoint stays memory-mapped (the unquantized tensors point into it), so the file pages
            # read while quantizing stay resident (measured)
            add("checkpoint pages read while quantizing", "fixed", dims.llm_linear_params * dims.checkpoint_bytes,
                f"{dims.llm_linear_params / 1e9:.3f}B x {dims.checkpoint_bytes} B (memory-mapped file)")
    else:
        add("weights: LLM linears", "fixed", dims.llm_linear_params * b, f"{dims.llm_linear_params / 1e9:.3f}B x {b} B")
    # On CPU an unconverted table stays memory-mapped, but page-fault read-around pulls in ~128 KiB per
    # looked-up row, so sampled tokens soon make all of it resident (measured): count it in full.
    add("weights: embeddings", "fixed", dims.embed_params * b, f"{dims.embed_params / 1e6:.0f}M x {b} B")
    add("weights: lm_head", "fixed", dims.lm_head_params * b,
        "tied to the embeddings" if dims.tied else f"{dims.lm_head_params / 1e6:.0f}M x {b} B")
    add("weights: vision tower + projector", "fixed", dims.vision_params * b,
        f"{dims.vision_params / 1e6:.0f}M x {b} B")
    add("weights: norms, biases", "fixed", dims.other_params * b, f"{dims.other_params / 1e6:.1f}M x {b} B")
    lora = _lora_params(dims, cfg)
    opt_b, opt_name = _optimizer_bytes(cfg, device)
    add("LoRA: fp32 weights + grads + optimizer", "fixed", lora * (8 + opt_b),
        f"{lora / 1e6:.1f}M params x (4 + 4 + {opt_b:g} {opt_name}) B")
    add("rollout batch, per-token vectors", "fixed", n_rows * response * 4 * 8 + n_rows * s * 8 * 3,
        f"{n_rows} x {response} tokens x a few [N, R] tensors")
    if ranks > 1:
        add("the whole step's [N, R] vectors (all ranks, exchanged)", "fixed", n_rows * ranks * response * 4 * 6,
            f"{n_rows * ranks} rows x {response} tokens x 6 fp32 vectors (CPU)")
        add("gradient all-reduce buffer", "update", lora * 4, f"{lora / 1e6:.1f}M LoRA grads x fp32, one flat copy")

    # generation: all rows of one generate call decode together. On a card the prefill and the decode
    # are two moments (phase_gib): the prefill holds a prompt-long cache and a whole prompt's activations,
    # the decode the full cache and one token's.
    cap = f", rollout.generation_rows={cfg.rollout.generation_rows}" if cfg.rollout.generation_rows > 0 else ""
    add("KV cache", "generation", gen_rows * s * n_layers * 2 * kvd * b * (1 + 1 / n_layers),
        f"{gen_rows} row(s) per generate call{cap} x {s} tokens x {n_layers} layers x 2 x {kvd} x {b} B "
        "(+1 layer while it grows)", "decode")
    rc = cfg.train.recompute_chunk
    prefill_mlp = mlp_chunk_tokens(gen_rows * prompt, rc)
    mlp_b, mlp_how = nograd_mlp_bytes(cfg, device, b)
    if device == "cuda":
        add("KV cache at the prefill", "generation", gen_rows * prompt * n_layers * 2 * kvd * b,
            f"{gen_rows} rows x {prompt} prompt tokens x {n_layers} layers x 2 x {kvd} x {b} B", "prefill")
        img = image or max(prompt - TEXT_PROMPT_TOKENS, 0)
        add("image features of the generate call", "generation", gen_rows * img * h * b,
            f"{gen_rows} rows x {img} image tokens x H={h} x {b} B (generate runs the tower on every row)", "prefill")
    add("prefill activations (one layer, no grad)", "generation",
        gen_rows * prompt * ((4 * h + 2 * kvd) * b + prompt * (1 + b)) + prefill_mlp * mlp_b * i,
        f"{gen_rows} rows x {prompt} prompt tokens, incl. the [P, P] attention mask; "
        f"MLP over {prefill_mlp} tokens at a time x I x {mlp_b} B ({mlp_how})", "prefill")
    add("per-step logits", "generation", gen_rows * v * 4 * GEN_LOGITS_COPIES,
        f"{gen_rows} rows x V={v} x fp32 x {GEN_LOGITS_COPIES} copies")

    # scoring passes (no grad), one micro-batch at a time: a layer's activations, then the lm_head's chunks
    # (none at all when the step runs no pass: DAPO, Dr. GRPO, GRPO without KL, one mini-batch)
    mlp_rows = mlp_chunk_tokens(m * s, rc)  # the chunked MLP also runs without grad (activation_memory.py)
    masked = has_dense_mask(cfg, m, dense_mask)
    mask_bytes, mask_how = _mask(masked, cfg, m, s, b)
    if runs_no_grad_pass(cfg):
        add("one layer's activations (no grad)", "passes",
            m * s * ((4 * h + 2 * kvd) * b + 3 * h * b) + mlp_rows * mlp_b * i,
            f"micro-batch {m} x {s} tokens x (4H + 2kv + 3H) x {b} B + {mlp_rows} tokens x I x {mlp_b} B ({mlp_how})"
            + (f" (MLP in chunks: train.recompute_chunk={rc})" if rc > 0 else ""), "layers")
        add("[L, L] attention mask", "passes", mask_bytes, mask_how, "layers")
        add("streamed lm_head chunk", "passes", chunk * v * 4 * LOGITS_COPIES_NOGRAD,
            f"chunk {chunk} x V={v} x fp32 x {LOGITS_COPIES_NOGRAD:g} (independent of G and length)", "lm_head")
    if cfg.algorithm.name == "vgpo" and device == "cpu":
        add("VGPO response hidden states", "passes", m * response * h * 4, f"micro-batch {m} x {response} x H fp32")

    # policy update (grad), one micro-batch at a time (the activation formulas: activation_terms.py)
    rmlp_b, rmlp_how = recompute_mlp_bytes(cfg, device, b)
    copies = lora_input_copies(cfg, device, b)
    copies_how = f" + {copies} x 4H (fp32 LoRA inputs kept for the adapters' gradients)" if copies else ""
    chunk_how = (f" + MLP over chunks: {mlp_chunk_tokens(m * s, rc)} x I x {rmlp_b} B (train.recompute_chunk={rc})"
                 if rc > 0 else "")
    if cfg.model.gradient_checkpointing:
        offload_on_card = cfg.train.offload_activations and device == "cuda"
        on_card = checkpoint_inputs_device_bytes(m * s, h, n_layers, b, offload_on_card,
                                                 resident_layers=OFFLOAD_DEVICE_LAYERS)
        if offload_on_card:
            add("checkpointed layer inputs (offloaded: on the card)", "update", on_card,
                f"{OFFLOAD_DEVICE_LAYERS} layers (the one recomputed + one in transfer) x {m} x {s} x H={h} x {b} B")
            add("checkpointed layer inputs (offloaded: pinned host memory)", "host",
                checkpoint_inputs_host_bytes(m * s, h, n_layers, b, True),
                f"{m} x {s} tokens x {n_layers} layers x H={h} x {b} B, not on the card")
        else:
            add("checkpointed layer inputs", "update", on_card,
                f"{m} x {s} tokens x {n_layers} layers x H={h} x {b} B"
                + (" (offload changes nothing on CPU: host memory is the device)" if cfg.train.offload_activations else ""))
        add("one layer recomputed for backward", "update",
            recomputed_layer_bytes(m * s, h, kvd, i, b, rc, rmlp_b, copies),
            f"{m} x {s} x ((7H + 2kv) x {b} + 8H{copies_how}) B"
            + (chunk_how or f" + {m} x {s} x I x {rmlp_b} B ({rmlp_how})"), "layers")
    else:
        mlp = mlp_intermediate_bytes(m * s, i, b, rc, rmlp_b)  # with chunks: one chunk's, whichever layer recomputes it
        rest = recomputed_layer_bytes(m * s, h, kvd, i, b, rc, rmlp_b, copies) - mlp  # a layer without its MLP
        every = n_layers * (rest + mlp) if rc <= 0 else n_layers * rest + mlp
        add("activations of every layer", "update", every,
            f"{m} x {s} x {n_layers} layers x ((7H + 2kv) x {b} + 8H) B"
            + (chunk_how + " (no gradient checkpointing)" if rc > 0 else
               f" + 4I x {b} B each (no gradient checkpointing; offload needs it)"))
    add("[L, L] attention mask", "update", mask_bytes, mask_how)
    add("final hidden states + their grads", "update", m * s * h * (2 * b + 8), f"{m} x {s} x H")
    add("fused lm_head gradient (kept from forward to backward)", "update", m * response * h * b,
        f"{m} x {response} response tokens x H={h} x {b} B (d logp / d h, streaming.py)")
    grad_copies = LOGITS_COPIES_GRAD[4 if b == 4 else 2]
    add("streamed lm_head chunk (with backward)", "update", chunk * v * 4 * grad_copies,
        f"chunk {chunk} x V={v} x fp32 x {grad_copies:g} (independent of G and length)", moment("lm_head"))
    if quant:
        add("dequantized 4-bit weight", "update", dims.largest_linear_params * b,
            f"largest linear {dims.largest_linear_params / 1e6:.0f}M x {b} B", moment("layers"))
    if device == "cpu":
        add("freed heap kept by the C allocator", "update", _cpu_heap_retained(m * s, h, kvd, i, b),
            f"~{CPU_HEAP_RETAINED_LAYERS:g} layer-activation set(s) of blocks under 32 MiB (glibc, fitted)")
    return terms


def _mask(masked: bool, cfg: RunConfig, m: int, s: int, b: int) -> tuple[float, str]:
    if masked:
        why = "eager attention" if cfg.model.attn_implementation == "eager" else "padded micro-batch"
        return m * s * s * (1 + b), f"{m} x {s}^2 x (bool + {b} B) ({why})"
    return 0.0, f"none: {cfg.model.attn_implementation} attention with a causal flag, one unpadded row"


def _cpu_heap_retained(tokens: int, h: int, kvd: int, i: int, b: int) -> float:
    """Bytes of freed activations glibc keeps in its heap during backward (CPU RSS only).

    glibc serves blocks under its mmap threshold (which grows up to 32 MiB) from the heap and does not
    give fragmented heap back, so recomputed layers leave freed activations resident; blocks above
    32 MiB are mmapped and returned. Measured retention varies from run to run (0.3-1 GiB on the
    6-layer H=1024 bench model); one layer set is the fit over bench/memory_scaling and the first
    bench/planner_accuracy run.
    """
    blocks = [(7 * h + 2 * kvd) * b + 8 * h, 4 * i * b]  # per-token bytes of the H-wide and I-wide tensors
    widths = [h * max(b, 4), i * b]  # bytes per token of one tensor of each kind
    kept = sum(per_tok for per_tok, width in zip(blocks, widths) if tokens * width < GLIBC_MMAP_THRESHOLD_MAX)
    return CPU_HEAP_RETAINED_LAYERS * tokens * kept


def per_rank_config(cfg: RunConfig, ranks: int) -> RunConfig:
    """What one rank runs: the same recipe with prompts_per_step / ranks prompts (groups stay whole)."""
    if ranks == 1:
        return cfg
    check_divisible(cfg.rollout.prompts_per_step, ranks)
    return dataclasses.replace(cfg, rollout=dataclasses.replace(
        cfg.rollout, prompts_per_step=cfg.rollout.prompts_per_step // ranks))
