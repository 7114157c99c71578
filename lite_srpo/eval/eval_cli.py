"""`lite-srpo eval`: accuracy of a run, checkpoint, exported adapter or plain model on benchmark files.

Every result names its protocol, because the papers disagree (research/algorithms.md §6.4): PAPO and
VPPO report avg@8 at T = 1.0, VGPO reports greedy decoding. Compare methods under one protocol.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import LoraConfig, ModelConfig, RunConfig
from ..config.hub_uri import is_hub_uri, parse_hub_uri
from ..data.hub import load_data_source
from ..data.prompts import TEMPLATES, ResponseFormat
from ..data.splits import load_splits
from ..data.tasks import TASKS, load_benchmark, make_task
from ..data.tasks.base import Sample
from ..errors import ConfigError, DataError, ModelError
from ..model.export.source import EXPORT_INFO, load_run_config, resolve_base, resolve_checkpoint, say
from ..model.policy import PolicyModel, load_base, load_policy, pick_device, resolve_dtype
from ..rl.evaluate import Protocol, evaluate

BENCHMARK_NAMES = ("auto", "generic", "mathvista", "geometry3k", "mathverse", "wemath", "mmk12", "logicvista")


@dataclass
class EvalModel:
    """The model under evaluation, the recipe it came with (if any) and how it was found."""

    policy: PolicyModel
    kind: str  # "checkpoint" | "adapter" | "model"
    cfg: RunConfig | None = None
    info: dict = field(default_factory=dict)
    run_dir: Path | None = None


def _recipe_in(directory: Path) -> RunConfig | None:
    recipe = directory / "recipe.yaml"
    return load_run_config(recipe) if recipe.is_file() else None


def _looks_like_run(p: Path) -> bool:
    return ((p / "adapter").is_dir() or (p / "trainer_state.pt").is_file() or (p / "checkpoints").is_dir()
            or ((p / "recipe.yaml").is_file() and not (p / "config.json").is_file()
                and not (p / "adapter_config.json").is_file()))


def load_eval_model(source: str, *, base: str | None = None, load_in_4bit: bool | None = None,
                    dtype: str = "auto", device: torch.device | None = None) -> EvalModel:
    """A run (latest checkpoint), a checkpoint, an exported adapter, or a plain HF model dir / hub id."""
    device = device or pick_device()
    p = Path(source).expanduser()
    if p.is_dir() and _looks_like_run(p):
        src = resolve_checkpoint(p)
        model_cfg = dataclasses.replace(
            src.cfg.model, path=resolve_base(src.cfg.model.path, src.run_dir, base), gradient_checkpointing=False,
            dtype=dtype if dtype != "auto" else src.cfg.model.dtype,
            load_in_4bit=src.cfg.model.load_in_4bit if load_in_4bit is None else load_in_4bit)
        policy = load_policy(model_cfg, src.cfg.lora, adapter_path=str(src.adapter_dir), trainable=False, device=device)
        info = {"source": str(src.checkpoint), "kind": "checkpoint", "step": src.step, "base": model_cfg.path,
                "load_in_4bit": model_cfg.load_in_4bit}
        return EvalModel(policy, "checkpoint", src.cfg, info, src.run_dir)
    if p.is_dir() and (p / "adapter_config.json").is_file():
        cfg = _recipe_in(p)
        four_bit = load_in_4bit if load_in_4bit is not None else bool(cfg and cfg.model.load_in_4bit)
        recipe_dtype = cfg.model.dtype if cfg else "auto"
        model_cfg = ModelConfig(path=resolve_base(base or _adapter_base(p), None, base), load_in_4bit=four_bit,
                                dtype=dtype if dtype != "auto" else recipe_dtype, gradient_checkpointing=False,
                                trust_remote_code=bool(cfg and cfg.model.trust_remote_code))
        policy = load_policy(model_cfg, LoraConfig(), adapter_path=str(p), trainable=False, device=device)
        info = {"source": str(p), "kind": "adapter", "base": model_cfg.path, "load_in_4bit": four_bit}
        return EvalModel(policy, "adapter", cfg, info)
    if p.exists() and not (p / "config.json").is_file():
        raise ModelError(f"{source}: not a run, checkpoint, adapter (adapter_config.json) or model (config.json) "
                         "directory")
    cfg = _recipe_in(p) if p.is_dir() else None
    quantized = p.is_dir() and "quantization_config" in json.loads((p / "config.json").read_text(encoding="utf-8"))
    model_cfg = ModelConfig(path=str(p) if p.exists() else source, load_in_4bit=bool(load_in_4bit) or quantized,
                            dtype=dtype, gradient_checkpointing=False)
    model, processor, family = load_base(model_cfg, device)
    policy = PolicyModel(model=model, processor=processor, family=family, device=device,
                         dtype=resolve_dtype(dtype, device), gradient_checkpointing=False)
    info = {"source": model_cfg.path, "kind": "model", "load_in_4bit": model_cfg.load_in_4bit}
    return EvalModel(policy, "model", cfg, info)


def _adapter_base(adapter_dir: Path) -> str:
    """Where an exported adapter's base lives: our export.json, else peft's adapter_config.json."""
    info = adapter_dir / EXPORT_INFO
    if info.is_file():
        base = json.loads(info.read_text(encoding="utf-8")).get("base")
        if base:
            return base
    base = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{adapter_dir}: the adapter does not name its base model; pass --base PATH")
    return base


def load_eval_data(specs: list[str], *, benchmark: str = "auto", image_root: str | None = None,
                   limit: int | None = None, n_task: int = 100, seed: int = 0, image_size: int = 56,
                   columns: dict[str, str] | None = None,
                   hub_image_root: str | None = None) -> list[tuple[str, list[Sample]]]:
    """(name, samples) per `--data`: a benchmark/dataset file or folder, a procedural task's test split, or a
    hub dataset `hf://ORG/NAME[:CONFIG][@SPLIT]` (split default `test`), loaded as training loads one: the
    same loader, `columns` (the recipe's `data.columns` or `--columns`), benchmark detection without them;
    relative image paths resolve against `image_root`, else `hub_image_root` (the recipe's), else the cwd."""
    out: list[tuple[str, list[Sample]]] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if is_hub_uri(spec):
            _check_hub_benchmark(spec, benchmark)
            samples = load_data_source(spec, key="--data", image_root=image_root or hub_image_root, columns=columns,
                                       default_split="test")[:limit]
            ref = parse_hub_uri(spec)
            name = f"{ref.repo}{':' + ref.config if ref.config else ''}@{ref.split or 'test'}"
        elif path.exists():
            samples = load_benchmark(path, benchmark, image_root, limit=limit)
            name = path.stem if path.is_file() else path.name
        elif spec in TASKS:
            samples = make_task(spec, "test", limit or n_task, seed, image_size=image_size)
            name = spec
        else:
            raise DataError(f"--data {spec}: no such file or folder, and not a procedural task "
                            f"({', '.join(sorted(TASKS))})")
        taken = {n for n, _ in out}
        unique, k = name, 2
        while unique in taken:
            unique, k = f"{name}#{k}", k + 1
        out.append((unique, samples))
    return out


def _check_hub_benchmark(spec: str, benchmark: str) -> None:
    if benchmark != "auto":
        raise ConfigError(f"--benchmark {benchmark} applies to files; for {spec} name the columns with --columns "
                          "(or the recipe's data.columns), or leave them to detection")


def summarize(per_dataset: dict[str, dict]) -> dict:
    """Overall numbers weighted by responses (every response counts once), plus the unweighted mean."""
    total = sum(r["n_responses"] for r in per_dataset.values())
    weighted = {key: sum(r[key] * r["n_responses"] for r in per_dataset.values()) / max(total, 1)
                for key in ("accuracy", "format_rate", "mean_length")}
    return {**weighted, "n_samples": sum(r["n_samples"] for r in per_dataset.values()), "n_responses": total,
            "macro_accuracy": sum(r["accuracy"] for r in per_dataset.values()) / max(len(per_dataset), 1)}


def format_table(result: dict) -> str:
    """The printed results table: one row per dataset, then overall and macro average when several."""
    head = f"{'dataset':<24}{'samples':>8}{'responses':>10}{'accuracy':>10}{'format':>8}{'mean len':>10}"
    rows = [f"\n{result['model']['source']} — protocol {result['protocol']}, max_new_tokens "
            f"{result['settings']['max_new_tokens']}, template {result['settings']['template']}", head, "-" * len(head)]

    def row(name: str, r: dict) -> str:
        return (f"{name[:23]:<24}{r['n_samples']:>8}{r['n_responses']:>10}{r['accuracy']:>10.3f}"
                f"{r['format_rate']:>8.3f}{r['mean_length']:>10.1f}")

    rows += [row(name, r) for name, r in result["datasets"].items()]
    if len(result["datasets"]) > 1:
        rows += ["-" * len(head), row("overall", result["overall"]),
                 f"{'macro average':<42}{result['overall']['macro_accuracy']:>10.3f}"]
    return "\n".join(rows)


def run_eval(model: EvalModel, datasets: list[tuple[str, list[Sample]]], *, protocol: Protocol, template: str,
             fmt: ResponseFormat, max_new_tokens: int, batch_size: int, answer_fallback: str, seed: int = 0,
             log=say) -> dict:
    """Evaluate every dataset under one protocol (re-seeded per dataset, so each is reproducible alone)."""
    model.policy.model.eval()  # no dropout; the CPU 4-bit repack is disabled at load
    per_dataset: dict[str, dict] = {}
    t0 = time.perf_counter()
    for name, samples in datasets:
        torch.manual_seed(seed)
        t = time.perf_counter()
        log(f"[eval] {name}: {len(samples)} samples, {protocol.label}")
        result = evaluate(model.policy, samples, template, fmt, protocol=protocol, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, answer_fallback=answer_fallback)
        per_dataset[name] = {**result, "seconds": time.perf_counter() - t}
    return {"model": model.info, "protocol": protocol.label,
            "protocol_spec": {"name": protocol.name, "k": protocol.k,
                              "temperature": None if protocol.name == "greedy" else protocol.temperature},
            "settings": {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "template": template,
                         "perception_tag": fmt.perception_tag, "think_tag": fmt.think_tag,
                         "answer_fallback": answer_fallback, "seed": seed},
            "datasets": per_dataset, "overall": summarize(per_dataset), "seconds": time.perf_counter() - t0}


def write_json(result: dict, path: Path) -> None:
    """Atomic write: a reader never sees half a results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lite-srpo eval",
        description="Accuracy per dataset and overall, format rate and mean response length under a named "
                    "protocol. PAPO and VPPO report avg@8 at T=1.0; VGPO reports greedy decoding.")
    p.add_argument("source", metavar="MODEL_OR_RUN_OR_CHECKPOINT",
                   help="runs/<name>, a checkpoint dir, an exported adapter or model dir, or a hub id")
    p.add_argument("--data", action="append", default=[], metavar="PATH_OR_TASK",
                   help="benchmark/dataset file or folder, a procedural task name, or a hub dataset "
                        "hf://ORG/NAME[:CONFIG][@SPLIT] (split default test) (repeatable); "
                        "default for a run: its held-out split")
    p.add_argument("--columns", default=None, metavar="FIELD=COLUMN,...",
                   help="column names of hf:// data (image, question, answer, choices), as data.columns; "
                        "default: the recipe's data.columns")
    p.add_argument("--benchmark", default="auto", choices=BENCHMARK_NAMES, help="column mapping of --data files")
    p.add_argument("--image-root", default=None, help="folder that relative image paths resolve against")
    p.add_argument("--limit", type=int, default=None, help="at most this many samples per dataset")
    p.add_argument("--n", type=int, default=100, help="samples of a procedural task's test split")
    p.add_argument("--protocol", default="greedy", help="greedy | avg@K (K samples per prompt at --temperature)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of avg@K")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: the recipe's rollout.max_new_tokens, else 512")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (× K under avg@K)")
    p.add_argument("--template", default=None, choices=sorted(TEMPLATES), help="default: the recipe's, else structured")
    p.add_argument("--answer-fallback", default=None, choices=["none", "last_number", "last_line"])
    p.add_argument("--base", default=None, help="base model for a run or adapter whose base moved")
    p.add_argument("--load-in-4bit", default=None, action=argparse.BooleanOptionalAction,
                   help="default: as trained for runs and adapters, off for plain models")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results JSON (default for runs: <run>/eval/step_N-<protocol>.json)")
    return p


def parse_columns(text: str | None) -> dict[str, str] | None:
    """`--columns image=pic,question=query` → the `data.columns` mapping (None when not given)."""
    if text is None:
        return None
    out: dict[str, str] = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        field_name, sep, column = part.partition("=")
        if not sep or field_name not in ("image", "question", "answer", "choices") or not column:
            raise ConfigError(f"--columns {part!r}: write FIELD=COLUMN with FIELD one of image, question, answer, "
                              "choices")
        out[field_name] = column
    return out


def _check_args(a: argparse.Namespace) -> Protocol:
    try:
        protocol = Protocol.parse(a.protocol, a.temperature)
    except ValueError as exc:
        raise ConfigError(f"--protocol: {exc}") from None
    for flag, value, low in (("--max-new-tokens", a.max_new_tokens, 1), ("--batch-size", a.batch_size, 1),
                             ("--limit", a.limit, 1), ("--n", a.n, 1)):
        if value is not None and value < low:
            raise ConfigError(f"{flag} {value}: needs >= {low}")
    if not a.temperature > 0:
        raise ConfigError(f"--temperature {a.temperature}: needs > 0")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    for spec in a.data:  # before any model loads
        if is_hub_uri(spec):
            parse_hub_uri(spec)
            _check_hub_benchmark(spec, a.benchmark)
    parse_columns(a.columns)
    return protocol


def evaluate_source(source: str, data: list[str] | None = None, *, protocol: Protocol = Protocol("greedy"),
                    benchmark: str = "auto", image_root: str | None = None, limit: int | None = None,
                    n_task: int = 100, max_new_tokens: int | None = None, batch_size: int = 16,
                    template: str | None = None, answer_fallback: str | None = None, base: str | None = None,
                    load_in_4bit: bool | None = None, dtype: str = "auto", device: torch.device | None = None,
                    seed: int = 0, columns: dict[str, str] | None = None) -> tuple[dict, EvalModel]:
    """Load `source` and evaluate it on `data` (default for a run: its held-out split) under `protocol`.

    What is not given comes from the source's recipe when it has one (template, tags, max_new_tokens,
    answer_fallback; data.columns and data.image_root for hf:// data), else the command's defaults.
    Returns the results and the model they belong to."""
    path = Path(source).expanduser()
    if not data and not (path.is_dir() and (_looks_like_run(path) or (path / "recipe.yaml").is_file())):
        raise ConfigError("--data is required for a model without a recipe (give a file or a task name)")
    model = load_eval_model(source, base=base, load_in_4bit=load_in_4bit, dtype=dtype, device=device or pick_device())
    cfg = model.cfg
    if data:
        datasets = load_eval_data(data, benchmark=benchmark, image_root=image_root, limit=limit, n_task=n_task,
                                  seed=seed, image_size=cfg.data.image_size if cfg else 56,
                                  columns=columns if columns is not None else (cfg.data.columns if cfg else None),
                                  hub_image_root=(cfg.data.image_root or None) if cfg else None)
    else:
        test = load_splits(cfg.data, seed=cfg.train.seed)[1][:limit]
        datasets = [(f"held-out ({cfg.data.task or Path(cfg.data.test_file or cfg.data.train_file).stem})", test)]
    d = cfg.data if cfg else None
    template = template or (d.template if d else "structured")
    tags = {"perception_tag": d.perception_tag, "think_tag": d.think_tag} if d else {}
    fmt = ResponseFormat(template=template, **tags)
    max_new = max_new_tokens or (cfg.rollout.max_new_tokens if cfg else 512)
    fallback = answer_fallback or (cfg.reward.answer_fallback if cfg else "none")
    result = run_eval(model, datasets, protocol=protocol, template=template, fmt=fmt, max_new_tokens=max_new,
                      batch_size=batch_size, answer_fallback=fallback, seed=seed)
    return result, model


def eval_main(argv: list[str]) -> int:
    """`lite-srpo eval MODEL_OR_RUN_OR_CHECKPOINT --data ... --protocol greedy|avg@K ...`; raises LiteSrpoError."""
    a = build_parser().parse_args(argv)
    protocol = _check_args(a)
    device = pick_device() if a.device == "auto" else torch.device(a.device)
    result, model = evaluate_source(a.source, a.data, protocol=protocol, benchmark=a.benchmark,
                                    image_root=a.image_root, limit=a.limit, n_task=a.n,
                                    max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, template=a.template,
                                    answer_fallback=a.answer_fallback, base=a.base, load_in_4bit=a.load_in_4bit,
                                    dtype=a.dtype, device=device, seed=a.seed, columns=parse_columns(a.columns))
    say(format_table(result))
    out = Path(a.out) if a.out else None
    if out is None and model.run_dir is not None:
        tag = protocol.label.split(" ")[0].replace("@", "at")
        out = model.run_dir / "eval" / f"step_{model.info.get('step', 0):06d}-{tag}.json"
    if out is not None:
        write_json(result, out)
        say(f"results: {out}")
    else:
        say("(pass --out FILE to save these results as JSON)")
    return 0
