"""Teacher-forced passes over a rollout batch on the one shared base (DESIGN.md §2).

Each pass streams over micro-batches and keeps only `[N, R]` vectors: the final hidden states of a
micro-batch go through the lm_head chunk by chunk (`streaming.token_logprobs`), so `[tokens × vocab]`
logits never exist. Which passes run is decided by the algorithm (`algorithms.AlgorithmSpec`).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch

from ..data.corrupt import corrupt_images
from ..data.prompts import remove_perception_ids
from ..model.policy import PolicyModel
from ..model.streaming import token_logprobs
from ..model.vision_cache import VisionFeatureCache, batch_cache
from .objectives import vgpo
from .rollout import RolloutBatch, collate, encode_visual, pad_token_id

log = logging.getLogger(__name__)


@dataclass
class PassOutputs:
    """Per-token vectors from the no-grad passes; absent passes stay None."""

    old_logp: torch.Tensor | None  # [N, R]; None when the update's own log-probs stand in (`need_old`)
    ref_logp: torch.Tensor | None = None
    corrupted_logp: torch.Tensor | None = None
    removed_logp: torch.Tensor | None = None
    focus_cos: torch.Tensor | None = None  # VGPO: cos(token hidden, mean image hidden) [N, R], per row
    focus: torch.Tensor | None = None  # VGPO visual focus rho [N, R], min-max over the batch (`with_focus`)
    seconds: dict[str, float] = field(default_factory=dict)

    def with_focus(self, response_mask: torch.Tensor) -> "PassOutputs":
        """VGPO's batch min-max over these rows; redone over the whole step after the ranks' exchange."""
        if self.focus_cos is not None:
            self.focus = vgpo.minmax_focus(self.focus_cos, response_mask)
        return self


def micro_batches(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def response_hidden(hidden: torch.Tensor, prompt_len: int, resp_len: int) -> torch.Tensor:
    """Hidden states that predict the response tokens: positions prompt_len-1 … prompt_len+R-2."""
    return hidden[:, prompt_len - 1: prompt_len - 1 + resp_len]


def rows_logprobs(policy: PolicyModel, batch: RolloutBatch, rows: list[int], chunk: int, temperature: float,
                  responses: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                  visual_override: list[dict] | None = None, keep_hidden: bool = False,
                  vision_cache: VisionFeatureCache | bool | None = None):
    """Log-probs of `responses` (default: the sampled ones) for `rows`; grad follows the caller's mode.

    `vision_cache`: None (default) uses the step's cache in `batch.extras` when the vision tower is
    frozen and the family supports it (`vision_cache.py`: each image is encoded once per step); False
    runs the vision tower on the pixels as before; a `VisionFeatureCache` uses that one."""
    responses = batch.response_ids[rows] if responses is None else responses
    mask = batch.response_mask[rows] if mask is None else mask
    prompts = [batch.prompts[batch.prompt_of[i]] for i in rows]
    inputs, prompt_len = collate(prompts, pad_token_id(policy), responses, mask, visual_override, policy.device)
    if vision_cache is None or vision_cache is True:
        cache = batch_cache(policy, batch)
    else:
        cache = vision_cache if isinstance(vision_cache, VisionFeatureCache) else None
    if cache is not None:
        inputs = cache.apply(inputs, visual_override or [p.visual for p in prompts])
    hidden = policy.hidden_states(inputs)
    h_resp = response_hidden(hidden, prompt_len, responses.shape[1])
    weight, bias = policy.lm_head()
    logp = token_logprobs(h_resp, weight, responses.to(policy.device), chunk=chunk, temperature=temperature,
                          lm_head_bias=bias)
    if keep_hidden:
        return logp, hidden, inputs, prompt_len
    return logp


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str):
    t0 = time.perf_counter()
    yield
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0


def corrupted_visuals(policy: PolicyModel, batch: RolloutBatch, kind: str, seed: int, per_response: bool,
                      params: dict) -> list[dict[str, torch.Tensor]] | None:
    """One corrupted copy of the images per response (or per prompt), same size; None if no images.

    A copy's seed comes from the prompt's index in the step (and the response's place in its group), so
    it is the same whichever rank holds the prompt and whichever groups dynamic sampling dropped."""
    if not any(p.sample.images for p in batch.prompts):
        log.warning("corrupted-image pass skipped: the samples carry no image")
        return None
    cache: dict[int, dict] = {}
    out = []
    seen: dict[int, int] = {}
    for p in batch.prompt_of:
        j = seen[p] = seen.get(p, -1) + 1
        prompt = batch.first_prompt + p
        key = prompt * batch.prompt_of.count(p) + j if per_response else prompt
        if key not in cache:
            images = corrupt_images(batch.prompts[p].sample.images, kind=kind, seed=seed * 100_003 + key, **params)
            cache[key] = encode_visual(policy, images)
        out.append(cache[key])
    return out


@torch.no_grad()
def run_passes(policy: PolicyModel, batch: RolloutBatch, *, micro_batch: int, chunk: int, temperature: float,
               need_ref: bool, need_corrupted: bool, need_removed: bool, need_focus: bool,
               roles: torch.Tensor | None, corruption: dict, seed: int,
               removed_on_corrupted: bool = False, need_old: bool = True) -> PassOutputs:
    """Old, reference, corrupted-image and perception-removed log-probs for every response.

    `removed_on_corrupted` runs the perception-removed pass on the corrupted images (SRPO's
    `consistency: perception_only`), so that image and written perception are both gone.
    `need_old=False` skips the old pass (see `old_pass_needed`); VGPO's focus always needs it."""
    n, r = batch.response_ids.shape
    seconds: dict[str, float] = {}
    need_old = need_old or need_focus
    old = torch.zeros(n, r) if need_old else None
    ref = torch.zeros(n, r) if need_ref else None
    focus_cos = torch.zeros(n, r) if need_focus else None
    with _timed(seconds, "old"), policy.policy():
        for rows in micro_batches(n, micro_batch) if need_old else []:
            if need_focus:
                logp, hidden, inputs, plen = rows_logprobs(policy, batch, rows, chunk, temperature, keep_hidden=True)
                resp_hidden, image_mean = focus_inputs(policy, hidden, inputs, plen, r)
                focus_cos[rows] = vgpo.focus_cosine(resp_hidden, image_mean, batch.response_mask[rows].bool())
            else:
                logp = rows_logprobs(policy, batch, rows, chunk, temperature)
            old[rows] = logp.float().cpu()
    if need_ref:
        with _timed(seconds, "reference"), policy.reference():
            for rows in micro_batches(n, micro_batch):
                ref[rows] = rows_logprobs(policy, batch, rows, chunk, temperature).float().cpu()
    corrupted, visuals = None, None
    if need_corrupted:
        with _timed(seconds, "corrupted"), policy.policy():
            visuals = corrupted_visuals(policy, batch, seed=seed, **corruption)
            if visuals is not None:
                corrupted = torch.zeros(n, r)
                for rows in micro_batches(n, micro_batch):
                    corrupted[rows] = rows_logprobs(policy, batch, rows, chunk, temperature,
                                                    visual_override=[visuals[i] for i in rows]).float().cpu()
    removed = None
    if need_removed and roles is not None:
        with _timed(seconds, "removed"), policy.policy():
            override = visuals if removed_on_corrupted else None
            if removed_on_corrupted and visuals is None:
                log.warning("perception_only consistency needs corrupted images; the samples carry none")
            else:
                removed = perception_removed_logprobs(policy, batch, roles, micro_batch, chunk, temperature,
                                                      visual_override=override)
    return PassOutputs(old_logp=old, ref_logp=ref, corrupted_logp=corrupted, removed_logp=removed,
                       focus_cos=focus_cos, seconds=seconds).with_focus(batch.response_mask)


def perception_removed_logprobs(policy: PolicyModel, batch: RolloutBatch, roles: torch.Tensor, micro_batch: int,
                                chunk: int, temperature: float,
                                visual_override: list[dict] | None = None) -> torch.Tensor:
    """n_t: the same response with its perception content removed (tags kept), scattered back to [N, R]."""
    n, r = batch.response_ids.shape
    pad = pad_token_id(policy)
    out = torch.zeros(n, r)
    for rows in micro_batches(n, micro_batch):
        kept_ids, kept_pos = [], []
        for i in rows:
            length = int(batch.response_mask[i].sum())
            ids = batch.response_ids[i, :length].tolist()
            ids_kept, index = remove_perception_ids(ids, roles[i, :length].tolist())
            kept_ids.append(ids_kept)
            kept_pos.append(index)
        width = max(1, max(len(k) for k in kept_ids))
        resp = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, ids in enumerate(kept_ids):
            resp[j, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[j, :len(ids)] = 1
        visuals = None if visual_override is None else [visual_override[i] for i in rows]
        logp = rows_logprobs(policy, batch, rows, chunk, temperature, responses=resp, mask=mask,
                             visual_override=visuals).float().cpu()
        for j, i in enumerate(rows):
            pos = torch.tensor(kept_pos[j], dtype=torch.long)
            out[i, pos] = logp[j, :len(pos)]
    return out


def focus_inputs(policy: PolicyModel, hidden: torch.Tensor, inputs: dict, prompt_len: int,
                 resp_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """VGPO's inputs: each response token's own hidden state and the mean image-token hidden state."""
    image_mask = inputs["input_ids"] == policy.image_token_id()  # [n, L]
    image_mean = vgpo.image_hidden_mean(hidden.float(), image_mask)  # [n, H]
    resp = hidden[:, prompt_len: prompt_len + resp_len].float()  # [n, R, H]
    return resp.cpu(), image_mean.cpu()
