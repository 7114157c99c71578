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
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig, check_divisible, config_to_dict, dump_yaml
from ..data.prompts import response_format
from ..data.splits import load_splits
from ..errors import LiteSrpoError
from ..model.chunking import policy_logprob_chunk
from ..model.policy import load_policy
from ..rewards.runner import Rewarder
from ..run import checkpoint as ckpt
from ..run.distributed import SINGLE, DistContext, RankFailure, gather_objects, report_failure, sync
from ..run.events import EventWriter, NullEvents
from ..run.plot import write_curves
from ..run.preflight import check_disk_space, check_output_dir, checkpoint_bytes
from ..run.progress import Progress, announce, outputs_line
from ..run.runtime import (GracefulStop, free_memory, is_oom, peak_memory_gb, reset_peak_memory, restore_before_step,
                           seed_everything, set_determinism, state_before_step)
from ..run.trackers import open_trackers
from .algorithms import ALGORITHM_SPECS, ShapeInputs, Shaping, old_pass_needed
from .completions import step_completions
from .data_parallel import (StepShare, exchange, local_rows, merge_stats, pad_batch, passes_share, rank_share,
                            reduce_gradients)
from .evaluate import evaluate
from .objectives import grpo
from .optim import build_optimizer, build_scheduler
from .passes import rows_logprobs, run_passes
from .rollout import RolloutBatch, pad_token_id, uses_own_sampler
from .state import Run
from .step_parts import (batch_roles, corruption_params, encode_prompts, prompts_for_step, step_metrics,
                         subset)
from .dynamic_fill import Scored, fill
from .step_sampling import keep_groups, resample, rollout, score
from .token_events import token_event_records
from .zero_signal import ZeroSpreadWatch, log_dropped_step, zero_spread_share

log = logging.getLogger(__name__)


def clear_run(run_dir: Path) -> None:
    """Remove a previous run's RL state (checkpoints, events, images); a warm-up model stays."""
    import shutil

    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(run_dir / "images", ignore_errors=True)
    (run_dir / "events.jsonl").unlink(missing_ok=True)


def setup(cfg: RunConfig, resume: bool = False, overwrite: bool = False, ctx: DistContext = SINGLE) -> Run:
    """Data, model, optimizer, scheduler, event stream; restores the last checkpoint when resuming.

    With several ranks, rank 0 alone clears, writes events and the recipe; every rank loads the model."""
    run_dir = cfg.run_dir
    check_divisible(cfg.rollout.prompts_per_step, ctx.world_size)
    check_output_dir(run_dir)  # unwritable or full disk: a clear error before anything loads
    if not resume and ctx.is_main:
        previous = ckpt.latest_checkpoint(run_dir)
        if previous is not None and not overwrite:
            raise LiteSrpoError(f"{run_dir} already holds a run (last checkpoint {previous.name}): continue it with "
                                "--resume, or pick another `name` / `output_dir`")
        clear_run(run_dir)
    sync(ctx)  # the other ranks read the run directory only once rank 0 has cleared it
    events = EventWriter(run_dir / "events.jsonl") if ctx.is_main else NullEvents()
    last = ckpt.latest_checkpoint(run_dir) if resume else None
    if resume and last is None:
        raise LiteSrpoError(f"--resume: no checkpoint in {run_dir / 'checkpoints'} (nothing to resume)")
    set_determinism(cfg.train.deterministic)
    seed_everything(cfg.train.seed)
    train_set, test_set = load_splits(cfg.data, seed=cfg.train.seed)
    policy = load_policy(cfg.model, cfg.lora, offload_activations=cfg.train.offload_activations,
                         recompute_chunk=cfg.train.recompute_chunk)
    optimizer = build_optimizer(policy.trainable_parameters(), cfg.optim, policy.device)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    n_trainable = sum(p.numel() for p in policy.trainable_parameters())
    if ctx.is_main:
        check_disk_space(run_dir, checkpoint_bytes(n_trainable, optimizer), cfg.train.keep_last)
    run = Run(cfg=cfg, policy=policy, optimizer=optimizer, scheduler=scheduler, train_set=train_set,
              test_set=test_set, fmt=response_format(cfg.data), spec=ALGORITHM_SPECS[cfg.algorithm.name], events=events,
              micro_batch=cfg.train.micro_batch_size, generation_batch=cfg.rollout.generation_batch_size,
              generation_rows=cfg.rollout.generation_rows, dist=ctx)
    if ctx.is_main:
        (run_dir / "recipe.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
    run.rewarder = Rewarder(cfg.reward, run.fmt, warn=lambda step, message: events.write("warning", step, message=message))
    if last is not None:
        state = ckpt.restore(last, policy.model, optimizer, scheduler)
        run.start_step = int(state[ckpt.STEP_KEY])
        extra = state.get(ckpt.EXTRA_KEY, {})
        check_same_world(extra, ctx, last)
        if "rng_by_rank" in extra:  # each rank continues its own random streams
            ckpt.set_rng_state(extra["rng_by_rank"][ctx.rank])
        run.micro_batch = int(extra.get("micro_batch", run.micro_batch))
        run.generation_batch = int(extra.get("generation_batch", run.generation_batch))
        run.generation_rows = int(extra.get("generation_rows", run.generation_rows))
        events.truncate_after(run.start_step)
        events.write("status", run.start_step, status="resumed", message=f"resumed from {last.name}")
    return run


def check_same_world(extra: dict, ctx: DistContext, last: Path) -> None:
    """Resume with the number of ranks that wrote the checkpoint: the prompts' split across ranks, the
    sampler's seeds per generate call and each rank's RNG state all depend on it."""
    saved = int(extra.get("world_size", 1))
    if saved != ctx.world_size:
        how = "without a launcher (or --nproc 1)" if saved == 1 else f"with --nproc {saved} (torchrun --nproc-per-node {saved})"
        raise LiteSrpoError(f"--resume: {last.name} was written by {saved} process(es) but this run has "
                            f"{ctx.world_size}; resume it {how} so that it continues exactly. To change the number "
                            "of processes, start a new run from an exported adapter")


def loss_denominator(agg: str, mini_rows: list[int], mask: torch.Tensor, max_len: int) -> float:
    """Divisor that makes the micro-batch losses add up to the whole mini-batch's aggregate."""
    if agg == "token":  # DAPO: global token mean over the mini-batch
        return float(mask[mini_rows].sum().clamp(min=1))
    if agg == "dr_grpo":  # sum / (N * max_len)
        return float(len(mini_rows) * max_len)
    return float(len(mini_rows))  # "seq": per-sequence means, averaged over the mini-batch


def policy_update(run: Run, batch: RolloutBatch, shaping: Shaping, x: ShapeInputs, row_offset: int = 0) -> dict[str, float]:
    """Mini-batches of gradient accumulation over micro-batches; one optimizer step per mini-batch.

    `shaping` and `x` hold the whole step's rows (all ranks); `batch` holds this rank's, which are the
    global rows `row_offset …`. Mini-batches and loss denominators are global; each rank back-propagates
    its own rows and the gradients are summed over the ranks before the step (`reduce_gradients`)."""
    cfg, policy, ctx = run.cfg, run.policy, run.dist
    algo = cfg.algorithm
    mask = x.mask  # the loss mask: response tokens, less the truncated rows under overlong filtering
    stats: dict[str, list[float]] = {}
    skipped = 0
    for mini_rows in np.array_split(np.arange(mask.shape[0]), cfg.train.mini_batches):
        mini_rows = mini_rows.tolist()
        if not mini_rows:
            continue
        run.optimizer.zero_grad(set_to_none=True)
        finite = True
        mini_loss = 0.0
        denom = loss_denominator(algo.agg, mini_rows, mask, cfg.rollout.max_new_tokens)
        tokens = float(mask[mini_rows].sum().clamp(min=1))
        mine = local_rows(mini_rows, row_offset, batch.size)
        for local in [mine[i:i + run.micro_batch] for i in range(0, len(mine), run.micro_batch)]:
            rows = [i + row_offset for i in local]  # the same rows, indexed in the whole step
            with policy.policy():
                logp = rows_logprobs(policy, batch, local, policy_logprob_chunk(cfg, policy),
                                     cfg.rollout.temperature)
            dev = logp.device
            m = mask[rows].to(dev)
            tm = None if shaping.token_mask is None else shaping.token_mask[rows].to(dev)
            # no old pass ran when it could not differ: the update's own log-probs are the old ones
            old = logp.detach() if x.passes.old_logp is None else x.passes.old_logp[rows].to(dev)
            loss, metrics = grpo.policy_loss(
                logp, old, shaping.advantages[rows].to(dev), m,
                clip_low=algo.clip_low, clip_high=algo.clip_high, dual_clip=algo.dual_clip, agg=algo.agg,
                max_len=cfg.rollout.max_new_tokens, token_mask=tm, denominator=denom,
                level=algo.importance_sampling_level, loss=algo.policy_loss, cispo_max=algo.cispo_max)
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
        finite, mini_loss = reduce_gradients(ctx, policy.trainable_parameters(), finite, mini_loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), cfg.optim.max_grad_norm)
        if not finite or not torch.isfinite(grad_norm):
            run.optimizer.zero_grad(set_to_none=True)  # skip this update: parameters stay as before the fault
            skipped += 1
            continue
        run.optimizer.step()
        stats.setdefault("loss/total", []).append(mini_loss)  # micro-batch losses add up to the mini-batch's
        stats.setdefault("grad/norm", []).append(float(grad_norm))
    run.scheduler.step()
    out = {k: float(np.mean(v)) for k, v in merge_stats(ctx, stats).items()}
    out["update/skipped_nonfinite"] = float(skipped)
    out["optim/lr"] = run.scheduler.get_last_lr()[0]
    return out


def rl_step(run: Run, step: int) -> dict:
    """One RL step, top to bottom. Returns the step's metrics (also written to the event stream).

    With N ranks, steps 1-5 run on this rank's share of the prompts; the exchange (6) gives every rank
    the whole step's vectors, so 7-8 see the global batch exactly as one process would."""
    cfg, policy, spec, ctx = run.cfg, run.policy, run.spec, run.dist
    t_start = time.perf_counter()
    reset_peak_memory()  # mem/peak_gb: this step's peak

    # 1. prompts for this step (deterministic order: resume continues exactly); this rank's share
    samples = prompts_for_step(run.train_set, step, cfg.rollout.prompts_per_step, cfg.train.seed)
    first, stop = rank_share(len(samples), ctx)
    prompts = encode_prompts(run, samples[first:stop])

    # 2. rollout: G responses per prompt, adapter on; the sampler is seeded by (seed, step, prompt index)
    t0 = time.perf_counter()
    batch = rollout(run, prompts, step, cfg.train.seed, first)
    batch.first_prompt = first
    t_gen = time.perf_counter() - t0

    # 3. rewards (the overlong punishment is part of the reward)
    rewards_list, per_fn, reward_metrics = score(run, batch, step)

    # 4. dynamic sampling (DAPO): keep groups whose accuracy (or total reward) differs, re-sampling up to
    #    rollout.max_resample_rounds rounds to fill the batch; groups are whole on one rank, each rank fills its own
    kept, fill_metrics = list(range(batch.size)), {}
    if cfg.algorithm.dynamic_sampling:
        filled = fill(Scored(batch, rewards_list, per_fn, keep_groups(run, rewards_list, per_fn)), cfg.rollout.group_size,
                      cfg.rollout.max_resample_rounds, pad_token_id(policy),
                      lambda round_, missing: resample(run, step, round_, missing))
        batch, rewards_list, per_fn, kept, fill_metrics = filled.batch, filled.rewards, filled.per_fn, filled.kept, filled.metrics
    sampled = batch  # every row generated, before dynamic sampling: what a step that drops every group still shows
    lengths, truncated = batch.response_mask.sum(dim=1), batch.truncated
    if cfg.algorithm.dynamic_sampling:
        batch = subset(batch, kept)

    # 5. roles of every response token (structured template) and the algorithm's extra no-grad passes
    roles, violations = batch_roles(run, batch) if cfg.data.template == "structured" else (None, 0)
    t0 = time.perf_counter()
    corruption = dict(kind=cfg.algorithm.corruption.kind, per_response=cfg.algorithm.corruption.per_response,
                      params=corruption_params(cfg))
    passes = run_passes(policy, batch, micro_batch=run.micro_batch, chunk=policy_logprob_chunk(cfg, policy),
                        temperature=cfg.rollout.temperature, need_ref=cfg.algorithm.beta > 0,
                        need_corrupted=spec.needs_corrupted, need_removed=spec.needs_removed(cfg.algorithm),
                        removed_on_corrupted=cfg.algorithm.srpo.consistency == "perception_only",
                        need_focus=spec.needs_focus, roles=roles, corruption=corruption,
                        seed=cfg.train.seed * 1_000_003 + step,
                        need_old=old_pass_needed(spec, cfg.train.mini_batches))
    t_passes = time.perf_counter() - t0

    # 6. the whole step on every rank: rewards, masks, roles and the passes' vectors of all ranks
    g = exchange(ctx, StepShare(rewards=rewards_list, per_fn=per_fn, lengths=lengths, truncated=truncated,
        kept=kept, response_mask=batch.response_mask, roles=roles, passes=passes_share(passes),
        violations=violations, reward_metrics=reward_metrics, pass_seconds=passes.seconds))
    batch = pad_batch(batch, g.width, pad_token_id(policy))
    rewards = torch.tensor(g.rewards, dtype=torch.float32)
    metrics = step_metrics(g, rewards)
    metrics.update(fill_metrics)
    metrics["groups/zero_spread_frac"] = zero_spread_share(rewards, cfg.rollout.group_size)
    adv_seq = grpo.group_advantages(rewards, cfg.rollout.group_size, scale=cfg.algorithm.adv_scale)[g.kept]
    if cfg.algorithm.dynamic_sampling:
        metrics["dynamic_sampling/kept_groups_frac"] = len(g.kept) / max(len(g.rewards), 1)
        if not g.kept:  # nothing to learn from: no update, but the LR schedule still follows the step number
            with warnings.catch_warnings():  # torch warns when the scheduler steps before any optimizer step
                warnings.simplefilter("ignore", UserWarning)
                run.scheduler.step()
            metrics["update/skipped_no_signal"] = 1.0
            metrics["optim/lr"] = run.scheduler.get_last_lr()[0]
            metrics["time/step"] = time.perf_counter() - t_start
            log_dropped_step(run, sampled, rewards_list, per_fn, step)  # the completions still say why
            return metrics

    # 7. token advantages: the algorithm's shaping of the sequence advantage, over the whole step
    loss_mask = g.response_mask.float()
    kept_truncated = g.truncated[g.kept]
    if cfg.algorithm.overlong == "filter":  # DAPO's overlong filtering: truncated responses get no gradient
        loss_mask = loss_mask * (~kept_truncated).float()[:, None]
        metrics["overlong/filtered_frac"] = float(kept_truncated.float().mean())
    x = ShapeInputs(adv_seq=adv_seq, mask=loss_mask, roles=g.roles, passes=g.passes.with_focus(g.response_mask),
                    group_size=cfg.rollout.group_size, cfg=cfg.algorithm, step=step, total_steps=cfg.train.steps)
    shaping = spec.shape(x)
    metrics.update(shaping.metrics)

    # 8. policy update (gradient accumulation over micro-batches, streamed lm_head, gradients summed over ranks)
    t0 = time.perf_counter()
    metrics.update(policy_update(run, batch, shaping, x, row_offset=g.row_offset))
    t_update = time.perf_counter() - t0

    # 9. timings, throughput, memory; per-token events for the UI (rank 0's rows, which come first)
    extra_pass_time = sum(v for k, v in g.passes.seconds.items() if k != "old")
    metrics.update({
        "time/generation": t_gen, "time/passes": t_passes, "time/extra_passes": extra_pass_time,
        "time/update": t_update, "time/step": time.perf_counter() - t_start,
        "perf/gen_tokens_per_s": int(lengths.sum()) / max(t_gen, 1e-9),
        "perf/update_tokens_per_s": int(batch.response_mask.sum()) / max(t_update, 1e-9),
        "mem/peak_gb": peak_memory_gb(),
    })
    if ctx.is_main and cfg.train.tokens_every and step % cfg.train.tokens_every == 0:
        records = token_event_records(run, batch, [g.rewards[i] for i in g.kept[:batch.size]], shaping, g.roles, step)
        run.events.write("tokens", step, algorithm=cfg.algorithm.name, samples=records)
    if ctx.is_main and cfg.train.log_completions_every and step % cfg.train.log_completions_every == 0:
        run.trackers.log_completions(step, step_completions(policy.tokenizer, batch, g, adv_seq, shaping))
    return metrics


def step_with_oom_retry(run: Run, step: int) -> dict:
    """Catch CUDA OOM, halve the micro-batch (then the prompts, then the rows per generate call) and retry.

    Fewer rows per call keep the KV cache small for long responses; the retried step's samples then come
    from per-row seeds (rollout.generation_rows), so they differ from the try that failed.

    A retry starts from the state before the step: with `train.mini_batches > 1` the failed try may
    already have applied an optimizer step, which must not be applied twice."""
    before = state_before_step(run.policy.trainable_parameters(), run.optimizer, run.scheduler)
    while True:
        try:
            return rl_step(run, step)
        except Exception as exc:  # noqa: BLE001 - re-raised below unless every failing rank ran out of memory
            # tell the other ranks (they learn it at their next collective), or learn theirs; one process: exc
            failure = report_failure(run.dist, exc)
            if not (failure.only_oom if isinstance(failure, RankFailure) else is_oom(failure)):
                if failure is exc:
                    raise
                raise failure from exc
            run.optimizer.zero_grad(set_to_none=True)
            restore_before_step(run.policy.trainable_parameters(), run.optimizer, run.scheduler, before)
            free_memory()
            if run.micro_batch > 1:
                run.micro_batch //= 2
                change = f"train.micro_batch_size -> {run.micro_batch}"
            elif (prompts := run.generation_batch or run.cfg.rollout.prompts_per_step) > 1:
                run.generation_batch = prompts // 2
                change = f"rollout.generation_batch_size -> {run.generation_batch}"
            else:
                rows = run.generation_rows or run.cfg.rollout.group_size
                if rows <= 1 or not uses_own_sampler(run.cfg.rollout.top_p, run.cfg.rollout.top_k):
                    raise LiteSrpoError(
                        "out of memory even with micro-batch 1 and one prompt (one row, with lite-srpo's sampler) per "
                        "generate call. Lower "
                        "rollout.generation_rows, rollout.max_new_tokens, rollout.group_size, data.image_size/max "
                        "pixels or train.logprob_chunk, or turn on model.load_in_4bit; `lite-srpo plan RECIPE --fit` "
                        "finds settings that fit."
                    ) from None
                run.generation_rows = rows // 2
                change = f"rollout.generation_rows -> {run.generation_rows}"
            log.warning("out of memory at step %d: retrying with %s", step, change)
            run.events.write("warning", step, message=f"out of memory: retrying with {change}")


def save(run: Run, step: int) -> Path | None:
    """Every rank calls this at the same step (each rank's RNG state is gathered); rank 0 writes."""
    rng_by_rank = gather_objects(run.dist, ckpt.rng_state()) if run.dist.enabled else None
    path = None
    if run.dist.is_main:
        extra = {"micro_batch": run.micro_batch, "generation_batch": run.generation_batch,
                 "generation_rows": run.generation_rows,
                 "world_size": run.dist.world_size}
        if rng_by_rank is not None:
            extra["rng_by_rank"] = rng_by_rank
        path = ckpt.save_checkpoint(run.run_dir, step, run.policy.model, run.optimizer, run.scheduler,
                                    dump_yaml(run.cfg), metrics=run.last_metrics, extra=extra,
                                    keep_last=run.cfg.train.keep_last)
        run.events.write("checkpoint", step, path=str(path))
    sync(run.dist)  # no rank runs ahead of (or exits before) a checkpoint that is still being written
    return path


def train(cfg: RunConfig, resume: bool = False, run: Run | None = None, quiet: bool = False,
          overwrite: bool = False, ctx: DistContext = SINGLE) -> Run:
    """Run RL steps until `train.steps`, a stop signal, or too many non-finite updates.

    Every rank runs this loop in step: the stop decision is agreed at the end of each step, so all
    ranks checkpoint and stop together; a failure on any rank stops every rank with its message."""
    announce(outputs_line(cfg.run_dir, cfg.train.report_to, cfg.train.save_every), quiet or not ctx.is_main)
    run = run or setup(cfg, resume, overwrite, ctx)
    ctx = run.dist
    if ctx.is_main:
        run.trackers = open_trackers(cfg, run.run_dir, run.start_step)  # train.report_to; a no-op when empty
    run.events.write("status", run.start_step, status="running", total_steps=cfg.train.steps,
                     config=config_to_dict(cfg), message=f"{cfg.algorithm.name} on {cfg.model.path}"
                     + (f" ({ctx.world_size} processes)" if ctx.enabled else ""))
    progress = Progress(cfg.train.steps, start=run.start_step, quiet=quiet or not ctx.is_main,
                        eval_every=cfg.train.eval_every)
    step = run.start_step
    saved_step = run.start_step
    zero_spread = ZeroSpreadWatch()
    with GracefulStop() as stop:
        try:
            if cfg.train.eval_on_start and run.start_step == 0 and ctx.is_main:
                with progress.timing_eval():
                    periodic_eval(run, 0)  # the baseline: the eval curve starts before any update
            for step in range(run.start_step + 1, cfg.train.steps + 1):
                metrics = step_with_oom_retry(run, step)
                run.last_metrics = metrics
                run.events.write("metrics", step, **metrics)
                run.trackers.log(step, metrics)
                progress.update(step, metrics)
                hint = zero_spread.update(metrics.get("groups/zero_spread_frac"))
                if hint:
                    run.events.write("warning", step, message=hint)
                skipped = metrics.get("update/skipped_nonfinite", 0.0) > 0
                run.nonfinite_streak = run.nonfinite_streak + 1 if skipped else 0
                if skipped:
                    run.events.write("warning", step, message="non-finite loss or gradient: update skipped")
                if run.nonfinite_streak >= cfg.train.max_consecutive_nonfinite:
                    save(run, step)
                    raise LiteSrpoError(f"{run.nonfinite_streak} consecutive non-finite updates: stopping. The "
                                        "checkpoint holds the weights from before the fault; lower optim.lr or check the data.")
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and ctx.is_main:
                    with progress.timing_eval():  # the ETA counts the evals still to come
                        periodic_eval(run, step)
                if sync(ctx, stop.requested):  # a signal on any rank stops every rank after this step
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
        except Exception as exc:
            failure = report_failure(ctx, exc)  # every rank stops, naming the failed one
            message = str(failure) if isinstance(failure, LiteSrpoError) else f"{type(exc).__name__}: {exc}"
            try:
                run.events.write("status", step, status="crashed", message=message)
            except OSError:
                pass  # e.g. the disk is full: the error itself says so
            if failure is exc:
                raise
            raise failure from exc
        finally:
            run.trackers.close()
            if run.rewarder is not None:
                run.rewarder.close()  # reward worker processes end with the loop
    if saved_step != cfg.train.steps:
        save(run, cfg.train.steps)
    run.events.write("status", cfg.train.steps, status="finished", message="done")
    if ctx.is_main:
        write_curves_quietly(run.run_dir)
    progress.close("done")
    return run


def write_curves_quietly(run_dir: Path) -> Path | None:
    """runs/<name>/curves.png at the end of a run; a picture that cannot be drawn never fails the run."""
    try:
        return write_curves([run_dir])
    except Exception as exc:  # noqa: BLE001 - e.g. matplotlib missing; the numbers are in events.jsonl
        log.warning("could not draw %s/curves.png: %s", run_dir, exc)
        return None


def periodic_eval(run: Run, step: int) -> dict:
    result = evaluate(run.policy, run.test_set[:run.cfg.train.eval_samples], run.cfg.data.template, run.fmt,
                      max_new_tokens=run.cfg.rollout.max_new_tokens, answer_fallback=run.cfg.reward.answer_fallback,
                      batch_rows=run.generation_rows)
    run.events.write("eval", step, **{k: v for k, v in result.items() if k != "item_accuracy"})
    run.trackers.log_eval(step, {k: v for k, v in result.items() if k != "item_accuracy"})
    return result

