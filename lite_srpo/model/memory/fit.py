"""`lite-srpo plan --fit`: the fastest memory settings of a recipe that fit a card, by the plan's arithmetic.

Searched keys: rollout.generation_batch_size and rollout.generation_rows (together: how many generate
calls a step takes and how many rows each decodes), train.micro_batch_size, model.gradient_checkpointing,
train.offload_activations, train.recompute_chunk and train.logprob_chunk. G, the response length, the
prompts and the model stay as the recipe (or --response-len) says.

Cost order (lexicographic, first = fastest; `COST_ORDER`):
 1. fewer generate calls per step (each call is a whole decode of max_new_tokens steps, and decoding is
    memory-bound: one row costs about as much time as eight, so calls multiply the rollout time);
 2. fewer micro-batches (forward/backward passes over the batch; each dequantizes every 4-bit weight);
 3. gradient checkpointing off before on (on recomputes every layer's forward: about +1/3 update compute);
 4. offload_activations off before on (a host<->card copy of every layer input per micro-batch);
 5. recompute_chunk off, then larger chunks before smaller (more, smaller MLP kernels);
 6. the recipe's lm_head chunk, then smaller ones (more lm_head matmuls).
Generation is its own phase, so the generate settings and the training settings are chosen apart: the
fewest calls whose generation phase fits, and the first training setting in cost order whose passes and
update phases fit.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Iterator

from ...config import RunConfig
from ...errors import LiteSrpoError
from ..dims import ModelDims, as_dims, load_model_dims
from .plan import _needed, host_fits, machine_ram_gib, plan, sum_phases
from .terms import logprob_chunk, per_rank_config, phase_terms, prompt_length

log = logging.getLogger(__name__)

COST_ORDER = ("generate calls", "micro-batches", "gradient checkpointing off < on", "offload off < on",
              "recompute_chunk off < large < small", "lm_head chunk: the recipe's, then smaller")
RECOMPUTE_CHUNKS = (8192, 4096, 2048, 1024, 512, 256)
MIN_LOGPROB_CHUNK = 64
SEARCHED_KEYS = ("rollout.generation_batch_size", "rollout.generation_rows", "train.micro_batch_size",
                 "model.gradient_checkpointing", "train.offload_activations", "train.recompute_chunk",
                 "train.logprob_chunk")


def with_settings(cfg: RunConfig, settings: dict[str, Any]) -> RunConfig:
    """`cfg` with dotted keys replaced (section.key only: every searched key is one level deep)."""
    for key, value in settings.items():
        section, name = key.split(".")
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
    return cfg


def generate_calls(prompts: int, group: int, batch_prompts: int, rows: int) -> tuple[int, int]:
    """(generate calls per step, most rows in one call) for generation_batch_size / generation_rows."""
    per_call = batch_prompts if 0 < batch_prompts < prompts else prompts
    sizes = [min(per_call, prompts - i) for i in range(0, prompts, per_call)]
    if rows <= 0:
        return len(sizes), group * per_call
    return sum(math.ceil(group * n / rows) for n in sizes), min(group * per_call, rows)


def generation_options(prompts: int, group: int) -> list[dict[str, int]]:
    """(generation_batch_size, generation_rows) for each number of generate calls, fewest calls first: the
    one with the fewest rows per call (the least KV cache for that many calls); ties keep the plainer
    setting (no row cap, then all prompts at once)."""
    seen: dict[int, tuple] = {}
    for gbs in range(0, prompts):
        per_call = gbs or prompts
        for rows in range(0, group * per_call):
            calls, most = generate_calls(prompts, group, gbs, rows)
            key = (calls, most, rows != 0, gbs != 0, gbs, rows)
            if calls not in seen or key < seen[calls]:
                seen[calls] = key
    return [{"rollout.generation_batch_size": k[4], "rollout.generation_rows": k[5], "calls": k[0], "rows": k[1]}
            for k in sorted(seen.values())]


def training_options(cfg: RunConfig, rows: int, chunk0: int) -> Iterator[dict[str, Any]]:
    """Training settings in cost order (micro-batches, checkpointing, offload, recompute chunk, lm_head chunk)."""
    sizes = sorted({math.ceil(rows / k) for k in range(1, rows + 1)}, reverse=True)
    chunks: list[int | str] = [cfg.train.logprob_chunk]
    c = chunk0 // 2
    while c >= MIN_LOGPROB_CHUNK:
        chunks.append(c)
        c //= 2
    for m in sizes:
        for gc in (False, True):
            for offload in ((False,) if not gc else (False, True)):
                for rc in ((0,) if not gc else (0, *RECOMPUTE_CHUNKS)):
                    for lpc in chunks:
                        yield {"train.micro_batch_size": m, "model.gradient_checkpointing": gc,
                               "train.offload_activations": offload, "train.recompute_chunk": rc,
                               "train.logprob_chunk": lpc, "micro_batches": math.ceil(rows / m)}


def most_saving(cfg: RunConfig) -> dict[str, Any]:
    """The settings with the least memory: one row per generate call, micro-batch 1, every saving on."""
    return {"rollout.generation_batch_size": 1, "rollout.generation_rows": 1, "train.micro_batch_size": 1,
            "model.gradient_checkpointing": True, "train.offload_activations": True,
            "train.recompute_chunk": RECOMPUTE_CHUNKS[-1], "train.logprob_chunk": MIN_LOGPROB_CHUNK}


def fit(cfg: RunConfig, gpu_mem_gib: float = 24.0, model_dims: dict | ModelDims | None = None, *,
        device: str = "cuda", prompt_tokens: int | None = None, ranks: int = 1,
        response_tokens: int | None = None, host_mem_gib: float | None = None) -> dict:
    """The fastest searched settings (cost order above) whose planned step fits `gpu_mem_gib`.

    Returns `settings` (every searched key), `overrides` (those that differ from the recipe, plus
    rollout.max_new_tokens when `response_tokens` is given), `fits`, the chosen plan, and the longest
    response and largest G that fit with them; `most_saving` is the longest response with every saving on."""
    if response_tokens is not None:
        if response_tokens < 1:
            raise LiteSrpoError(f"--response-len {response_tokens}: needs >= 1")
        cfg = with_settings(cfg, {"rollout.max_new_tokens": response_tokens})
    dims = as_dims(model_dims, cfg.model.path) if model_dims is not None else load_model_dims(cfg.model.path)
    prompt, image, _ = prompt_length(cfg, dims, prompt_tokens)
    g, r = cfg.rollout.group_size, cfg.rollout.max_new_tokens
    local = per_rank_config(cfg, ranks).rollout.prompts_per_step

    def phase_ok(c: RunConfig, names: tuple[str, ...]) -> bool:
        terms = phase_terms(c, dims, device, prompt, g, r, ranks, image=image)
        _, phases, _ = sum_phases(terms, device)
        card_ok = all(_needed(phases[p], device) <= gpu_mem_gib for p in names)
        if "update" not in names:  # the pinned buffers hold the update's offloaded layer inputs
            return card_ok
        return card_ok and host_fits(sum(t.gib for t in terms if t.phase == "host"), host_mem_gib)

    gen = next((o for o in generation_options(local, g)
                if phase_ok(with_settings(cfg, _keys(o)), ("generation",))), None)
    chunk0 = logprob_chunk(cfg, dims, device)
    train = next((o for o in training_options(cfg, g * local, chunk0)
                  if phase_ok(with_settings(cfg, _keys(o)), ("passes", "update"))), None)
    saving = most_saving(cfg)
    saving_plan = plan(with_settings(cfg, saving), gpu_mem_gib, dims, device=device, prompt_tokens=prompt_tokens,
                       ranks=ranks, host_mem_gib=host_mem_gib)
    out: dict[str, Any] = {"budget_gib": gpu_mem_gib, "device": device, "group_size": g, "response_tokens": r,
                           "cost_order": list(COST_ORDER), "fits": gen is not None and train is not None,
                           "most_saving": {"settings": saving,
                                           "max_response_tokens": saving_plan["max_response_tokens"],
                                           "max_group_size": saving_plan["max_group_size"]},
                           "generation": gen, "training": train}
    if not out["fits"]:
        out.update(settings=None, overrides={}, plan=saving_plan)
        return out
    settings = {**_keys(gen), **_keys(train)}
    chosen = with_settings(cfg, settings)
    p = plan(chosen, gpu_mem_gib, dims, device=device, prompt_tokens=prompt_tokens, ranks=ranks,
             host_mem_gib=host_mem_gib)
    overrides = {k: v for k, v in settings.items() if _get(cfg, k) != v}
    if response_tokens is not None:
        overrides = {"rollout.max_new_tokens": response_tokens, **overrides}
    out.update(settings=settings, overrides=overrides, plan=p, fits=p["fits"],
               max_response_tokens=p["max_response_tokens"], max_group_size=p["max_group_size"])
    return out


def _keys(option: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in option.items() if "." in k}


def _get(cfg: RunConfig, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def override_line(overrides: dict[str, Any]) -> str:
    """key=value ... as `lite-srpo train RECIPE` takes them (booleans as true/false)."""
    return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items())


def format_fit(result: dict, recipe: str) -> str:
    """The fit as text: what was chosen and why, the line to paste, and what fits with it."""
    lines = [f"fit: {result['device']}, {result['budget_gib']:.1f} GiB; G={result['group_size']}, responses "
             f"{result['response_tokens']} tokens", "cost order (fastest first): " + "; ".join(COST_ORDER)]
    saving = result["most_saving"]
    if not result["fits"]:
        p = result["plan"]
        lines.append(f"NOTHING FITS: even with every memory saving ({override_line(saving['settings'])}) the step "
                     f"needs {p['needed_gib']:.2f} GiB (peak phase: {p['peak_phase']}). Lower "
                     "rollout.max_new_tokens or rollout.group_size, or use a larger card.")
        return "\n".join(lines)
    gen, train, p = result["generation"], result["training"], result["plan"]
    lines += [
        f"fastest that fits: {gen['calls']} generate call(s) of at most {gen['rows']} rows; "
        f"{train['micro_batches']} micro-batch(es) of {train['train.micro_batch_size']}; gradient checkpointing "
        f"{'on' if train['model.gradient_checkpointing'] else 'off'}; offload_activations "
        f"{str(train['train.offload_activations']).lower()}; recompute_chunk {train['train.recompute_chunk'] or 'off'}; "
        f"lm_head chunk {train['train.logprob_chunk']}",
        f"planned peak {p['peak_gib']:.2f} GiB allocated ({p['peak_phase']}); needed {p['needed_gib']:.2f} of "
        f"{p['budget_gib']:.1f} GiB" + (f"; pinned host memory {p['host_gib']:.2f} GiB" if p.get("host_gib") else ""),
        "paste: lite-srpo train " + recipe + (" " + override_line(result["overrides"]) if result["overrides"] else "")
        + ("" if result["overrides"] else "   (the recipe's settings are already the fastest that fit)"),
        f"with these settings: longest response that fits {result['max_response_tokens']} tokens; largest G "
        f"{result['max_group_size']}",
        f"with every memory saving ({override_line(saving['settings'])}): longest response "
        f"{saving['max_response_tokens']} tokens",
    ]
    return "\n".join(lines)


def auto_fit(cfg: RunConfig, ranks: int = 1) -> RunConfig:
    """train.auto_fit: the fastest settings that fit this process's CUDA card, logged; on CPU the recipe
    as written (there is no card to fit, and CPU memory is the machine's to share)."""
    if not cfg.train.auto_fit:
        return cfg
    import torch

    if not torch.cuda.is_available():
        log.info("train.auto_fit: no CUDA device, nothing to fit; the recipe's memory settings are used as written")
        return cfg
    card = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    budget = card * (1 - cfg.train.auto_fit_margin)
    try:
        result = fit(cfg, budget, ranks=ranks, host_mem_gib=machine_ram_gib())
    except LiteSrpoError as exc:  # e.g. a model whose dimensions the planner cannot read
        log.warning("train.auto_fit: cannot plan this recipe (%s); running it as written", exc)
        return cfg
    if not result["fits"]:
        log.warning("train.auto_fit: nothing fits %.1f GiB by the plan; running the recipe as written "
                    "(out-of-memory retries lower the micro-batch and generate batch)", budget)
        return cfg
    log.info("train.auto_fit: %.1f GiB card, %.1f GiB planned for (auto_fit_margin %g) -> %s (planned %.2f GiB "
             "needed)", card, budget, cfg.train.auto_fit_margin,
             override_line(result["overrides"]) or "the recipe's settings (already the fastest that fit)",
             result["plan"]["needed_gib"])
    return with_settings(cfg, result["settings"])
