"""Typed run configuration: a recipe YAML plus `key.sub=value` overrides, validated before anything loads.

Every error names the key, the value and what is allowed, and all errors are reported together.
`algorithm.name` selects a preset (the papers' defaults, `ALGORITHM_PRESETS`) that fills every
`algorithm.*` key the recipe leaves unset.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError, LiteSrpoError


@dataclass
class ModelConfig:
    path: str = ""
    """Local model directory or hub id (any supported VLM)."""
    load_in_4bit: bool = True
    """QLoRA: NF4 + double quant for the language model; vision tower and lm_head stay unquantized."""
    dtype: str = "auto"
    """Compute dtype: auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16."""
    gradient_checkpointing: bool = True
    trust_remote_code: bool = False
    """Off unless you trust the model repository's Python code."""
    attn_implementation: str = "sdpa"


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    vision: bool = False
    """Also put LoRA on the vision tower (off by default, as EasyR1: vLLM cannot serve ViT LoRA)."""
    init_from: str = ""
    """Continue from a pre-trained adapter directory (its copy is frozen as the reference)."""


@dataclass
class DataConfig:
    task: str = ""
    """A procedural task (count_shapes | bar_compare | gauge); or leave empty and set train_file."""
    train_file: str = ""
    test_file: str = ""
    image_root: str = ""
    n_train: int = 512
    n_test: int = 100
    n_val: int = 0
    """Validation items carved from the train split (procedural tasks: a disjoint draw) for tuning;
    never tune on the test split."""
    image_size: int = 56
    template: str = "structured"
    """Prompt template: structured (SRPO: <perception>, <think>, \\boxed) | think | plain."""
    perception_tag: str = "perception"
    think_tag: str = "think"
    max_prompt_length: int = 1024
    """Prompts longer than this are skipped with a warning; image tokens are never cut."""
    columns: dict[str, str] = field(default_factory=dict)
    """Dataset column for each field: image, question, answer, choices (e.g. {question: query}); unset
    fields keep their usual names. Empty: hub datasets detect a known benchmark layout (Geometry3K, ...)."""


@dataclass
class RolloutConfig:
    group_size: int = 8
    """G: responses sampled per prompt."""
    prompts_per_step: int = 4
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    engine: str = "hf"
    """hf (transformers generate) | unsloth (CUDA only, optional extra)."""
    generation_batch_size: int = 0
    """Prompts per generate call (0 = all of the step's prompts at once)."""


@dataclass
class RewardConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"accuracy": 0.9, "format": 0.1})
    """Reward functions and their weights (EasyR1: 0.9 accuracy + 0.1 format)."""
    answer_fallback: str = "none"
    """What to grade when there is no \\boxed{}: none | last_number | last_line."""
    timeout_s: float = 5.0
    """Per-call time limit of a user reward (file.py:fn / pkg.mod:fn); past it the call scores 0 and its
    worker process is killed and replaced."""
    max_failure_frac: float = 0.5
    """Stop the run when more than this share of one user reward's calls in a step fail (time out, raise,
    or return NaN/inf/a non-number)."""


@dataclass
class CorruptionConfig:
    kind: str = "patch"
    """patch (blackening) | noise | blur | constant."""
    patch_size: int = 14
    prob: float = 0.6
    noise_std: float = 64.0
    blur_radius: float = 6.0
    per_response: bool = True
    """One corruption mask per response (VPPO, SRPO) or one per prompt (PAPO)."""


@dataclass
class SrpoConfig:
    lam: float = 0.5
    tau: float = 1.0
    kappa: float = 10.0
    renormalize: bool = True
    consistency: str = "removed"
    """removed (perception content removed, +1 pass) | corrupted (reuse the corrupted-image pass) |
    perception_only (how much the written perception alone explains the token: log-prob with the image
    corrupted minus log-prob with the image corrupted and the perception removed, +1 pass)."""
    margin: float = 0.0


@dataclass
class PapoConfig:
    gamma: float = 0.02
    eta_ori: float = 0.0
    eta_aug: float = 0.0
    schedule: str = "fixed"


@dataclass
class VppoConfig:
    k: float = 0.4
    beta_min: float = 0.9
    entropy_coef: float = 0.06


@dataclass
class VgpoConfig:
    beta: float = 0.3
    gamma: float = 0.5
    kappa: float = 0.2


@dataclass
class AlgorithmConfig:
    name: str = "grpo"
    """grpo | dapo | dr_grpo | srpo | papo | vppo | vgpo."""
    adv_scale: str = "group"
    """group | batch | none (Dr. GRPO)."""
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = None
    agg: str = "token"
    """token (DAPO global token mean) | seq (GRPO paper) | dr_grpo (sum / (N * max_len))."""
    beta: float = 0.0
    """KL-to-reference coefficient (k3, reference = adapter disabled); 0 skips the reference pass."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal (DAPO)."""
    filter_on: str = "accuracy"
    """What dynamic sampling compares within a group: accuracy (DAPO's and EasyR1's code: a group whose
    answers are all right or all wrong is dropped, even if the format bonus differs) | reward (the total)."""
    overlong: str = "punish"
    """Responses that hit rollout.max_new_tokens without EOS (DAPO §3.4): punish (soft overlong punishment:
    a reward penalty that grows linearly over the last `overlong_buffer` of the length budget, the full
    `overlong_penalty` when truncated) | filter (truncated responses get no gradient) | none."""
    overlong_buffer: float = 0.2
    """Share of max_new_tokens over which the soft penalty ramps up (DAPO: 4,096 of 20,480 = 0.2)."""
    overlong_penalty: float = 1.0
    """Penalty at the length cap (DAPO's penalty_factor)."""
    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)
    srpo: SrpoConfig = field(default_factory=SrpoConfig)
    papo: PapoConfig = field(default_factory=PapoConfig)
    vppo: VppoConfig = field(default_factory=VppoConfig)
    vgpo: VgpoConfig = field(default_factory=VgpoConfig)


@dataclass
class OptimConfig:
    optimizer: str = "auto"
    """auto (paged 8-bit AdamW on CUDA, AdamW on CPU) | adamw | adamw8bit | paged_adamw8bit."""
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    schedule: str = "constant"
    """constant | linear | cosine (after warmup)."""
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 4
    """Responses per forward/backward; gradients accumulate over the mini-batch."""
    mini_batches: int = 1
    """Optimizer steps per rollout batch (more than 1 makes the ratio clip matter)."""
    logprob_chunk: int | str = "auto"
    """Rows of the streamed lm_head chunk: peak logits memory is about 4 x chunk x vocab floats. auto (default):
    the largest power of two in [64, 4096] whose update-time logits stay within a quarter of the model's
    weight bytes (lite_srpo/chunking.py); or a whole number >= 1."""
    seed: int = 0
    save_every: int = 10
    keep_last: int = 3
    tokens_every: int = 1
    """Write a `tokens` event (per-token roles, scores, weights) every N steps."""
    tokens_samples: int = 2
    eval_every: int = 0
    """Evaluate on the held-out split every N steps (0 = never during training)."""
    eval_samples: int = 64
    max_consecutive_nonfinite: int = 3
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that get the same metrics as events.jsonl: tensorboard | wandb (wandb honours
    WANDB_MODE=offline, WANDB_PROJECT)."""


@dataclass
class SftConfig:
    steps: int = 0
    """SFT warm-up steps on reference traces before RL (0 = none)."""
    lr: float = 1e-3
    batch_size: int = 16
    full_finetune: bool = True
    """Train every weight (needed to start from a random tiny model); else LoRA only."""


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SftConfig = field(default_factory=SftConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


ALGORITHMS = ("grpo", "dapo", "dr_grpo", "srpo", "papo", "vppo", "vgpo")

_DAPO_ARM = {"agg": "token", "adv_scale": "group", "clip_low": 0.2, "clip_high": 0.28, "beta": 0.0, "dynamic_sampling": True}
ALGORITHM_PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeekMath GRPO: per-sequence mean, symmetric clip, KL to the reference.
    "grpo": {"agg": "seq", "adv_scale": "group", "clip_low": 0.2, "clip_high": 0.2, "beta": 0.01, "dynamic_sampling": False},
    # DAPO: token-level loss, clip-higher, no KL, dynamic sampling.
    "dapo": dict(_DAPO_ARM),
    # Dr. GRPO: no std scaling, sum / (N * max_len).
    "dr_grpo": {"agg": "dr_grpo", "adv_scale": "none", "clip_low": 0.2, "clip_high": 0.2, "beta": 0.0, "dynamic_sampling": False},
    # SRPO (lite-srpo's formulation) on the DAPO arm, like its VPPO/VGPO peers.
    "srpo": dict(_DAPO_ARM, corruption={"prob": 0.6, "per_response": True}),
    # PAPO-G (config_grpo_papo.yaml): EasyR1 token mean, clip 0.2/0.3, ref-KL 0.01, one mask per prompt.
    "papo": {"agg": "token", "adv_scale": "group", "clip_low": 0.2, "clip_high": 0.3, "beta": 0.01,
             "dynamic_sampling": False, "corruption": {"prob": 0.6, "per_response": False}},
    # VPPO (train_vppo_7b.sh): DAPO arm, p=0.5 mask per response.
    "vppo": dict(_DAPO_ARM, dual_clip=3.0, corruption={"prob": 0.5, "per_response": True}),
    # VGPO (train_vgpo_7B.sh): DAPO arm, no corruption.
    "vgpo": dict(_DAPO_ARM, dual_clip=3.0),
}

# What a key typed as a union accepts, for its error message.
UNION_HINTS: dict[str, str] = {"train.logprob_chunk": "auto or a whole number >= 1"}

CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "data.template": ("structured", "think", "plain"),
    "rollout.engine": ("hf", "unsloth"),
    "reward.answer_fallback": ("none", "last_number", "last_line"),
    "algorithm.name": ALGORITHMS,
    "algorithm.adv_scale": ("group", "batch", "none"),
    "algorithm.agg": ("token", "seq", "dr_grpo"),
    "algorithm.corruption.kind": ("patch", "noise", "blur", "constant"),
    "algorithm.srpo.consistency": ("removed", "corrupted", "perception_only"),
    "algorithm.filter_on": ("accuracy", "reward"),
    "algorithm.overlong": ("punish", "filter", "none"),
    "algorithm.papo.schedule": ("fixed", "annealing"),
    "optim.optimizer": ("auto", "adamw", "adamw8bit", "paged_adamw8bit"),
    "optim.schedule": ("constant", "linear", "cosine"),
}


def _check_ranges(cfg: RunConfig) -> list[str]:
    """Impossible values, each as 'key: value — what is allowed'."""
    errs: list[str] = []

    def need(ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            errs.append(f"{key}: {value!r} is out of range — {allowed}")

    need(cfg.rollout.group_size >= 2, "rollout.group_size", cfg.rollout.group_size, "needs >= 2 (a group baseline needs two responses)")
    need(cfg.rollout.prompts_per_step >= 1, "rollout.prompts_per_step", cfg.rollout.prompts_per_step, "needs >= 1")
    need(cfg.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", cfg.rollout.max_new_tokens, "needs >= 1")
    need(cfg.rollout.temperature > 0, "rollout.temperature", cfg.rollout.temperature, "needs > 0")
    need(0 < cfg.rollout.top_p <= 1, "rollout.top_p", cfg.rollout.top_p, "needs 0 < top_p <= 1")
    need(cfg.rollout.top_k >= 0, "rollout.top_k", cfg.rollout.top_k, "needs >= 0 (0 = off)")
    need(cfg.optim.lr > 0, "optim.lr", cfg.optim.lr, "needs > 0")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", cfg.optim.weight_decay, "needs >= 0")
    need(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", cfg.optim.warmup_steps, "needs >= 0")
    need(cfg.optim.max_grad_norm > 0, "optim.max_grad_norm", cfg.optim.max_grad_norm, "needs > 0")
    need(len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas", cfg.optim.betas, "two numbers in [0, 1)")
    need(cfg.train.steps >= 1, "train.steps", cfg.train.steps, "needs >= 1")
    need(cfg.train.micro_batch_size >= 1, "train.micro_batch_size", cfg.train.micro_batch_size, "needs >= 1")
    need(cfg.train.mini_batches >= 1, "train.mini_batches", cfg.train.mini_batches, "needs >= 1")
    chunk = cfg.train.logprob_chunk
    need(chunk == "auto" or (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 1),
         "train.logprob_chunk", chunk, "auto or a whole number >= 1")
    need(cfg.train.save_every >= 0, "train.save_every", cfg.train.save_every, "needs >= 0 (0 = only at the end)")
    need(cfg.train.keep_last >= 1, "train.keep_last", cfg.train.keep_last, "needs >= 1")
    need(cfg.lora.r >= 1, "lora.r", cfg.lora.r, "needs >= 1")
    need(0 <= cfg.lora.dropout < 1, "lora.dropout", cfg.lora.dropout, "needs 0 <= dropout < 1")
    # Sampling and scoring must be the same policy: the old log-probs, the ratio and every role score
    # are taken under the full, dropout-free distribution the tokens were sampled from.
    if cfg.lora.dropout > 0:
        errs.append(f"lora.dropout: {cfg.lora.dropout!r} — RL needs 0: the model stays in train mode, so dropout "
                    "would make the old log-probs differ from the policy that sampled the responses")
    if cfg.rollout.top_p < 1 or cfg.rollout.top_k > 0:
        errs.append(f"rollout.top_p={cfg.rollout.top_p!r} / rollout.top_k={cfg.rollout.top_k!r} — RL needs top_p 1.0 and "
                    "top_k 0: tokens sampled from a truncated distribution would be scored under the full one "
                    "(use them with `lite-srpo eval` only)")
    need(cfg.algorithm.clip_low >= 0 and cfg.algorithm.clip_low < 1, "algorithm.clip_low", cfg.algorithm.clip_low, "needs 0 <= clip_low < 1")
    need(cfg.algorithm.clip_high >= 0, "algorithm.clip_high", cfg.algorithm.clip_high, "needs >= 0")
    need(cfg.algorithm.dual_clip is None or cfg.algorithm.dual_clip > 1, "algorithm.dual_clip", cfg.algorithm.dual_clip, "null or > 1")
    need(cfg.algorithm.beta >= 0, "algorithm.beta", cfg.algorithm.beta, "needs >= 0")
    need(0 < cfg.algorithm.srpo.lam < 1, "algorithm.srpo.lam", cfg.algorithm.srpo.lam, "needs 0 < lam < 1 so weights stay positive")
    need(cfg.algorithm.srpo.tau > 0, "algorithm.srpo.tau", cfg.algorithm.srpo.tau, "needs > 0")
    need(cfg.algorithm.srpo.kappa > 0, "algorithm.srpo.kappa", cfg.algorithm.srpo.kappa, "needs > 0")
    need(0 <= cfg.algorithm.corruption.prob <= 1, "algorithm.corruption.prob", cfg.algorithm.corruption.prob, "needs 0 <= prob <= 1")
    need(cfg.algorithm.corruption.patch_size >= 1, "algorithm.corruption.patch_size", cfg.algorithm.corruption.patch_size, "needs >= 1")
    need(0 < cfg.algorithm.vppo.k <= 1, "algorithm.vppo.k", cfg.algorithm.vppo.k, "needs 0 < k <= 1")
    need(0 < cfg.algorithm.vppo.beta_min <= 1, "algorithm.vppo.beta_min", cfg.algorithm.vppo.beta_min, "needs 0 < beta_min <= 1")
    need(0 <= cfg.algorithm.overlong_buffer < 1, "algorithm.overlong_buffer", cfg.algorithm.overlong_buffer,
         "needs 0 <= buffer < 1 (a share of rollout.max_new_tokens)")
    need(cfg.algorithm.overlong_penalty >= 0, "algorithm.overlong_penalty", cfg.algorithm.overlong_penalty, "needs >= 0")
    need(cfg.data.n_val >= 0, "data.n_val", cfg.data.n_val, "needs >= 0")
    need(cfg.data.n_train >= 1, "data.n_train", cfg.data.n_train, "needs >= 1")
    need(cfg.data.image_size >= 28, "data.image_size", cfg.data.image_size, "needs >= 28 (one vision token)")
    need(cfg.sft.steps >= 0, "sft.steps", cfg.sft.steps, "needs >= 0")
    need(cfg.sft.lr > 0, "sft.lr", cfg.sft.lr, "needs > 0")
    if not cfg.model.path:
        errs.append("model.path: missing — a local model directory or a hub id (e.g. Qwen/Qwen2.5-VL-3B-Instruct)")
    if not cfg.data.task and not cfg.data.train_file:
        errs.append("data: set data.task (count_shapes | bar_compare | gauge) or data.train_file (JSONL/Parquet/dataset dir)")
    if cfg.algorithm.name == "srpo" and cfg.data.template != "structured":
        errs.append(f"data.template: {cfg.data.template!r} with algorithm.name 'srpo' — SRPO needs the 'structured' "
                    "template (<perception>…</perception><think>…</think>\\boxed{}) to find perception and reasoning tokens")
    from ..run.trackers import tracker_problems
    from .user_rewards import check_reward_name

    for name, weight in cfg.reward.weights.items():
        problem = check_reward_name(name)  # user functions (file.py:fn, pkg.mod:fn) are imported and checked here
        if problem:
            errs.append(f"reward.weights.{name}: {problem}")
        elif not isinstance(weight, (int, float)):
            errs.append(f"reward.weights.{name}: {weight!r} is not a number")
    need(cfg.reward.timeout_s > 0, "reward.timeout_s", cfg.reward.timeout_s, "needs > 0 (seconds per user reward call)")
    need(0 <= cfg.reward.max_failure_frac <= 1, "reward.max_failure_frac", cfg.reward.max_failure_frac, "needs 0 <= frac <= 1")
    for key, column in cfg.data.columns.items():
        if key not in ("image", "question", "answer", "choices"):
            errs.append(f"data.columns.{key}: unknown field — map image, question, answer or choices to a column")
        elif not isinstance(column, str) or not column:
            errs.append(f"data.columns.{key}: {column!r} should be a column name")
    from ..data.hub import is_hub_uri, parse_hub_uri

    for key in ("train_file", "test_file"):
        if is_hub_uri(getattr(cfg.data, key)):
            try:
                parse_hub_uri(getattr(cfg.data, key))
            except LiteSrpoError as exc:
                errs.append(f"data.{key}: {exc}")
    errs.extend(tracker_problems(cfg.train.report_to))
    if cfg.train.micro_batch_size > cfg.rollout.group_size * cfg.rollout.prompts_per_step:
        errs.append(f"train.micro_batch_size: {cfg.train.micro_batch_size} exceeds the responses per step "
                    f"({cfg.rollout.prompts_per_step} x {cfg.rollout.group_size})")
    return errs


def _yaml11_float(text: str) -> Any:
    try:
        return float(text) if text.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity") else text
    except ValueError:
        return text


def _coerce(value: Any, tp: Any, key: str, errs: list[str]) -> Any:
    """Check `value` against the annotated type; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key, errs)
        for tp_i in inner:  # the first member the value fits (e.g. `int | str`: 256 or "auto")
            trial: list[str] = []
            out = _coerce(value, tp_i, key, trial)
            if not trial:
                return out
        errs.append(f"{key}: {value!r} is not allowed — "
                    + UNION_HINTS.get(key, " or ".join(getattr(a, "__name__", str(a)) for a in inner)))
        return value
    if origin is list:
        if not isinstance(value, list):
            errs.append(f"{key}: {value!r} should be a list")
            return value
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]", errs) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            errs.append(f"{key}: {value!r} should be a mapping")
            return value
        _, val_tp = typing.get_args(tp)
        return {k: _coerce(v, val_tp, f"{key}.{k}", errs) for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):
            value = _yaml11_float(value)  # PyYAML reads `1e-5` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errs.append(f"{key}: {value!r} should be a number")
            return value
        return float(value)
    if tp is bool:
        if not isinstance(value, bool):
            errs.append(f"{key}: {value!r} should be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errs.append(f"{key}: {value!r} should be a whole number")
        return value
    if tp is str:
        if not isinstance(value, str):
            errs.append(f"{key}: {value!r} should be a string")
        return value
    return value


def _build(cls: type, data: dict, prefix: str, errs: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            errs.append(f"{full}: unknown key — allowed keys here: {allowed}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                errs.append(f"{full}: should be a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}")
                continue
            kwargs[key] = _build(tp, value, f"{full}.", errs)
        else:
            value = _coerce(value, tp, full, errs)
            allowed = CHOICES.get(full)
            if allowed is not None and value not in allowed:
                errs.append(f"{full}: {value!r} is not one of {', '.join(allowed)}")
            kwargs[key] = value
    return cls(**kwargs)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`algorithm.srpo.lam=0.3` -> (["algorithm", "srpo", "lam"], 0.3); values are parsed as YAML scalars."""
    if text.startswith("-"):
        raise ConfigError(f"{text!r}: overrides are key=value (e.g. train.steps=10), not --flags")
    if "=" not in text:
        raise ConfigError(f"{text!r}: an override must look like key.sub=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{text!r}: empty key in override")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {exc}") from None
    return key.split("."), value


def config_from_dict(data: dict, source: str = "recipe") -> RunConfig:
    """Validate a nested dict into a RunConfig, applying the algorithm preset first."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the recipe must be a YAML mapping, got {type(data).__name__}")
    algo = data.get("algorithm", {}) or {}
    if not isinstance(algo, dict):
        raise ConfigError(f"{source}: algorithm: should be a mapping (e.g. algorithm: {{name: srpo}})")
    name = algo.get("name", AlgorithmConfig.name)
    if name not in ALGORITHMS:
        raise ConfigError(f"algorithm.name: {name!r} is not one of {', '.join(ALGORITHMS)}")
    data = dict(data)
    data["algorithm"] = _deep_merge(ALGORITHM_PRESETS[name], algo)
    errs: list[str] = []
    cfg = _build(RunConfig, data, "", errs)
    if not errs:
        errs = _check_ranges(cfg)
    if errs:
        raise ConfigError(f"{source}: {len(errs)} problem(s):\n  - " + "\n  - ".join(errs))
    return cfg


def load_recipe_dict(path: str | Path) -> dict:
    """Read a recipe with the safe YAML loader (no Python objects can be constructed from it)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipe {path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: must be a YAML mapping of sections (model, data, rollout, ...)")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            child = dict(child) if isinstance(child, dict) else {}
            node[k] = child
            node = child
        node[keys[-1]] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    data = load_recipe_dict(path) if path else {}
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data, source=str(path or "overrides"))


def config_to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def check_divisible(prompts_per_step: int, world_size: int) -> None:
    """Groups stay whole on one rank and every rank gets the same number of prompts."""
    if prompts_per_step % world_size:
        raise ConfigError(f"rollout.prompts_per_step={prompts_per_step} is not divisible by the {world_size} ranks: "
                          f"each rank samples prompts_per_step / ranks prompts (x group_size responses). Use a "
                          f"multiple of {world_size}, or another number of processes")
