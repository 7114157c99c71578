"""The Launch form: recipe → field values, field values (+ free overrides) → validated RunConfig, errors per field.

The saved YAML is the fully resolved config (`dump_yaml`), so what is shown is exactly what trains.
A changed algorithm starts again from the recipe as written, so the new algorithm's preset applies.
"""
from __future__ import annotations

import copy
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lite_srpo.config import ALGORITHMS, RunConfig, apply_overrides, config_from_dict, config_to_dict, load_recipe_dict
from lite_srpo.errors import ConfigError

from .process import LAUNCH_RECIPE, train_command


@dataclass(frozen=True)
class FormField:
    key: str  # dotted recipe key
    label: str
    kind: str  # text | bool | choice | int | float | mapping (edited as one line of YAML)
    info: str = ""
    choices: tuple[str, ...] = ()

    @property
    def elem_id(self) -> str:
        return "f-" + self.key.replace(".", "-").replace("_", "-")


def _task_names() -> tuple[str, ...]:
    from lite_srpo.data.tasks.procedural import TASKS

    return ("",) + tuple(sorted(TASKS))


FIELDS: tuple[FormField, ...] = (
    FormField("name", "Run name", "text", "the run directory is <output dir>/<name>"),
    FormField("output_dir", "Output dir", "text", "where run directories are created"),
    FormField("model.path", "Model (local path or hub id)", "text", "e.g. Qwen/Qwen2.5-VL-3B-Instruct"),
    FormField("model.load_in_4bit", "4-bit base (QLoRA)", "bool", "NF4 base shared by every pass"),
    FormField("data.task", "Procedural task", "choice", "or leave empty and give a train file", _task_names()),
    FormField("data.train_file", "Train file", "text", "JSONL / Parquet / dataset dir (when no task)"),
    FormField("algorithm.name", "Algorithm", "choice", "its paper's defaults fill the other algorithm keys", ALGORITHMS),
    FormField("rollout.group_size", "G (responses per prompt)", "int", ">= 2"),
    FormField("rollout.prompts_per_step", "Prompts per step", "int", ">= 1"),
    FormField("rollout.max_new_tokens", "Max new tokens", "int", "response length cap"),
    FormField("data.max_prompt_length", "Max prompt length", "int", "longer prompts are skipped"),
    FormField("lora.r", "LoRA rank", "int", ">= 1"),
    FormField("reward.weights", "Rewards and weights", "mapping",
              'YAML mapping; built-ins accuracy, format, or your own "file.py:function" / "package.module:function"'),
    FormField("optim.lr", "Learning rate", "float", "> 0"),
    FormField("train.steps", "RL steps", "int", ">= 1"),
    FormField("sft.steps", "SFT warm-up steps", "int", "0 = none"),
    FormField("train.save_every", "Checkpoint every N steps", "int", "0 = only at the end"),
)
FIELD_KEYS = tuple(f.key for f in FIELDS)


def list_recipes(recipes_dir: str | Path) -> list[str]:
    d = Path(recipes_dir)
    return sorted(str(p) for p in d.glob("*.yaml")) if d.is_dir() else []


def get_key(data: dict, key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def set_key(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def form_values(recipe: dict) -> list[Any]:
    """Field values for a recipe as written, defaults filled from RunConfig for keys it leaves out."""
    defaults = config_to_dict(RunConfig())
    out = []
    for f in FIELDS:
        v = get_key(recipe, f.key)
        v = get_key(defaults, f.key) if v is None else v
        out.append(yaml.safe_dump(v, default_flow_style=True, sort_keys=False).strip() if f.kind == "mapping" else v)
    return out


def load_form(recipe_path: str | Path) -> tuple[dict, list[Any]]:
    recipe = load_recipe_dict(recipe_path)
    return recipe, form_values(recipe)


def _field_value(f: FormField, v: Any) -> Any:
    """Gradio gives floats for whole numbers and '' for empty boxes; hand config_from_dict the intended type."""
    if f.kind == "int" and isinstance(v, float) and v.is_integer():
        return int(v)
    if f.kind in ("text", "choice") and v is None:
        return ""
    if f.kind == "mapping" and isinstance(v, str):
        try:
            return yaml.safe_load(v) if v.strip() else {}
        except yaml.YAMLError:
            return v  # validation then names the key: "should be a mapping"
    return v


def parse_overrides(text: str) -> list[str]:
    """One `key.sub=value` per line (or space separated); '#' starts a comment."""
    out = []
    for line in (text or "").splitlines():
        line = line.split("#", 1)[0].strip()
        out += shlex.split(line) if line else []
    return out


def recipe_from_form(base: dict, values: list[Any], overrides_text: str = "") -> dict:
    """The recipe as written, with the form's fields set, then the free-form overrides on top."""
    data = copy.deepcopy(base or {})
    for f, v in zip(FIELDS, values):
        set_key(data, f.key, _field_value(f, v))
    return apply_overrides(data, parse_overrides(overrides_text))


# A problem line starts with its dotted key and ": ". Keys may hold '/' and ':' (a user reward such as
# reward.weights.my_rewards.py:brevity), so the key runs to the first colon followed by a space.
_PROBLEM = re.compile(r"^\s*(?:-\s*)?([A-Za-z_][^\s]*?):(?:\s|$)")


def split_errors(message: str) -> dict[str, list[str]]:
    """ConfigError text → {dotted key: [problem lines]} ('' for lines that name no key)."""
    out: dict[str, list[str]] = {}
    lines = message.splitlines()
    body = [ln for ln in lines[1:] if ln.strip()] if len(lines) > 1 else lines
    for line in body:
        m = _PROBLEM.match(line)
        key = m.group(1) if m else ""
        out.setdefault(key, []).append(line.strip().lstrip("- "))
    return out


def errors_for_field(errors: dict[str, list[str]], key: str) -> list[str]:
    """Problems of one field: its own key or a sub-key of it (e.g. reward.weights.x for reward.weights)."""
    return [msg for k, msgs in errors.items() if k == key or k.startswith(key + ".") or k.startswith(key + "[")
            for msg in msgs]


@dataclass
class Validation:
    cfg: RunConfig | None
    errors: dict[str, list[str]]
    message: str

    @property
    def ok(self) -> bool:
        return self.cfg is not None


def validate(data: dict) -> Validation:
    try:
        return Validation(config_from_dict(data, source="form"), {}, "")
    except ConfigError as exc:
        return Validation(None, split_errors(str(exc)), str(exc))


def preview(cfg: RunConfig, nproc: int = 1) -> tuple[str, str, Path]:
    """(command line, YAML text, where the YAML will be saved) for a validated config."""
    from lite_srpo.config import dump_yaml

    yaml_path = cfg.run_dir / LAUNCH_RECIPE
    return shlex.join(train_command(yaml_path, nproc=nproc)), dump_yaml(cfg), yaml_path


def fit_to_card(base: dict, values: list[Any], overrides_text: str, gpu_mem_gib: float | None,
                nproc: int = 1) -> tuple[str, str]:
    """The launch tab's "Fit to card": (new "More settings" text, message). The fastest memory settings
    that fit the card (`lite-srpo plan --fit`) replace any the box already sets; other lines stay."""
    from lite_srpo.errors import LiteSrpoError
    from lite_srpo.model.memory.fit import SEARCHED_KEYS, fit, override_line

    kept = []
    for line in (overrides_text or "").splitlines():
        body = line.split("#", 1)[0]
        tokens = [t for t in shlex.split(body) if t.split("=", 1)[0].strip() not in SEARCHED_KEYS]
        if tokens:
            kept.append(shlex.join(tokens))
    kept_text = "\n".join(kept)
    v = validate(recipe_from_form(base, values, kept_text))
    if not v.ok:
        return overrides_text, "**Fit to card:** fix the fields marked in red first."
    budget = float(gpu_mem_gib or 24)
    try:
        result = fit(v.cfg, budget, ranks=max(1, int(nproc or 1)))
    except (LiteSrpoError, ValueError) as exc:
        return overrides_text, f"**Fit to card:** cannot plan this recipe: {exc}"
    if not result["fits"]:
        return overrides_text, (f"**Nothing fits {budget:g} GiB** at G={result['group_size']} and "
                                f"{result['response_tokens']} tokens, even with every memory saving: lower the "
                                "response length or G.")
    added = override_line(result["overrides"])
    text = "\n".join(kept + ([added] if added else []))
    return text, (f"✅ fitted to {budget:g} GiB: " + (f"`{added}`" if added else "the recipe's settings are already "
                  "the fastest that fit") + f" — planned {result['plan']['needed_gib']:.1f} GiB; longest response "
                  f"{result['max_response_tokens']} tokens, largest G {result['max_group_size']} with these settings")
