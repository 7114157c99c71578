"""User reward functions named in `reward.weights` as `path/to/file.py:function` or `package.module:function`.

A user function has the signature `fn(response: str, sample: Sample) -> float`. It is loaded and its
signature checked while the recipe is validated (so a typo fails before any model loads), and loaded
again inside each reward worker process (`rewards/pool.py`), which is where it runs. This module stays free
of torch and of the rest of the package so a worker starts quickly. It also holds the in-process registry
of named reward functions (`REWARD_FUNCTIONS`), so that validation sees every name a recipe may use.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUILTIN_HINT = "a built-in reward (accuracy, format) or path/to/file.py:function or package.module:function"
BUILTIN_REWARDS = ("accuracy", "format")
"""The rewards `lite_srpo.rewards.builtin` defines; importing it registers them in REWARD_FUNCTIONS."""

REWARD_FUNCTIONS: dict[str, Callable[..., float]] = {}
"""In-process reward functions by name, `fn(response, sample, fmt) -> float`: the built-ins, and any a
training script registers (`REWARD_FUNCTIONS["mine"] = fn`). The registry sits here, with the recipe, so
that validation knows every usable name without importing the rewards layer."""


class RewardLoadError(Exception):
    """The reference cannot be resolved to a usable function; the message says why (no key prefix)."""


@dataclass(frozen=True)
class RewardRef:
    """Where a user reward lives: a `.py` file (absolute path) or an importable module, and the function name."""

    target: str
    function: str
    is_file: bool

    @property
    def spec(self) -> str:
        return f"{self.target}:{self.function}"


def is_custom_name(name: str) -> bool:
    """Names with a ':' refer to user code; anything else must be a built-in."""
    return ":" in name


def parse_reward_ref(name: str, base_dir: str | Path | None = None) -> RewardRef:
    """`file.py:fn` (relative to `base_dir`, default the working directory) or `pkg.mod:fn` → RewardRef."""
    target, sep, function = name.rpartition(":")
    if not sep or not target.strip() or not function.strip():
        raise RewardLoadError(f"expected {BUILTIN_HINT}")
    function = function.strip()
    if not function.isidentifier():
        raise RewardLoadError(f"{function!r} is not a Python function name")
    target = target.strip()
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target).expanduser()
        if not path.is_absolute():
            path = Path(base_dir or Path.cwd()) / path
        return RewardRef(str(path.resolve()), function, True)
    if not all(part.isidentifier() for part in target.split(".")):
        raise RewardLoadError(f"{target!r} is neither a .py file nor a dotted module name")
    return RewardRef(target, function, False)


def _module_from_file(path: str) -> Any:
    file = Path(path)
    if not file.is_file():
        raise RewardLoadError(f"file {path} not found")
    stat = file.stat()
    # A fresh module per file version: an edited reward file is re-read by the next run in the same process.
    key = hashlib.sha1(f"{path}:{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()[:12]
    mod_name = f"lite_srpo_user_reward_{file.stem}_{key}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, file)
    if spec is None or spec.loader is None:
        raise RewardLoadError(f"{path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:  # noqa: BLE001 - user code: any failure is a load error for the recipe
        sys.modules.pop(mod_name, None)
        raise RewardLoadError(f"importing {path} failed: {type(exc).__name__}: {exc}") from None
    return module


def _module_from_name(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        raise RewardLoadError(f"module {name!r} not found ({exc})") from None
    except BaseException as exc:  # noqa: BLE001 - user code
        raise RewardLoadError(f"importing {name} failed: {type(exc).__name__}: {exc}") from None


def check_signature(fn: Any, where: str) -> None:
    """The function must accept `(response, sample)` as two positional arguments."""
    if not callable(fn):
        raise RewardLoadError(f"{where} is not callable")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: trust them
    try:
        sig.bind("response", object())
    except TypeError as exc:
        raise RewardLoadError(f"{where}{sig} does not accept (response, sample): {exc}") from None


def load_reward(ref: RewardRef) -> Callable[[str, Any], float]:
    """Import the module/file and return the checked function."""
    module = _module_from_file(ref.target) if ref.is_file else _module_from_name(ref.target)
    fn = getattr(module, ref.function, None)
    if fn is None:
        available = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise RewardLoadError(f"no function {ref.function!r} in {ref.target} "
                              f"(callables there: {', '.join(available) or 'none'})")
    check_signature(fn, f"{ref.target}:{ref.function}")
    return fn


def check_reward_name(name: str) -> str | None:
    """None when `name` is usable in `reward.weights`, else what is wrong (for config validation)."""
    known = dict.fromkeys([*BUILTIN_REWARDS, *REWARD_FUNCTIONS])
    if name in known:
        return None
    if not is_custom_name(name):
        return f"unknown reward — valid names: {', '.join(known)}, or path/to/file.py:function " \
               "or package.module:function"
    try:
        load_reward(parse_reward_ref(name))
    except RewardLoadError as exc:
        return str(exc)
    return None
