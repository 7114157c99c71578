"""lite-srpo: RLVR (GRPO, DAPO, Dr.GRPO, SRPO, PAPO, VPPO, VGPO) for vision-language models on one GPU.

The Python API is five functions, the same steps as the CLI:

    import lite_srpo

    cfg = lite_srpo.load_config("recipes/demo_cpu.yaml", ["train.steps=20"])
    lite_srpo.plan(cfg, device="cpu")        # predicted peak memory, before anything loads
    run = lite_srpo.train(cfg)               # runs/<name>/: events.jsonl, checkpoints/, curves.png
    lite_srpo.evaluate(run.run_dir)          # its held-out split, greedy decoding
    lite_srpo.export(run.run_dir, "exports/demo", mode="merged")

Each function imports its layer when called, so `import lite_srpo` stays light (no torch).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import RunConfig
    from .rl.state import Run

__version__ = "0.1.0"
__all__ = ["load_config", "plan", "train", "evaluate", "export", "__version__"]


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """A recipe: the YAML at `path` (None: defaults only) with `key.sub=value` overrides applied, validated.

    Every problem (unknown key, wrong type, impossible value or combination, unknown reward, missing
    tracker package) is reported at once in one ConfigError, before any model loads. The same as
    `lite-srpo train RECIPE key.sub=value ...` reads its recipe."""
    from .config import load_config as load

    return load(path, overrides)


def plan(cfg: RunConfig, gpu_mem_gib: float = 24.0, *, device: str = "cuda", prompt_tokens: int | None = None,
         ranks: int = 1) -> dict:
    """Predicted peak memory of one training step of `cfg` (`lite-srpo plan`), from the model's config.json alone.

    `device` "cuda" predicts `torch.cuda.max_memory_allocated` against a `gpu_mem_gib` card (plus the CUDA
    context and allocator slack); "cpu" predicts the process's peak RSS. `ranks` > 1 plans one data-parallel
    rank. Returns the breakdown (`terms`), the peak per phase (`peak_gib`, `peak_phase`), whether it
    `fits`, and the largest group size and response length that would."""
    from .model.memory.plan import plan as predict

    return predict(cfg, gpu_mem_gib, device=device, prompt_tokens=prompt_tokens, ranks=ranks)


def train(cfg: RunConfig, *, resume: bool = False, quiet: bool = False) -> Run:
    """Train with a recipe (`lite-srpo train`): the SFT warm-up if `sft.steps` asks for one, then RL.

    Writes `runs/<name>/` (events.jsonl, checkpoints, curves.png); `resume` continues from the run's last
    checkpoint; `quiet` hides the progress bar. Under torchrun or accelerate each process is one rank.
    Returns the finished `Run` (its `policy`, `run_dir`, `last_metrics`). A script that calls this with user
    reward files needs the usual `if __name__ == "__main__":` guard (rewards run in spawned workers)."""
    from .rl.pipeline import run_training

    return run_training(cfg, resume=resume, quiet=quiet)


def evaluate(source: str | Path, data: list[str] | None = None, *, protocol: str = "greedy",
             temperature: float = 1.0, limit: int | None = None, max_new_tokens: int | None = None,
             batch_size: int = 16, device: str = "auto", seed: int = 0) -> dict:
    """Accuracy of a model under a named protocol (`lite-srpo eval`); nothing is written.

    `source`: a run directory (its latest checkpoint), a checkpoint, an exported adapter or model directory,
    or a hub id. `data`: benchmark files or folders, or procedural task names; default for a run or
    checkpoint: its held-out split. `protocol`: "greedy" (VGPO's) or "avg@K" sampled at `temperature`
    (PAPO's and VPPO's avg@8). Returns per-dataset and overall accuracy, format rate and response length."""
    import torch

    from .eval.eval_cli import evaluate_source
    from .rl.evaluate import Protocol

    result, _ = evaluate_source(str(source), data, protocol=Protocol.parse(protocol, temperature), limit=limit,
                                max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                                device=None if device == "auto" else torch.device(device))
    return result


def export(source: str | Path, out: str | Path, *, mode: str = "adapter", quantize: str | None = None,
           dtype: str = "auto", base: str | None = None, device: str = "auto", tolerance: float | None = None,
           force: bool = False) -> dict:
    """Export a run's latest checkpoint, or one checkpoint directory, to `out` (`lite-srpo export`).

    `mode` "adapter" writes the peft adapter and processor; "merged" dequantizes the 4-bit base, merges the
    adapter and writes a standalone model (`quantize="4bit"` adds an NF4 copy). Every export is reloaded
    and compared logit by logit with the trained adapter model; above `tolerance` nothing is written.
    Returns what `out/export.json` records (verification, memory, metrics)."""
    from .model.export.export import export as run_export
    from .model.export.plan import make_plan

    return run_export(make_plan(source, out, mode=mode, quantize=quantize, tolerance=tolerance, dtype=dtype,
                                base=base, device=device, force=force))
