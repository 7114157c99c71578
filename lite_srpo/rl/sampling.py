"""Sampling the next token by inverse CDF, for HF `generate`: the same distribution, a fraction of the cost.

HF's sampling step is `torch.multinomial(softmax(scores))`, which for one sample draws one exponential
random number per vocabulary entry (`exponential_`, then `argmax(p / q)`): on CPU, for 8 rows over
Qwen's 151,936-token vocabulary, that was 36 ms of each 81 ms decode step of the bench model, more than
the lm_head itself (bench/results/generation_profile.json). Inverse-CDF sampling draws one uniform
number per row: token = the first index whose cumulative probability exceeds u · total, with the
cumulative sum in float64 so that no token's probability is lost to rounding (fp32 would round tail
tokens of p < 6e-8 to 0 or 6e-8).

It runs as the last logits processor of a *greedy* `generate`: it applies the temperature to the
processed scores (after HF's suppress-tokens / min-new-tokens processors, as HF's own temperature
warper would), samples, and returns scores that are -inf except at the sampled token, so greedy
selection picks exactly that token. Only for full-distribution sampling (top_p = 1, top_k = 0),
which RL requires; truncated sampling keeps HF's path.
"""
from __future__ import annotations

import torch

ENABLED = True
"""Process-wide switch, for benchmarks that measure HF's own sampler (bench/vs_trl.py --ablate)."""


class InverseCdfSampler:
    """A logits processor (any `(input_ids, scores) -> scores` callable is one) that samples one token per
    row from softmax(scores / temperature)."""

    def __init__(self, temperature: float = 1.0, generator: torch.Generator | None = None,
                 record: bool = False, suppress: list[int] | None = None) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        self.temperature = temperature
        self.generator = generator
        self.uniforms: list[torch.Tensor] | None = [] if record else None  # the draws, for tests
        self.row_generators: list[torch.Generator] | None = None
        """One CPU generator per row of the current generate call (rollout.generation_rows > 0): row i's
        uniform comes from its own stream, so a response's tokens do not depend on which rows share its call."""
        self.suppress = list(suppress or [])
        """Token ids never drawn (vision special tokens). Setting their few columns to -inf here replaces
        HF's SuppressTokensLogitsProcessor, which builds a vocabulary-sized mask and `where` at every step."""
        self._suppress_cache: tuple | None = None

    def _suppress_ids(self, scores: torch.Tensor) -> torch.Tensor:
        """The suppressed ids inside the vocabulary, on the scores' device: filtered on the host and
        copied once per generate call, not per token (a boolean index on the device would sync with the
        host at every step, and cannot run on `meta` at all: the step trace samples there)."""
        key = (tuple(self.suppress), scores.device, scores.shape[-1])
        if self._suppress_cache is None or self._suppress_cache[0] != key:
            ids = [i for i in self.suppress if 0 <= i < scores.shape[-1]]
            self._suppress_cache = (key, torch.tensor(ids, dtype=torch.long, device=scores.device))
        return self._suppress_cache[1]

    def sample(self, scores: torch.Tensor) -> torch.Tensor:
        """Token ids [B] drawn from softmax(scores / temperature) by inverse CDF."""
        if self.suppress:
            scores = scores.index_fill(1, self._suppress_ids(scores), float("-inf"))
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
        if self.row_generators is not None:
            if len(self.row_generators) != scores.shape[0]:
                raise ValueError(f"{len(self.row_generators)} row generators for {scores.shape[0]} rows")
            u = torch.cat([torch.rand(1, dtype=torch.float64, generator=g) for g in self.row_generators])
            u = u.to(scores.device)[:, None]
        else:
            u = torch.rand(scores.shape[0], 1, dtype=torch.float64, device=scores.device, generator=self.generator)
        if self.uniforms is not None:
            self.uniforms.append(u.squeeze(1).cpu())
        idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
        return idx.clamp_(max=scores.shape[-1] - 1).squeeze(1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        tokens = self.sample(scores)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tokens[:, None], 0.0)


def inverse_cdf_tokens(scores: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The tokens `InverseCdfSampler` picks for given uniform draws (to check a rollout against teacher forcing)."""
    probs = torch.softmax(scores.float() / temperature, dim=-1)
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    idx = torch.searchsorted(cdf, uniforms.to(torch.float64)[:, None] * cdf[:, -1:], right=True)
    return idx.clamp_(max=scores.shape[-1] - 1).squeeze(1)
