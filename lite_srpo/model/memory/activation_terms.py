"""Update-time activation bytes with and without the long-response features (pure arithmetic).

For the planner (`terms.py`) and the tests of `model/activation_memory.py`: the same formulas the hooks'
byte counts are checked against. `tokens` is the micro-batch's rows x sequence length; `b` the compute
dtype's bytes; `kvd` the key/value width (kv_heads x head_dim); `i` the MLP intermediate size.
"""
from __future__ import annotations


def checkpoint_inputs_device_bytes(tokens: int, hidden: int, layers: int, b: int, offload: bool,
                                   resident_layers: int = 1) -> int:
    """Device bytes of the checkpointed layers' inputs during the update.

    Without offload every layer keeps its input until backward: layers x tokens x H x b. With offload
    the inputs live in host memory and backward brings back one layer's at a time: tokens x H x b,
    which the hooks measure; the planner counts `resident_layers` = 2 on a GPU (one recomputed, the
    next one's copy in flight)."""
    per_layer = tokens * hidden * b
    return min(resident_layers, layers) * per_layer if offload else layers * per_layer


def checkpoint_inputs_host_bytes(tokens: int, hidden: int, layers: int, b: int, offload: bool) -> int:
    """Host (pinned on CUDA) bytes the offloaded inputs take: layers x tokens x H x b, else 0."""
    return layers * tokens * hidden * b if offload else 0


def mlp_chunk_tokens(tokens: int, recompute_chunk: int = 0) -> int:
    """Tokens one MLP call holds intermediates for: all of them, or with `recompute_chunk = c > 0` at
    most c (the chunked MLP splits the flattened tokens of the whole call, activation_memory.py)."""
    return tokens if recompute_chunk <= 0 else min(tokens, recompute_chunk)


def mlp_intermediate_bytes(tokens: int, intermediate: int, b: int, recompute_chunk: int = 0,
                           per_unit: int | None = None) -> int:
    """The MLP's gate, up, activation and product `[tokens, I]` buffers of one recomputed layer; with
    `recompute_chunk = c > 0` they exist for c tokens at a time. `per_unit`: bytes per token and per
    unit of I (default 4 x b; `terms.recompute_mlp_bytes` adds peft's fp32 adapter outputs)."""
    return (4 * b if per_unit is None else per_unit) * mlp_chunk_tokens(tokens, recompute_chunk) * intermediate


def recomputed_layer_bytes(tokens: int, hidden: int, kvd: int, intermediate: int, b: int,
                           recompute_chunk: int = 0, mlp_per_unit: int | None = None, lora_inputs: int = 0) -> int:
    """One decoder layer's activations while backward recomputes it (anchors.md §5: (7H + 2kv + 4I) x b
    per token, plus fp32 RMSNorm copies), with the 4I term chunked by `recompute_chunk`; `lora_inputs`
    H-wide fp32 copies of LoRA'd projections' inputs kept for the adapters' gradients (`terms.lora_input_copies`)."""
    return (tokens * ((7 * hidden + 2 * kvd) * b + 8 * hidden + 4 * hidden * lora_inputs)
            + mlp_intermediate_bytes(tokens, intermediate, b, recompute_chunk, mlp_per_unit))


def attention_mask_bytes(rows: int, length: int, b: int, padding: str, drop_trailing: bool = False) -> int:
    """The `[rows, 1, L, L]` mask transformers builds for SDPA (bool, plus a float copy of b bytes in
    some paths): 0 with no padding, and with trailing padding only when it is dropped
    (`activation_memory.causal_inputs`); `padding` is `attention_padding`'s answer."""
    if padding == "none" or (padding == "trailing" and drop_trailing):
        return 0
    return rows * length * length * (1 + b)
