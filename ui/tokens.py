"""Per-token records of a `tokens` event → `gr.HighlightedText` data: hue = role, shade = score/weight/advantage."""
from __future__ import annotations

import math
from typing import Any

ROLE_NAMES = ("other", "perception", "reasoning")  # role ids 0, 1, 2 (lite_srpo.data.prompts)
MODES = {"weight": "weight", "score": "score", "advantage": "adv"}  # selector label -> token field
SHADES = 4

# Light → dark per role. Gradio draws them at 50% opacity, so the darkest shade still leaves text readable.
_PALETTE = {
    "other": ("#f3f4f6", "#d1d5db", "#9ca3af", "#4b5563"),
    "perception": ("#bfdbfe", "#93c5fd", "#3b82f6", "#1d4ed8"),
    "reasoning": ("#fde68a", "#fbbf24", "#f59e0b", "#b45309"),
}


def shade_label(role: str, bucket: int) -> str:
    return f"{role} {'▮' * bucket}"


COLOR_MAP: dict[str, str] = {shade_label(role, b + 1): colours[b] for role, colours in _PALETTE.items()
                             for b in range(SHADES)}
ROLE_COLOR_MAP: dict[str, str] = {role: colours[2] for role, colours in _PALETTE.items()}  # role only, no shade


def role_name(role: Any) -> str:
    return ROLE_NAMES[role] if isinstance(role, int) and 0 <= role < len(ROLE_NAMES) else "other"


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def shade_bucket(value: float | None, lo: float, hi: float, n: int = SHADES) -> int:
    """1 (lightest) .. n (darkest) by position of `value` in [lo, hi]; a constant range sits in the middle.

    Example with n=4, lo=0, hi=2: 0 -> 1, 0.6 -> 1 + int(0.3*4) = 2, 1.0 -> 1 + int(0.5*4) = 3, 2 -> 4.
    """
    if value is None:
        return 1
    if hi - lo < 1e-9:
        return (n + 1) // 2
    return 1 + min(n - 1, max(0, int((value - lo) / (hi - lo) * n)))


def value_range(tokens: list[dict], field: str) -> tuple[float, float] | None:
    values = [v for v in (_finite(t.get(field)) for t in tokens) if v is not None]
    return (min(values), max(values)) if values else None


def token_highlights(tokens: list[dict], mode: str = "weight") -> list[tuple[str, str]]:
    """[(token text, 'role ▮▮')] for HighlightedText; the shade is relative to this response's range."""
    field = MODES.get(mode, mode)
    rng = value_range(tokens, field) or (0.0, 0.0)
    return [(str(t.get("t", "")), shade_label(role_name(t.get("role")), shade_bucket(_finite(t.get(field)), *rng)))
            for t in tokens]


def role_counts(tokens: list[dict]) -> dict[str, int]:
    counts = {name: 0 for name in ROLE_NAMES}
    for t in tokens:
        counts[role_name(t.get("role"))] += 1
    return counts


def shade_caption(tokens: list[dict], mode: str) -> str:
    """One line telling what light and dark mean for this response, plus the mean value per role."""
    field = MODES.get(mode, mode)
    rng = value_range(tokens, field)
    if rng is None:
        return f"no {mode} values in this response"
    lo, hi = rng
    head = f"all tokens {mode} = {lo:.3f}" if hi - lo < 1e-9 else f"shade: light {mode} = {lo:.3f} … dark = {hi:.3f}"
    parts = []
    for role in ROLE_NAMES:
        vals = [v for t in tokens if role_name(t.get("role")) == role
                for v in [_finite(t.get(field))] if v is not None]
        if vals:
            parts.append(f"{role} mean {sum(vals) / len(vals):.3f} ({len(vals)} tokens)")
    return head + (" — " + "; ".join(parts) if parts else "")


def token_events(events: list[dict]) -> list[dict]:
    """The `tokens` events (full or the tail's stubs) that carry at least one sample."""
    return [e for e in events if e.get("type") == "tokens" and (e.get("samples") or e.get("n_samples"))]


def sample_header(event: dict, sample: dict) -> str:
    """Markdown beside the image: step, algorithm, question, gold answer, reward."""
    reward = _finite(sample.get("reward"))
    reward_text = "n/a" if reward is None else f"{reward:.3f}"
    question = str(sample.get("question", "")).strip()
    return (f"**step {event.get('step')}** · {event.get('algorithm', '')} · reward **{reward_text}** · "
            f"gold answer `{sample.get('answer', '')}`\n\n{question}")


ORDERS = ("as sampled", "reward", "advantage")  # how the response picker lists a step's samples


def has_roles(sample: dict) -> bool:
    """Whether any token of the response has a perception or reasoning role (events before the
    `has_roles` field are read from their tokens)."""
    if "has_roles" in sample:
        return bool(sample["has_roles"])
    return any(role_name(t.get("role")) != "other" for t in sample.get("tokens") or [])


def first_with_roles(samples: list[dict]) -> int:
    """The sample the view opens on: the first whose tokens have roles (a format failure shows every
    token grey with weight 1, which is not what the tab is for), else the first."""
    return next((i for i, s in enumerate(samples) if has_roles(s)), 0)


def sample_order(samples: list[dict], order: str) -> list[int]:
    """Sample indices as the picker lists them: as sampled, or by reward / advantage, highest first
    (samples without the value last)."""
    field = {"reward": "reward", "advantage": "advantage"}.get(order)
    if field is None:
        return list(range(len(samples)))
    return sorted(range(len(samples)), key=lambda i: (_finite(samples[i].get(field)) is None,
                                                        -(_finite(samples[i].get(field)) or 0.0), i))


def sample_label(i: int, sample: dict) -> str:
    reward, adv = _finite(sample.get("reward")), _finite(sample.get("advantage"))
    parts = [f"#{i + 1}", "reward " + ("n/a" if reward is None else f"{reward:.3f}")]
    if adv is not None:
        parts.append(f"adv {adv:+.3f}")
    if not has_roles(sample):
        parts.append("(no roles)")
    return " ".join(parts)


def roles_summary(samples: list[dict]) -> str:
    n = sum(has_roles(s) for s in samples)
    return f"{n} of {len(samples)} recorded responses have perception/reasoning roles"
