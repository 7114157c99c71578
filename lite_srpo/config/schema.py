"""The recipe's schema: one dataclass per section, a one-line doc per field, the algorithm presets and
the allowed values of every choice key.

`algorithm.name` selects a preset (the papers' defaults, `ALGORITHM_PRESETS`) that fills every
`algorithm.*` key the recipe leaves unset. Loading (`load.py`) and validation (`validate.py`) read these.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
    """Also put LoRA on the vision tower's blocks (off by default, as in EasyR1 and Unsloth). Serving them
    is no longer the obstacle: vLLM serves LoRA on the vision tower and connector of the Qwen-VL series
    and Idefics3 since PR #26674 (`enable_tower_connector_lora`). With it on, the vision cache is off (the
    tower changes within a step) and the planner counts the tower's adapter."""
    init_from: str = ""
    """Continue from a pre-trained adapter directory (its copy is frozen as the reference)."""


@dataclass
class DataConfig:
    task: str = ""
    """A procedural task (count_shapes | bar_compare | gauge | near_colours); or leave empty and set train_file."""
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
    """hf (transformers generate with lite-srpo's sampler): the only engine today. `unsloth` and `vllm` are
    refused with an error rather than accepted and ignored."""
    generation_batch_size: int = 0
    """Prompts per generate call (0 = all of the step's prompts at once)."""
    generation_rows: int = 0
    """Most rows (responses) decoded together in one generate call; a group's G samples may then take
    several calls, and the KV cache holds only this many rows (0 = every row of the call at once). With
    > 0 each response's sampler is seeded by (seed, step, prompt, sample), so the tokens do not depend on
    the split."""
    max_resample_rounds: int = 0
    """With dynamic sampling: rounds of new prompts sampled to refill the groups it dropped, as DAPO and
    EasyR1's `online_filtering` do (0 = none: the batch shrinks instead). Each round samples as many
    prompts as groups are missing; the cost is logged (dynamic_sampling/extra_responses, time/resample)."""


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
    weighted_roles: str = "both"
    """both | perception | reasoning: which role's tokens get SRPO weights; the other role stays at weight 1
    (the ablations of "which part of SRPO carries the gain"). `perception` skips the removed-perception pass."""
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
    importance_sampling_level: str = "token"
    """token (one ratio per token, PPO/GRPO) | sequence (GSPO: one ratio per response, the exp of its mean
    token log-ratio, clipped as a whole; TRL's `importance_sampling_level="sequence"`). GSPO's paper clips
    far tighter at this level (3e-4 / 4e-4): set clip_low / clip_high to match."""
    policy_loss: str = "clip"
    """clip (the PPO clipped surrogate) | cispo (CISPO, MiniMax-M1 / ScaleRL: -sg(min(ratio, cispo_max)) x
    advantage x log-prob, so no token loses its gradient to the clip; TRL's `loss_type="cispo"`)."""
    cispo_max: float = 5.0
    """CISPO's cap on the detached importance weight (ScaleRL's epsilon_max; TRL recommends 5.0)."""
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
    weight bytes (lite_srpo/model/chunking.py); or a whole number >= 1."""
    offload_activations: bool = False
    """Long responses: keep the checkpointed layers' inputs in (pinned) host memory during the update and
    bring each back for its layer's backward (needs model.gradient_checkpointing). Same gradients; costs
    a device-host copy each way (lite_srpo/model/activation_memory.py)."""
    recompute_chunk: int = 0
    """Long responses: during the update run each decoder MLP over this many tokens at a time, checkpointed,
    so its [tokens x intermediate] buffers exist one chunk at a time (0 = off). Gradients equal to ~1e-7."""
    auto_fit: bool = False
    """At the start of a GPU run, replace the memory settings (generate calls and rows, micro-batch,
    lm_head chunk, checkpointing, offload, recompute chunk) by the fastest combination `lite-srpo plan
    --fit` finds for the card; on CPU it does nothing (logged)."""
    auto_fit_margin: float = 0.1
    """Fraction of the card auto_fit leaves outside the plan (0.1: 2.4 GiB of 24). The plan's CUDA
    context (0.5 GiB) and allocator slack (x1.07) are not yet measured on a GPU, and it does not see
    cuBLAS/bitsandbytes workspaces or a desktop session on the same card; an out-of-memory retry halves
    the micro-batch for the rest of the run, which costs more than the margin does."""
    seed: int = 0
    deterministic: bool = False
    """Bitwise-repeatable GPU runs at some speed cost (`run/runtime.py::set_determinism`): deterministic
    kernels only (an op without one raises), cuBLAS's fixed workspace, no cuDNN autotuning, no TF32 or
    reduced-precision bf16 reductions. CPU runs are repeatable without it (on one machine and thread count)."""
    save_every: int = 10
    keep_last: int = 3
    tokens_every: int = 1
    """Write a `tokens` event (per-token roles, scores, weights) every N steps."""
    tokens_samples: int = 8
    """Responses recorded per `tokens` event for the UI's Tokens tab, prompt by prompt: 8 is one whole group
    at G = 8 (responses to the same image and question, side by side)."""
    eval_every: int = 0
    """Evaluate on the held-out split every N steps (0 = never during training)."""
    eval_on_start: bool = False
    """Also evaluate once before the first RL step (step 0), so the eval curve starts from the
    baseline (TRL's `eval_on_start`). Not repeated on --resume."""
    eval_samples: int = 64
    max_consecutive_nonfinite: int = 3
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that get the same metrics as events.jsonl: tensorboard | wandb (wandb honours
    WANDB_MODE=offline, WANDB_PROJECT)."""
    log_completions_every: int = 0
    """Every N steps, send the trackers a table of a few sampled responses (image, role-marked response,
    reward parts, advantage, SRPO weight per role); 0 = never. Needs train.report_to."""


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

# Values users ask for that do not exist yet: refused with what exists today, never accepted and ignored.
NOT_IMPLEMENTED: dict[str, dict[str, str]] = {
    "rollout.engine": {
        "unsloth": "the Unsloth generation path is not implemented; the only engine today is 'hf' "
                   "(transformers generate over the shared 4-bit base, with lite-srpo's sampler)",
        "vllm": "a vLLM engine is not implemented yet; the only engine today is 'hf'",
    },
}

# What a key typed as a union accepts, for its error message.
UNION_HINTS: dict[str, str] = {"train.logprob_chunk": "auto or a whole number >= 1"}

CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "data.template": ("structured", "think", "plain"),
    "rollout.engine": ("hf",),
    "reward.answer_fallback": ("none", "last_number", "last_line"),
    "algorithm.name": ALGORITHMS,
    "algorithm.adv_scale": ("group", "batch", "none"),
    "algorithm.agg": ("token", "seq", "dr_grpo"),
    "algorithm.importance_sampling_level": ("token", "sequence"),
    "algorithm.policy_loss": ("clip", "cispo"),
    "algorithm.corruption.kind": ("patch", "noise", "blur", "constant"),
    "algorithm.srpo.consistency": ("removed", "corrupted", "perception_only"),
    "algorithm.srpo.weighted_roles": ("both", "perception", "reasoning"),
    "algorithm.filter_on": ("accuracy", "reward"),
    "algorithm.overlong": ("punish", "filter", "none"),
    "algorithm.papo.schedule": ("fixed", "annealing"),
    "optim.optimizer": ("auto", "adamw", "adamw8bit", "paged_adamw8bit"),
    "optim.schedule": ("constant", "linear", "cosine"),
}
