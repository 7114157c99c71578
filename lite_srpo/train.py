"""The training loop, written out: `setup()` → `train()` steps → cleanup (DESIGN.md §5).

One step reads top to bottom in `rl_step`: sample prompts → rollout G responses each → rewards →
group advantages (→ dynamic sampling) → the algorithm's extra no-grad passes → token advantages →
policy update over micro-batches → metrics and token events. Checkpoints, signals, numerical faults
and out-of-memory retries live in `train()` around it.
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from .algorithms import ALGORITHM_SPECS, AlgorithmSpec, Shaping, ShapeInputs
from .chunking import policy_logprob_chunk
from .config import RunConfig, config_to_dict, dump_yaml
from .data import load_splits
from .errors import LiteSrpoError
from .events import EventWriter
from .modeling import PolicyModel, load_policy
from .objectives import grpo
from .optim import build_optimizer, build_scheduler
from .passes import rows_logprobs, run_passes
from .preflight import check_disk_space, check_output_dir, checkpoint_bytes
from .progress import Progress
from .prompts import ResponseFormat, token_roles
from .reward_runner import Rewarder
from .rollout import RolloutBatch, encode_prompt, generate
from .runtime import (GracefulStop, free_memory, is_oom, peak_memory_gb, restore_before_step, seed_everything,
                      state_before_step)
from .tasks.base import Sample
from .token_events import token_event_records
from .trackers import Trackers, open_trackers

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything a step needs; built once by `setup`."""

    cfg: RunConfig
    policy: PolicyModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_set: list[Sample]
    test_set: list[Sample]
    fmt: ResponseFormat
    spec: AlgorithmSpec
    events: EventWriter
    start_step: int = 0
    micro_batch: int = 0
    generation_batch: int = 0
    nonfinite_streak: int = 0
    last_metrics: dict = field(default_factory=dict)
    rewarder: Rewarder | None = None
    """Scores responses (user rewards in worker processes); built by `setup`, closed by `train`."""
    trackers: Trackers = field(default_factory=lambda: Trackers([]))

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir


def response_format(cfg: RunConfig) -> ResponseFormat:
    return ResponseFormat(perception_tag=cfg.data.perception_tag, think_tag=cfg.data.think_tag,
                          template=cfg.data.template)


def clear_run(run_dir: Path) -> None:
    """Remove a previous run's RL state (checkpoints, events, images); a warm-up model stays."""
    import shutil

    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(run_dir / "images", ignore_errors=True)
    (run_dir / "events.jsonl").unlink(missing_ok=True)


def setup(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> Run:
    """Data, model, optimizer, scheduler, event stream; restores the last checkpoint when resuming."""
    run_dir = cfg.run_dir
    check_output_dir(run_dir)  # unwritable or full disk: a clear error before anything loads
    if not resume:
        previous = ckpt.latest_checkpoint(run_dir)
        if previous is not None and not overwrite:
            raise LiteSrpoError(f"{run_dir} already holds a run (last checkpoint {previous.name}): continue it with "
                                "--resume, or pick another `name` / `output_dir`")
        clear_run(run_dir)
    events = EventWriter(run_dir / "events.jsonl")
    last = ckpt.latest_checkpoint(run_dir) if resume else None
    if resume and last is None:
        raise LiteSrpoError(f"--resume: no checkpoint in {run_dir / 'checkpoints'} (nothing to resume)")
    if cfg.rollout.engine == "unsloth":
        log.warning("rollout.engine=unsloth: the Unsloth fast-generation path is not implemented yet; "
                    "generating with HF generate")
    seed_everything(cfg.train.seed)
    train_set, test_set = load_splits(cfg.data, seed=cfg.train.seed)
    policy = load_policy(cfg.model, cfg.lora)
    optimizer = build_optimizer(policy.trainable_parameters(), cfg.optim, policy.device)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    n_trainable = sum(p.numel() for p in policy.trainable_parameters())
    check_disk_space(run_dir, checkpoint_bytes(n_trainable, optimizer), cfg.train.keep_last)
    run = Run(cfg=cfg, policy=policy, optimizer=optimizer, scheduler=scheduler, train_set=train_set,
              test_set=test_set, fmt=response_format(cfg), spec=ALGORITHM_SPECS[cfg.algorithm.name], events=events,
              micro_batch=cfg.train.micro_batch_size, generation_batch=cfg.rollout.generation_batch_size)
    (run_dir / "recipe.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
    run.rewarder = Rewarder(cfg.reward, run.fmt, warn=lambda step, message: events.write("warning", step, message=message))
    if last is not None:
        state = ckpt.restore(last, policy.model, optimizer, scheduler)
        run.start_step = int(state[ckpt.STEP_KEY])
        extra = state.get(ckpt.EXTRA_KEY, {})
        run.micro_batch = int(extra.get("micro_batch", run.micro_batch))
        run.generation_batch = int(extra.get("generation_batch", run.generation_batch))
        events.truncate_after(run.start_step)
        events.write("status", run.start_step, status="resumed", message=f"resumed from {last.name}")
    return run


def prompts_for_step(train_set: list[Sample], step: int, per_step: int, seed: int) -> list[Sample]:
    """Deterministic data order: epoch-wise permutations, so position = f(step) and resume is exact."""
    n = len(train_set)
    out = []
    for j in range(per_step):
        index = (step - 1) * per_step + j
        epoch, pos = divmod(index, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.append(train_set[int(perm[pos])])
    return out


def encode_prompts(run: Run, samples: list[Sample]):
    prompts = []
    for s in samples:
        p = encode_prompt(run.policy, s, run.cfg.data.template, run.fmt)
        if p.length > run.cfg.data.max_prompt_length:
            log.warning("skipping %s: prompt is %d tokens (> data.max_prompt_length=%d); image tokens are never cut",
                        s.source, p.length, run.cfg.data.max_prompt_length)
            continue
        prompts.append(p)
    if not prompts:
        raise LiteSrpoError(f"every prompt of this step exceeds data.max_prompt_length={run.cfg.data.max_prompt_length}; "
                            "raise it or lower the image resolution")
    return prompts


def batch_roles(run: Run, batch: RolloutBatch) -> tuple[torch.Tensor, int]:
    """Role ids per response token (0 other, 1 perception, 2 reasoning) and the format-violation count."""
    roles = torch.zeros_like(batch.response_ids)
    violations = 0
    for i in range(batch.size):
        length = int(batch.response_mask[i].sum())
        ids = batch.response_ids[i, :length].tolist()
        r, valid = token_roles(run.policy.tokenizer, ids, run.fmt)
        roles[i, :length] = torch.tensor(r, dtype=torch.long)
        violations += int(not valid)
    return roles, violations


def loss_denominator(agg: str, mini_rows: list[int], mask: torch.Tensor, max_len: int) -> float:
    """Divisor that makes the micro-batch losses add up to the whole mini-batch's aggregate."""
    if agg == "token":  # DAPO: global token mean over the mini-batch
        return float(mask[mini_rows].sum().clamp(min=1))
    if agg == "dr_grpo":  # sum / (N * max_len)
        return float(len(mini_rows) * max_len)
    return float(len(mini_rows))  # "seq": per-sequence means, averaged over the mini-batch


def policy_update(run: Run, batch: RolloutBatch, shaping: Shaping, x: ShapeInputs) -> dict[str, float]:
    """Mini-batches of gradient accumulation over micro-batches; one optimizer step per mini-batch."""
    cfg, policy = run.cfg, run.policy
    algo = cfg.algorithm
    mask = x.mask  # the loss mask: response tokens, less the truncated rows under overlong filtering
    n = batch.size
    order = list(range(n))
    stats: dict[str, list[float]] = {}
    skipped = 0
    for mini_rows in np.array_split(np.array(order), cfg.train.mini_batches):
        mini_rows = mini_rows.tolist()
        if not mini_rows:
            continue
        run.optimizer.zero_grad(set_to_none=True)
        finite = True
        mini_loss = 0.0
        denom = loss_denominator(algo.agg, mini_rows, mask, cfg.rollout.max_new_tokens)
        tokens = float(mask[mini_rows].sum().clamp(min=1))
        for rows in [mini_rows[i:i + run.micro_batch] for i in range(0, len(mini_rows), run.micro_batch)]:
            with policy.policy():
                logp = rows_logprobs(policy, batch, rows, policy_logprob_chunk(cfg, policy), cfg.rollout.temperature)
            dev = logp.device
            m = mask[rows].to(dev)
            tm = None if shaping.token_mask is None else shaping.token_mask[rows].to(dev)
            loss, metrics = grpo.policy_loss(
                logp, x.passes.old_logp[rows].to(dev), shaping.advantages[rows].to(dev), m,
                clip_low=algo.clip_low, clip_high=algo.clip_high, dual_clip=algo.dual_clip, agg=algo.agg,
                max_len=cfg.rollout.max_new_tokens, token_mask=tm, denominator=denom)
            if algo.beta > 0 and x.passes.ref_logp is not None:
                kl = grpo.kl_k3(logp, x.passes.ref_logp[rows].to(dev))
                kl_loss = grpo.aggregate(kl, m, algo.agg, max_len=cfg.rollout.max_new_tokens, denominator=denom)
                loss = loss + algo.beta * kl_loss
                metrics["kl/k3"] = float(grpo.masked_mean(kl.detach(), m))
            if run.spec.extra_loss is not None:
                extra, extra_metrics = run.spec.extra_loss(logp, rows, x, tokens)
                loss = loss + extra
                metrics.update(extra_metrics)
            if not torch.isfinite(loss):
                finite = False
                break
            loss.backward()
            mini_loss += float(loss.detach())
            for k, v in metrics.items():
                stats.setdefault(k, []).append(float(v))
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), cfg.optim.max_grad_norm)
        if not finite or not torch.isfinite(grad_norm):
            run.optimizer.zero_grad(set_to_none=True)  # skip this update: parameters stay as before the fault
            skipped += 1
            continue
        run.optimizer.step()
        stats.setdefault("loss/total", []).append(mini_loss)  # micro-batch losses add up to the mini-batch's
        stats.setdefault("grad/norm", []).append(float(grad_norm))
    run.scheduler.step()
    out = {k: float(np.mean(v)) for k, v in stats.items()}
    out["update/skipped_nonfinite"] = float(skipped)
    out["optim/lr"] = run.scheduler.get_last_lr()[0]
    return out


def rl_step(run: Run, step: int) -> dict:
    """One RL step, top to bottom. Returns the step's metrics (also written to the event stream)."""
    cfg, policy, spec = run.cfg, run.policy, run.spec
    t_start = time.perf_counter()

    # 1. prompts for this step (deterministic order: resume continues exactly)
    samples = prompts_for_step(run.train_set, step, cfg.rollout.prompts_per_step, cfg.train.seed)
    prompts = encode_prompts(run, samples)

    # 2. rollout: G responses per prompt, adapter on
    t0 = time.perf_counter()
    batch = generate(policy, prompts, cfg.rollout.group_size, cfg.rollout.max_new_tokens, cfg.rollout.temperature,
                     cfg.rollout.top_p, cfg.rollout.top_k, batch_prompts=run.generation_batch)
    t_gen = time.perf_counter() - t0
    gen_tokens = int(batch.response_mask.sum())

    # 3. rewards and group advantages
    rewards_list, per_fn, reward_metrics = run.rewarder.compute(batch.texts, batch.samples(), step)
    lengths = batch.response_mask.sum(dim=1)
    if cfg.algorithm.overlong == "punish":  # DAPO's soft overlong punishment, part of the reward
        penalty = grpo.overlong_penalty(lengths, batch.truncated, cfg.rollout.max_new_tokens,
                                        cfg.algorithm.overlong_buffer, cfg.algorithm.overlong_penalty)
        per_fn["overlong"] = penalty.tolist()
        rewards_list = [r + p for r, p in zip(rewards_list, per_fn["overlong"])]
    rewards = torch.tensor(rewards_list, dtype=torch.float32)
    adv_seq = grpo.group_advantages(rewards, cfg.rollout.group_size, scale=cfg.algorithm.adv_scale)
    metrics: dict[str, float] = {
        "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        "completion/len_mean": gen_tokens / batch.size, "completion/truncated_frac": float(batch.truncated.float().mean()),
    }
    for name, values in per_fn.items():
        metrics[f"reward/{name}/mean"] = float(np.mean(values))
    metrics["accuracy"] = metrics.get("reward/accuracy/mean", float("nan"))
    metrics["format_rate"] = metrics.get("reward/format/mean", float("nan"))
    metrics.update(reward_metrics)  # reward/<name>/failures of user rewards

    # 4. dynamic sampling (DAPO): keep groups whose accuracy (or total reward) differs
    if cfg.algorithm.dynamic_sampling:
        keep = grpo.dynamic_sampling_keep(filter_key(cfg, rewards, per_fn), cfg.rollout.group_size)
        metrics["dynamic_sampling/kept_groups_frac"] = float(keep.float().mean())
        rows = [i for i in range(batch.size) if keep[i // cfg.rollout.group_size]]
        if not rows:  # nothing to learn from: no update, but the LR schedule still follows the step number
            with warnings.catch_warnings():  # torch warns when the scheduler steps before any optimizer step
                warnings.simplefilter("ignore", UserWarning)
                run.scheduler.step()
            metrics["update/skipped_no_signal"] = 1.0
            metrics["optim/lr"] = run.scheduler.get_last_lr()[0]
            metrics["time/step"] = time.perf_counter() - t_start
            return metrics
        batch, adv_seq = subset(batch, rows), adv_seq[rows]
        rewards_list = [rewards_list[i] for i in rows]

    # 5. roles of every response token (structured template) and the algorithm's extra no-grad passes
    roles, violations = batch_roles(run, batch) if cfg.data.template == "structured" else (None, 0)
    metrics["format_violations"] = float(violations)
    t0 = time.perf_counter()
    corruption = dict(kind=cfg.algorithm.corruption.kind, per_response=cfg.algorithm.corruption.per_response,
                      params=corruption_params(cfg))
    passes = run_passes(policy, batch, micro_batch=run.micro_batch, chunk=policy_logprob_chunk(cfg, policy),
                        temperature=cfg.rollout.temperature, need_ref=cfg.algorithm.beta > 0,
                        need_corrupted=spec.needs_corrupted, need_removed=spec.needs_removed(cfg.algorithm),
                        removed_on_corrupted=cfg.algorithm.srpo.consistency == "perception_only",
                        need_focus=spec.needs_focus, roles=roles, corruption=corruption, seed=cfg.train.seed * 1_000_003 + step)
    t_passes = time.perf_counter() - t0

    # 6. token advantages: the algorithm's shaping of the sequence advantage
    loss_mask = batch.response_mask.float()
    if cfg.algorithm.overlong == "filter":  # DAPO's overlong filtering: truncated responses get no gradient
        loss_mask = loss_mask * (~batch.truncated).float()[:, None]
        metrics["overlong/filtered_frac"] = float(batch.truncated.float().mean())
    x = ShapeInputs(adv_seq=adv_seq, mask=loss_mask, roles=roles, passes=passes,
                    group_size=cfg.rollout.group_size, cfg=cfg.algorithm, step=step, total_steps=cfg.train.steps)
    shaping = spec.shape(x)
    metrics.update(shaping.metrics)

    # 7. policy update (gradient accumulation over micro-batches, streamed lm_head)
    t0 = time.perf_counter()
    metrics.update(policy_update(run, batch, shaping, x))
    t_update = time.perf_counter() - t0

    # 8. timings, throughput, memory; per-token events for the UI
    extra_pass_time = sum(v for k, v in passes.seconds.items() if k != "old")
    metrics.update({
        "time/generation": t_gen, "time/passes": t_passes, "time/extra_passes": extra_pass_time,
        "time/update": t_update, "time/step": time.perf_counter() - t_start,
        "perf/gen_tokens_per_s": gen_tokens / max(t_gen, 1e-9),
        "perf/update_tokens_per_s": int(batch.response_mask.sum()) / max(t_update, 1e-9),
        "mem/peak_gb": peak_memory_gb(),
    })
    if cfg.train.tokens_every and step % cfg.train.tokens_every == 0:
        records = token_event_records(run, batch, rewards_list, shaping, roles, step)
        run.events.write("tokens", step, algorithm=cfg.algorithm.name, samples=records)
    return metrics


def filter_key(cfg: RunConfig, rewards: torch.Tensor, per_fn: dict[str, list[float]]) -> torch.Tensor:
    """What dynamic sampling compares within a group: accuracy, as DAPO's and EasyR1's code do (a group
    that is all wrong but differs in format carries no answer signal), or the total reward. Without an
    accuracy reward in the recipe, the total reward is the only key there is."""
    if cfg.algorithm.filter_on == "accuracy" and "accuracy" in per_fn:
        return torch.tensor(per_fn["accuracy"], dtype=torch.float32)
    return rewards


def corruption_params(cfg: RunConfig) -> dict:
    c = cfg.algorithm.corruption
    return {"patch": {"patch": c.patch_size, "prob": c.prob}, "noise": {"std": c.noise_std},
            "blur": {"radius": c.blur_radius}, "constant": {}}[c.kind]


def subset(batch: RolloutBatch, rows: list[int]) -> RolloutBatch:
    return RolloutBatch(prompts=batch.prompts, prompt_of=[batch.prompt_of[i] for i in rows],
                        response_ids=batch.response_ids[rows], response_mask=batch.response_mask[rows],
                        texts=[batch.texts[i] for i in rows], truncated=batch.truncated[rows])


def step_with_oom_retry(run: Run, step: int) -> dict:
    """Catch CUDA OOM, halve the micro-batch (then the generation batch) and retry the same step.

    A retry starts from the state before the step: with `train.mini_batches > 1` the failed try may
    already have applied an optimizer step, which must not be applied twice."""
    before = state_before_step(run.policy.trainable_parameters(), run.optimizer, run.scheduler)
    while True:
        try:
            return rl_step(run, step)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_oom(exc):
                raise
            run.optimizer.zero_grad(set_to_none=True)
            restore_before_step(run.policy.trainable_parameters(), run.optimizer, run.scheduler, before)
            free_memory()
            if run.micro_batch > 1:
                run.micro_batch //= 2
                change = f"train.micro_batch_size -> {run.micro_batch}"
            else:
                gen = run.generation_batch or run.cfg.rollout.prompts_per_step
                if gen <= 1:
                    raise LiteSrpoError(
                        "out of memory even with micro-batch 1 and one prompt per generate call. Lower "
                        "rollout.max_new_tokens, rollout.group_size, data.image_size/max pixels or "
                        "train.logprob_chunk, or turn on model.load_in_4bit; `lite-srpo plan RECIPE` predicts the peak."
                    ) from None
                run.generation_batch = gen // 2
                change = f"rollout.generation_batch_size -> {run.generation_batch}"
            log.warning("out of memory at step %d: retrying with %s", step, change)
            run.events.write("warning", step, message=f"out of memory: retrying with {change}")


def save(run: Run, step: int) -> Path:
    path = ckpt.save_checkpoint(run.run_dir, step, run.policy.model, run.optimizer, run.scheduler,
                                dump_yaml(run.cfg), metrics=run.last_metrics,
                                extra={"micro_batch": run.micro_batch, "generation_batch": run.generation_batch},
                                keep_last=run.cfg.train.keep_last)
    run.events.write("checkpoint", step, path=str(path))
    return path


def train(cfg: RunConfig, resume: bool = False, run: Run | None = None, quiet: bool = False,
          overwrite: bool = False) -> Run:
    """Run RL steps until `train.steps`, a stop signal, or too many non-finite updates."""
    run = run or setup(cfg, resume, overwrite)
    run.trackers = open_trackers(cfg, run.run_dir, run.start_step)  # train.report_to; a no-op when empty
    run.events.write("status", run.start_step, status="running", total_steps=cfg.train.steps,
                     config=config_to_dict(cfg), message=f"{cfg.algorithm.name} on {cfg.model.path}")
    progress = Progress(cfg.train.steps, start=run.start_step, quiet=quiet)
    step = run.start_step
    saved_step = run.start_step
    with GracefulStop() as stop:
        try:
            for step in range(run.start_step + 1, cfg.train.steps + 1):
                metrics = step_with_oom_retry(run, step)
                run.last_metrics = metrics
                run.events.write("metrics", step, **metrics)
                run.trackers.log(step, metrics)
                progress.update(step, metrics)
                skipped = metrics.get("update/skipped_nonfinite", 0.0) > 0
                run.nonfinite_streak = run.nonfinite_streak + 1 if skipped else 0
                if skipped:
                    run.events.write("warning", step, message="non-finite loss or gradient: update skipped")
                if run.nonfinite_streak >= cfg.train.max_consecutive_nonfinite:
                    save(run, step)
                    raise LiteSrpoError(f"{run.nonfinite_streak} consecutive non-finite updates: stopping. The "
                                        "checkpoint holds the weights from before the fault; lower optim.lr or check the data.")
                if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                    periodic_eval(run, step)
                if stop.requested:
                    save(run, step)
                    run.events.write("status", step, status="stopped", message=f"stopped at step {step}; resumable")
                    progress.close(f"stopped at step {step}; resume with --resume")
                    return run
                if cfg.train.save_every and step % cfg.train.save_every == 0:
                    save(run, step)
                    saved_step = step
        except KeyboardInterrupt:
            run.events.write("status", step, status="stopped",
                             message=f"interrupted during step {step}; last checkpoint is step {saved_step}")
            raise
        except LiteSrpoError as exc:
            try:
                run.events.write("status", step, status="crashed", message=str(exc))
            except OSError:
                pass  # e.g. the disk is full: the error itself says so
            raise
        except Exception as exc:
            run.events.write("status", step, status="crashed", message=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            run.trackers.close()
            if run.rewarder is not None:
                run.rewarder.close()  # reward worker processes end with the loop
    if saved_step != cfg.train.steps:
        save(run, cfg.train.steps)
    run.events.write("status", cfg.train.steps, status="finished", message="done")
    write_curves_quietly(run.run_dir)
    progress.close("done")
    return run


def write_curves_quietly(run_dir: Path) -> Path | None:
    """runs/<name>/curves.png at the end of a run; a picture that cannot be drawn never fails the run."""
    try:
        from .plot import write_curves

        return write_curves([run_dir])
    except Exception as exc:  # noqa: BLE001 - e.g. matplotlib missing; the numbers are in events.jsonl
        log.warning("could not draw %s/curves.png: %s", run_dir, exc)
        return None


def periodic_eval(run: Run, step: int) -> dict:
    from .evaluate import evaluate

    result = evaluate(run.policy, run.test_set[:run.cfg.train.eval_samples], run.cfg.data.template, run.fmt,
                      max_new_tokens=run.cfg.rollout.max_new_tokens, answer_fallback=run.cfg.reward.answer_fallback)
    run.events.write("eval", step, **{k: v for k, v in result.items() if k != "item_accuracy"})
    run.trackers.log_eval(step, {k: v for k, v in result.items() if k != "item_accuracy"})
    return result

