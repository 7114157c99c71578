"""Loading a recipe: YAML (safe loader) plus `key.sub=value` overrides, built into the typed dataclasses.

Every error names the key, the value and what is allowed, and all errors are reported together:
type errors while building, then the range and combination checks of `validate.problems`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .schema import ALGORITHM_PRESETS, ALGORITHMS, CHOICES, NOT_IMPLEMENTED, UNION_HINTS, AlgorithmConfig, RunConfig
from .validate import problems


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
            if isinstance(value, str) and value in NOT_IMPLEMENTED.get(full, {}):
                errs.append(f"{full}: {value!r} — {NOT_IMPLEMENTED[full][value]}")
            elif allowed is not None and value not in allowed:
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
        errs = problems(cfg)
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
