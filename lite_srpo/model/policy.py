"""Load a VLM once (4-bit NF4 or bf16/fp32), attach LoRA, and share that one base across every pass.

The policy, reference and corrupted/perception-removed passes all run on the same PeftModel:
`policy()` leaves the adapter on, `reference()` disables it (DESIGN.md §2). The model is never put in
`.eval()` between steps: on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights on the first
eval-mode no-grad forward, and later training forwards then lose their gradients (platform.md §3).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..config import LoraConfig, ModelConfig
from ..errors import ModelError
from .activation_memory import ActivationOffload, causal_inputs, install_chunked_mlp, install_offload
from .processors import image_token_id, load_processor, model_family, vision_token_ids

log = logging.getLogger(__name__)

# Module-name prefixes, matched from the start of the full name (transformers 5 skip-module rule).
VISION_PREFIXES = {
    "qwen2_5_vl": ["model.visual"],
    "qwen2_vl": ["model.visual"],
    "qwen3_vl": ["model.visual"],
    "idefics3": ["model.vision_model", "model.connector"],
}
LANGUAGE_MODEL_PATTERN = {
    "qwen2_5_vl": r".*language_model.*",
    "qwen2_vl": r".*language_model.*",
    "qwen3_vl": r".*language_model.*",
    "idefics3": r".*text_model.*",
}
VISION_LORA_PATTERN = {
    "qwen2_5_vl": r".*visual\.blocks.*\.(qkv|proj|gate_proj|up_proj|down_proj|fc1|fc2)",
    "qwen2_vl": r".*visual\.blocks.*\.(qkv|proj|fc1|fc2)",
    "qwen3_vl": r".*visual\.blocks.*\.(qkv|proj|linear_fc1|linear_fc2)",
    "idefics3": r".*vision_model\.encoder.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)",
}


def pick_device() -> torch.device:
    """The current CUDA device (each data-parallel rank has set its own: `distributed.init_from_env`), else CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def disable_cpu_4bit_repacking(model: torch.nn.Module) -> int:
    """bitsandbytes CPU fix (platform.md §3): stop Linear4bit from repacking into its inference layout."""
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def column_major_lm_head(model: torch.nn.Module) -> bool:
    """Store the frozen, untied lm_head weight `[V, H]` as the transpose of a contiguous `[H, V]` tensor: the same
    values, shape and dtype, so every pass computes the same thing, but a decode step's `x @ W.T` over one or
    two rows then streams W in the order CPU GEMM reads fastest. Measured on the 152k-vocabulary bench
    model: 2.4x faster at 1-2 rows, 1.5x at 8, unchanged at training chunk sizes (bench/lm_head_layout.py).
    Tied embeddings are left alone (the input lookup would gather strided rows). True when it re-laid W."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    weight = getattr(head, "weight", None)
    if weight is None or weight.dim() != 2 or weight.requires_grad or not weight.is_contiguous():
        return False
    if embed is not None and getattr(embed, "weight", None) is weight:
        return False
    head.weight = torch.nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=False)
    return True


def set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Gradient checkpointing on/off (transformers 5.23 renamed it activation checkpointing; 5.17 has the old name)."""
    if on:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()


def lora_target_regex(family: str, target_modules: list[str], vision: bool) -> str:
    names = "|".join(sorted(set(target_modules)))
    pattern = rf"{LANGUAGE_MODEL_PATTERN[family]}\.({names})"
    if vision:
        pattern = rf"(?:{pattern})|(?:{VISION_LORA_PATTERN[family]})"
    return pattern


def _auto_model_class():
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText


def load_base(cfg: ModelConfig, device: torch.device | None = None) -> tuple[torch.nn.Module, Any, str]:
    """The frozen base model, its processor and its family name; errors name the path and the fix."""
    from transformers import AutoConfig, BitsAndBytesConfig

    device = device or pick_device()
    dtype = resolve_dtype(cfg.dtype, device)
    local = Path(cfg.path).expanduser()
    if cfg.path.startswith((".", "/", "~")) and not local.exists():
        raise ModelError(f"model.path: {cfg.path} does not exist (build a tiny one with `lite-srpo make-tiny`)")
    try:
        hf_config = AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.path: cannot read a model config from {cfg.path!r}: {str(exc).splitlines()[0]}") from None
    family = model_family(hf_config)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code,
                              "attn_implementation": cfg.attn_implementation}
    if cfg.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=VISION_PREFIXES[family] + ["lm_head"],
        )
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    try:
        model = _auto_model_class().from_pretrained(cfg.path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.path: cannot load {cfg.path!r}: {str(exc).splitlines()[0]}") from None
    if not cfg.load_in_4bit:
        model.to(device)
    if device.type == "cpu" and cfg.load_in_4bit:
        disable_cpu_4bit_repacking(model)
    for p in model.parameters():
        p.requires_grad_(False)
    processor = load_processor(cfg.path, trust_remote_code=cfg.trust_remote_code)
    return model, processor, family


@dataclass
class PolicyModel:
    """One PeftModel over one frozen base, plus what the passes need to know about it."""

    model: torch.nn.Module  # peft.PeftModel
    processor: Any
    family: str
    device: torch.device
    dtype: torch.dtype
    gradient_checkpointing: bool
    offload: ActivationOffload | None = None  # train.offload_activations (activation_memory.py)
    recompute_chunk: int = 0  # train.recompute_chunk
    attn_implementation: str = "sdpa"
    causal_trailing: bool = False  # drop a trailing-padding-only mask (on with either long-response feature)

    @property
    def hf(self) -> torch.nn.Module:
        """The transformers model inside peft (LoRA layers injected in place); the model itself without peft."""
        get_base = getattr(self.model, "get_base_model", None)
        return get_base() if get_base is not None else self.model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def config(self):
        return self.hf.config

    def lm_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = self.hf.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)

    def suppressed_token_ids(self) -> list[int]:
        return vision_token_ids(self.processor, self.config)

    def image_token_id(self) -> int:
        return image_token_id(self.config)

    @contextlib.contextmanager
    def policy(self) -> Iterator[None]:
        """Adapter on: rollout, old log-probs, corrupted and perception-removed passes, the update."""
        yield

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Adapter off: the frozen base is the reference policy (no second copy in memory)."""
        with self.model.disable_adapter():
            yield

    @contextlib.contextmanager
    def generation_mode(self) -> Iterator[None]:
        """Generate with the KV cache: gradient checkpointing would force use_cache=False in train mode."""
        was = self.gradient_checkpointing
        if was:
            set_checkpointing(self.hf, False)
        try:
            yield
        finally:
            if was:
                set_checkpointing(self.hf, True)
                if self.offload is not None:  # transformers put its own checkpoint function back
                    install_offload(self.hf, self.offload)

    def hidden_states(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final (normed) hidden states [N, L, H]; the lm_head is applied later, chunk by chunk.

        With the long-response features on, a micro-batch whose padding is all trailing runs without
        its attention mask (causal only, no `[L, L]` mask); without padding it never needs one."""
        inputs = causal_inputs(inputs, self.attn_implementation, drop_trailing=self.causal_trailing)
        out = self.hf.model(**inputs, use_cache=False, return_dict=True)
        return out.last_hidden_state

    def enable_long_responses(self, offload_activations: bool = False, recompute_chunk: int = 0,
                              offload: ActivationOffload | None = None) -> None:
        """Install the update-time memory savers (`activation_memory.py`); both off changes nothing.
        Either one also lets a micro-batch with trailing padding only run without its `[L, L]` mask.
        `offload`: the hooks to use (default: a plain `ActivationOffload` for this device)."""
        self.causal_trailing = offload_activations or recompute_chunk > 0
        if offload_activations:
            if not self.gradient_checkpointing:
                raise ModelError("train.offload_activations: true needs model.gradient_checkpointing: true "
                                 "(what is offloaded is the checkpointed layers' inputs)")
            self.offload = offload or ActivationOffload(self.device)
            n = install_offload(self.hf, self.offload)
            log.info("offload_activations: %d checkpointed layers keep their inputs in host memory", n)
        if recompute_chunk > 0:
            self.recompute_chunk = recompute_chunk
            n = install_chunked_mlp(self.hf, recompute_chunk)
            log.info("recompute_chunk: %d decoder MLPs run %d tokens at a time with grad on", n, recompute_chunk)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def base_parameter_pointers(self) -> list[int]:
        """Storage pointers of the frozen base tensors: the same in every pass (one base, no copies)."""
        return [p.data_ptr() for n, p in self.model.named_parameters() if "lora_" not in n]


def attach_lora(model: torch.nn.Module, family: str, cfg: LoraConfig, adapter_path: str | None = None,
                trainable: bool = True) -> torch.nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    if adapter_path:
        if not (Path(adapter_path) / "adapter_config.json").is_file():
            raise ModelError(f"{adapter_path}: no adapter_config.json (not a peft adapter directory)")
        try:
            return PeftModel.from_pretrained(model, adapter_path, is_trainable=trainable)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ModelError(f"adapter {adapter_path} does not fit model: {str(exc).splitlines()[0]}") from None
    peft_cfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
        target_modules=lora_target_regex(family, cfg.target_modules, cfg.vision),
    )
    return get_peft_model(model, peft_cfg)


def load_policy(model_cfg: ModelConfig, lora_cfg: LoraConfig, adapter_path: str | None = None,
                trainable: bool = True, device: torch.device | None = None, offload_activations: bool = False,
                recompute_chunk: int = 0) -> PolicyModel:
    """Base + LoRA, ready for RL: base frozen, adapter trainable in fp32, gradient checkpointing on;
    `offload_activations` / `recompute_chunk`: `PolicyModel.enable_long_responses`."""
    device = device or pick_device()
    base, processor, family = load_base(model_cfg, device)
    return wrap_policy(base, processor, family, model_cfg, lora_cfg, device, adapter_path, trainable,
                       offload_activations, recompute_chunk)


def wrap_policy(base: torch.nn.Module, processor: Any, family: str, model_cfg: ModelConfig, lora_cfg: LoraConfig,
                device: torch.device, adapter_path: str | None = None, trainable: bool = True,
                offload_activations: bool = False, recompute_chunk: int = 0,
                offload: ActivationOffload | None = None) -> PolicyModel:
    """A loaded frozen base made into the policy (`load_policy`; the step trace passes a base on `meta`
    and its own `offload`, whose host buffers it counts)."""
    if model_cfg.gradient_checkpointing and trainable:
        set_checkpointing(base, True)
    model = attach_lora(base, family, lora_cfg, adapter_path or lora_cfg.init_from or None, trainable)
    for name, p in model.named_parameters():
        if "lora_" in name and trainable:
            p.data = p.data.float()  # adapters train in fp32 (QLoRA); the base keeps its dtype
            p.requires_grad_(True)
    model.train()  # never .eval(): see the module docstring
    if device.type == "cpu":
        disable_cpu_4bit_repacking(model)
        column_major_lm_head(base)  # bench/lm_head_layout.py measures both layouts by swapping the weight
    policy = PolicyModel(model=model, processor=processor, family=family, device=device,
                         dtype=resolve_dtype(model_cfg.dtype, device),
                         gradient_checkpointing=model_cfg.gradient_checkpointing and trainable,
                         attn_implementation=model_cfg.attn_implementation)
    policy.enable_long_responses(offload_activations, recompute_chunk, offload)
    return policy
