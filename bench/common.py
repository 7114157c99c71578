"""Shared benchmark helpers: bench models, fresh-process measurements, peak memory, results and tables.

Every figure a benchmark reports is measured in its own child process (`measure_in_subprocess`), because
on CPU the only cheap peak-memory counter is the process high-water mark; the child resets it
(`reset_peak`) after loading so a step's own peak is not hidden by the load.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
MODELS_DIR = ROOT / "tiny_models" / "bench"  # ignored by git (.gitignore: tiny_models/)
REAL_VOCAB = 151_936  # Qwen2.5-VL-3B / Qwen2-VL-2B vocabulary size
# The --quick smoke-test model: tiny vocabulary and layers, for the benches' own tests.
QUICK_DIMS = {"vocab": 4096, "hidden": 64, "intermediate": 256, "layers": 2, "heads": 2, "kv_heads": 1}
GIB = 2**30



# --------------------------------------------------------------------------------------------------
# models


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2/2.5-VL split of head_dim/2 rotary frequencies into (t, h, w): 64 -> [8, 12, 12]."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def build_bench_model(out_dir: str | Path | None = None, *, vocab: int = REAL_VOCAB, hidden: int = 256,
                      intermediate: int = 1024, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                      max_pixels: int = 448 * 448, seed: int = 0) -> Path:
    """A random Qwen2.5-VL with a few small layers but a real vocabulary, saved like a hub checkpoint.

    The tokenizer and processor come from `lite_srpo.model.tiny` (vocabulary 1,024); sampled ids above that
    decode to nothing, which is fine for memory and speed measurements. Cached: a directory built with
    the same dimensions is reused.
    """
    if out_dir is None:
        out_dir = MODELS_DIR / f"qwen2_5_vl_v{vocab}_h{hidden}_i{intermediate}_l{layers}_a{heads}_kv{kv_heads}"
    text = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "max_position_embeddings": 32_768}
    return build_model(out_dir, text, max_pixels=max_pixels, seed=seed)


def build_model(out_dir: str | Path, text: dict, vision: dict | None = None, *, tie: bool = False,
                max_pixels: int = 448 * 448, min_pixels: int = 56 * 56, seed: int = 0, dtype: str = "float32",
                device: str = "cpu") -> Path:
    """A random Qwen2.5-VL with the given text (and optionally vision) config, the tiny tokenizer/processor.

    `text`/`vision` hold HF config keys (e.g. the published Qwen2.5-VL-7B values); unset keys keep the
    tiny model's. Weights are initialised on `device` in `dtype` and saved as safetensors. Cached by a
    marker file holding every argument.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    from lite_srpo.model.tiny import make_tiny

    spec = {"text": text, "vision": vision, "tie": tie, "max_pixels": max_pixels, "min_pixels": min_pixels,
            "seed": seed, "dtype": dtype}
    out = Path(out_dir)
    marker = out / "bench_spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return out
    make_tiny("qwen2_5_vl", out, size="demo", seed=seed)  # tokenizer, processor, chat template
    config = AutoConfig.from_pretrained(out)
    tc = config.text_config
    for key, value in text.items():
        setattr(tc, key, value)
    tc.layer_types = ["full_attention"] * tc.num_hidden_layers
    head_dim = tc.hidden_size // tc.num_attention_heads
    tc.rope_parameters = dict(tc.rope_parameters, mrope_section=_mrope_section(head_dim))
    for key, value in (vision or {}).items():
        setattr(config.vision_config, key, value)
    config.vision_config.out_hidden_size = tc.hidden_size
    config.tie_word_embeddings = tie
    tc.tie_word_embeddings = tie
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype))
    model.generation_config = GenerationConfig.from_pretrained(out)
    for stale in out.glob("model*.safetensors*"):
        stale.unlink()
    model.save_pretrained(out)
    del model
    _set_pixels(out, max_pixels, min_pixels)
    marker.write_text(json.dumps(spec))
    return out


def _set_pixels(model_dir: Path, max_pixels: int, min_pixels: int) -> None:
    """Let the processor keep images up to `max_pixels` (the tiny processor caps them at 112x112)."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = model_dir / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        node = data.get("image_processor", data)
        if "max_pixels" in node or "size" in node:
            node["max_pixels"], node["min_pixels"] = max_pixels, min_pixels
            if isinstance(node.get("size"), dict) and "longest_edge" in node["size"]:
                node["size"]["longest_edge"], node["size"]["shortest_edge"] = max_pixels, min_pixels
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def bench_recipe(model_path: str | Path, run_root: str | Path, **sections: dict) -> dict:
    """A recipe dict for benchmark runs: 4-bit base, LoRA r=16 on all linears, count_shapes prompts.

    `sections` are merged into the matching recipe sections (e.g. rollout={"group_size": 8}).
    """
    recipe: dict[str, Any] = {
        "name": "bench",
        "output_dir": str(run_root),
        "model": {"path": str(model_path), "load_in_4bit": True, "dtype": "auto", "gradient_checkpointing": True},
        "lora": {"r": 16, "alpha": 32},
        "data": {"task": "count_shapes", "n_train": 8, "n_test": 1, "image_size": 56, "template": "structured"},
        "rollout": {"group_size": 2, "prompts_per_step": 1, "max_new_tokens": 16, "temperature": 1.0},
        "algorithm": {"name": "grpo", "beta": 0.0},
        "optim": {"lr": 1e-5},
        "train": {"steps": 1, "micro_batch_size": 2, "logprob_chunk": 256, "save_every": 0, "tokens_every": 0},
        "sft": {"steps": 0},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe


# --------------------------------------------------------------------------------------------------
# memory


def rss_peak_gib() -> float:
    """This process's resident-set high-water mark (VmHWM), GiB; resettable with `reset_peak`."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", text).group(1)) / 2**20


def rss_now_gib() -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 2**20


def reset_peak() -> None:
    """Start a new peak window: CUDA peak stats, or the kernel's RSS high-water mark (clear_refs 5)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_gib() -> dict[str, float]:
    """Peak since the last `reset_peak`: allocated/reserved on CUDA, RSS on CPU."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB}
    return {"peak_rss_gib": rss_peak_gib()}


def allocated_peak_gib(fn) -> tuple[float, object]:
    """Run `fn()` and return (the peak of tensor bytes allocated and not yet freed during it, in GiB,
    above what was live before; fn's result). On CPU this is the analogue of CUDA's
    `max_memory_allocated` (no allocator cache, no freed heap kept by glibc): summed from the profiler's
    memory events in time order. On CUDA it is `max_memory_allocated` above the start."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / GIB, out
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / GIB, out


def current_gib() -> float:
    """Memory in use now: allocated on CUDA, resident set on CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / GIB
    return rss_now_gib()


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


# --------------------------------------------------------------------------------------------------
# fresh-process measurements


def measure_in_subprocess(module: str, job: dict, timeout: float = 3600.0, env: dict | None = None) -> dict:
    """Run `python -m <module> --worker '<job json>'` in a fresh process; it prints one JSON line last.

    A failed child returns {"error": ...} with the tail of its stderr instead of raising, so one failed
    configuration (e.g. out of memory) does not lose the rest of a sweep.
    """
    cmd = [sys.executable, "-m", module, "--worker", json.dumps(job)]
    child_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                 "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "job": job}
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: " + "\n".join(proc.stderr.strip().splitlines()[-8:]), "job": job}
    out = json.loads(lines[-1])
    out["wall_s"] = wall
    return out


def worker_main(argv: list[str], run_job: Callable[[dict], dict]) -> bool:
    """If argv is `--worker JSON`, run the job, print its JSON result and return True."""
    if len(argv) >= 2 and argv[0] == "--worker":
        import logging

        logging.disable(logging.WARNING)
        result = run_job(json.loads(argv[1]))
        print(json.dumps(result), flush=True)
        return True
    return False


# --------------------------------------------------------------------------------------------------
# machine facts, JSON results, tables


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem_gib = round(mem_kib / 2**20, 1)
    except (OSError, AttributeError):
        pass
    info = {"device": device_name(), "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "ram_gib": mem_gib, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "bitsandbytes", "trl"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is recorded, not fatal
            info[name] = None
    return info


def write_result(name: str, payload: dict, results_dir: str | Path | None = None) -> Path:
    """bench/results/<name>.json with the machine, the time and the exact command line."""
    out_dir = Path(results_dir) if results_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    body = {"benchmark": name, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command_line(), "machine": machine_info(), **payload}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(body, indent=2, sort_keys=False) + "\n")
    return path


def command_line() -> str:
    """The command that produced this result, as a reader would type it (`python -m bench.x ...`)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None and spec.name else "python " + _rel(sys.argv[0])
    return " ".join([head] + sys.argv[1:])


def _rel(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def fmt_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return "" if value is None else str(value)


def table(rows: Iterable[dict], columns: list[str]) -> str:
    """A Markdown table of `columns` from `rows` (missing cells blank)."""
    rows = list(rows)
    cells = [[fmt_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# one lite-srpo RL step, measured (runs inside a worker process)


def apply_cap(job: dict) -> None:
    """Cap this process's CUDA memory at job['cap_gib'] (a 24 GB card on a bigger one); no-op on CPU."""
    import torch

    if job.get("cap_gib") and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, job["cap_gib"] * GIB / total))


def prompt_length(processor, sample, template: str = "structured") -> int:
    """Tokens of a sample's chat-templated prompt, image tokens included (as lite-srpo encodes it)."""
    from lite_srpo.data.prompts import ResponseFormat, build_messages

    messages = build_messages(sample, template, ResponseFormat(template=template))
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return int(processor(text=[text], images=[sample.images], return_tensors="pt")["input_ids"].shape[1])


def bench_samples(processor, n: int, image_size: int, prompt_tokens: int | None = None, seed: int = 0) -> list:
    """count_shapes samples; with `prompt_tokens`, each question is padded with filler text to that length."""
    import dataclasses

    from lite_srpo.data.tasks import make_task

    samples = make_task("count_shapes", "train", n, seed, image_size=image_size)
    if not prompt_tokens:
        return samples
    filler = "Look at every part of the picture carefully before you answer. "

    def padded(s, k: int, words: int = 0):
        return dataclasses.replace(s, question=filler * k + "look " * words + s.question)

    out = []
    for s in samples:
        lo, hi = 0, prompt_tokens  # largest number of filler sentences that stays within the target
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if prompt_length(processor, padded(s, mid)) <= prompt_tokens else (lo, mid)
        words = 0
        while prompt_length(processor, padded(s, lo, words + 1)) <= prompt_tokens:
            words += 1
        out.append(padded(s, lo, words))
    return out


def step_recipe(job: dict, run_root: str | Path) -> dict:
    """The recipe of a measured step from a job dict (model, algo, G, R, B, micro_batch, chunk, ...)."""
    return bench_recipe(
        job["model"], run_root,
        model={"load_in_4bit": job.get("load_in_4bit", True), "dtype": job.get("dtype", "auto"),
               "gradient_checkpointing": job.get("gradient_checkpointing", True)},
        lora={"r": job.get("lora_r", 16), "alpha": 2 * job.get("lora_r", 16)},
        data={"image_size": job.get("image_size", 56), "max_prompt_length": max(1024, job.get("prompt_tokens") or 0)},
        rollout={"group_size": job["G"], "max_new_tokens": job["R"], "prompts_per_step": job.get("B", 1)},
        algorithm={"name": job.get("algo", "grpo"), "beta": job.get("beta", 0.0), "dynamic_sampling": False,
                   **job.get("algorithm", {})},
        train={"micro_batch_size": job.get("micro_batch", 2), "logprob_chunk": job.get("chunk", 256)},
    )


def set_threads(job: dict) -> None:
    import torch

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))


def lite_step_job(job: dict) -> dict:
    """Set up a run, then time and measure `job['steps']` RL steps (peak reset after setup)."""
    import gc
    import tempfile

    set_threads(job)
    from lite_srpo.config import config_from_dict
    from lite_srpo.rl import train as T

    apply_cap(job)
    with tempfile.TemporaryDirectory(prefix="lite-srpo-bench-") as tmp:
        cfg = config_from_dict(step_recipe(job, tmp))
        t0 = time.perf_counter()
        run = T.setup(cfg)
        run.policy.hf.generation_config.min_new_tokens = cfg.rollout.max_new_tokens  # every response full length
        if job.get("prompt_tokens"):
            run.train_set = bench_samples(run.policy.processor, 4, cfg.data.image_size, job["prompt_tokens"])
        setup_s = time.perf_counter() - t0
        gc.collect()
        prompt_len = max(p.length for p in T.encode_prompts(run, T.prompts_for_step(
            run.train_set, 1, cfg.rollout.prompts_per_step, cfg.train.seed)))
        from lite_srpo.model.chunking import policy_logprob_chunk

        out = {"job": job, "setup_s": setup_s, "prompt_tokens": prompt_len, "peak_setup": peak_gib(),
               "logprob_chunk": policy_logprob_chunk(cfg, run.policy)}
        if not _cuda():
            out["rss_after_setup_gib"] = rss_now_gib()
        steps = []
        for step in range(1, job.get("steps", 1) + 1):
            gc.collect()
            start = current_gib()
            phases: dict[str, float] = {}
            with phase_peaks(T, phases):
                metrics = T.rl_step(run, step)
            steps.append({**{k: v for k, v in metrics.items() if k.startswith(("time/", "perf/", "completion/"))},
                          **{k: max(p[k] for p in phases.values()) for k in peak_gib()}, "start_gib": start,
                          "phase_peaks": phases})
        out["steps"] = steps
        out["peak_step"] = {k: max(s[k] for s in steps) for k in peak_gib()}
        return out


@contextlib.contextmanager
def phase_peaks(train_module, into: dict):
    """Record the peak of each phase of `rl_step` (generation, passes, update) separately.

    Wraps the three functions `rl_step` calls by name in `lite_srpo.rl.train` (`rollout` is the step's
    generate call); the high-water mark is reset before each, so `into[phase]` is that phase's own peak
    (memory held from earlier included).
    """
    names = {"rollout": "generation", "run_passes": "passes", "policy_update": "update"}
    originals = {n: getattr(train_module, n) for n in names}

    def wrap(fn, phase):
        def inner(*args, **kwargs):
            reset_peak()
            try:
                return fn(*args, **kwargs)
            finally:
                into[phase] = peak_gib()
        return inner

    for n, phase in names.items():
        setattr(train_module, n, wrap(originals[n], phase))
    try:
        yield into
    finally:
        for n, fn in originals.items():
            setattr(train_module, n, fn)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
