"""The RAFT loop (Dong et al. 2023, Table 1), read top to bottom.

    for t in 1..T:  prompts --generate K each--> samples --score--> rewards --select--> kept --fine-tune--> model_t
                    then evaluate model_t on held-out prompts

What is generated, scored and trained comes from a *modality*: `raftlib.text.TextModality` for a causal
language model (RAFTConfig), `raftlib.diffusion.modality.ImageModality` for a diffusion model
(DiffusionConfig). Prompts, selection, the run store, resume and the metrics rows are the same for both.

Every stage persists its output and then writes a marker, so `resume(run_dir)` skips finished stages,
reuses finished generation and scoring batches, and reruns an unfinished fine-tune from the previous
checkpoint. All randomness is seeded from (seed, iteration, batch): a resumed run keeps exactly the
samples an uninterrupted run keeps.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raftlib import metrics as M
from raftlib.bookkeeping import (
    config_diff,
    quiet_transformers,
    sample_rows,
    scores_from_rows,
    scores_to_rows,
    selection_metrics,
    setup_logging,
    summary_line,
    track,
)
from raftlib.config import RAFTConfig, load_config
from raftlib.data import columns_by_prompt, load_prompts, prompts_for_iteration
from raftlib.plan import Hardware, check_fits
from raftlib.rewards import WeightedReward, build_reward, score_samples
from raftlib.select import kl_ranking_key, select
from raftlib.sharding import build_accelerator, full_state_dict, is_sharded, process_state
from raftlib.store import RunDirError, RunStore

if TYPE_CHECKING:
    from raftlib.diffusion.config import DiffusionConfig

logger = logging.getLogger("raftlib")

EVAL_STREAM = 999_983
"""Seed stream of evaluation: the same random numbers at every iteration, so eval curves are less noisy."""
EXTERNAL_BATCH = 99_999
"""Batch index under which an iteration's external (e.g. teacher) samples are stored."""


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    metrics: list[dict[str, Any]]
    """metrics.jsonl as a list (row 0 is the initial model's evaluation)."""
    final_dir: Path


def run(config: RAFTConfig | DiffusionConfig, *, reward: WeightedReward | None = None) -> RunResult:
    """Run RAFT as configured (a RAFTConfig aligns a language model, a DiffusionConfig an image model).

    A run directory holding this same config is resumed, not restarted.
    """
    setup_logging(config.logging.level)
    # Under `accelerate launch`, one of several processes; the first call starts the process group.
    main_process = process_state(config.loop.process_group_timeout_minutes).is_main_process
    store = RunStore(config.output_dir)
    try:
        if main_process:
            store.lock()
            if store.has_run():
                saved = load_config(store.config_path)
                if saved != config:
                    changed = config_diff(saved.to_dict(), config.to_dict())
                    raise RunDirError(
                        f"{store.root} holds a run with a different config ({', '.join(changed)}); "
                        "use another output_dir, or resume it with `python -m raftlib resume`"
                    )
                logger.info("%s already holds this run: resuming it", store.root)
            else:
                store.write_config(config.to_yaml())
        process_state().wait_for_everyone()
        with quiet_transformers():
            return _execute(config, store, reward)
    finally:
        if main_process:
            store.unlock()


def resume(run_dir: str | Path, *, reward: WeightedReward | None = None) -> RunResult:
    """Continue a run from its directory after a crash or a kill, losing and duplicating nothing."""
    store = RunStore(run_dir)
    if not store.has_run():
        raise RunDirError(f"{run_dir} has no config.yaml: it is not a raftlib run directory")
    config = load_config(store.config_path)
    setup_logging(config.logging.level)
    main_process = process_state(config.loop.process_group_timeout_minutes).is_main_process
    if main_process:
        store.lock()
    try:
        with quiet_transformers():
            return _execute(config, store, reward)
    finally:
        if main_process:
            store.unlock()


def _modality(config, device):
    if isinstance(config, RAFTConfig):
        from raftlib.text import TextModality

        return TextModality(config, device)
    from raftlib.diffusion.modality import ImageModality

    return ImageModality(config, device)


def _execute(config, store: RunStore, reward: WeightedReward | None) -> RunResult:
    # The fine-tune's precision, accumulation and sharding (DDP or FSDP2, as the accelerate config file says).
    accelerator = build_accelerator(
        config.training,
        timeout_minutes=config.loop.process_group_timeout_minutes,
        log_with="tensorboard" if config.logging.tensorboard else None,
        project_dir=str(store.root),
    )
    processes = Processes(accelerator)
    if accelerator.device.type == "cuda":  # refuse what clearly cannot fit before loading anything
        check_fits(config, Hardware.detect(processes.count))
    if not processes.is_main:
        logger.setLevel(logging.WARNING)  # one process reports; the others only warn
        store = _ReadOnlyRunStore(store)
    if config.logging.tensorboard:
        accelerator.init_trackers("tensorboard")
    progress = config.logging.progress_bars
    logger.info("derived sizes: %s", config.derived())
    if processes.count > 1:
        logger.info(
            "%d processes: generation and scoring sharded by batch; optimizer steps per iteration divided by %d "
            "(global batch = micro_batch_size x %d x gradient_accumulation_steps)",
            processes.count, processes.count, processes.count,
        )  # fmt: skip
    if is_sharded(accelerator):
        logger.info(
            "sharded fine-tune (FSDP2): parameters, gradients and optimizer state split over %d processes; after "
            "each stage the main process gathers the full weights and writes the checkpoint every process reloads",
            processes.count,
        )

    # What is generated and trained (text or images) is the modality's business; the loop is the same.
    modality = _modality(config, accelerator.device)
    splits = load_prompts(config.data, config.seed)
    reward = reward or build_reward(config.reward)

    # The model entering the first unfinished iteration: the newest finished fine-tune, or the base.
    trained = [t for t in range(1, config.loop.iterations + 1) if store.done(t, "finetune")]
    last_trained = max(trained, default=0)
    policy = modality.load_policy(store.checkpoint_dir(last_trained) if last_trained else None)

    if not store.done(0, "eval"):
        row0 = {"iteration": 0} | _evaluate(
            0, policy, modality, splits.eval, reward, config, store, processes, progress
        )
        store.write_metrics(row0)
        track(accelerator, row0)
        store.mark_done(0, "eval", {"metrics": row0})

    for iteration in range(1, config.loop.iterations + 1):
        processes.wait()  # every process sees the same run directory before deciding what is left to do
        if store.done(iteration, "eval"):
            continue
        started = time.perf_counter()
        row: dict[str, Any] = {"iteration": iteration}
        if not store.done(iteration, "finetune"):
            # 1. the b prompts of this iteration
            prompts = prompts_for_iteration(splits.train, iteration, config.loop.prompts_per_iteration, config.seed)
            # 2. K samples per prompt (finished batches come back from the run directory)
            samples, row_generate = _generate(iteration, policy, modality, prompts, config, store, processes, progress)
            # 3. rewards (finished batches come back from the run directory)
            scores, row_score = _score(
                iteration, samples, prompts, modality, reward, config, store, processes, progress
            )
            # 4. keep the best: local best-of-K, global top 1/K, or threshold; KL only changes the key
            kept, row_select = _select(iteration, policy, modality, samples, scores, reward, config, store, processes)
            # 5. fine-tune on what was kept, from the model that generated it
            policy, row_finetune = _finetune(iteration, policy, modality, kept, store, accelerator, progress)
            row |= row_generate | row_score | row_select | row_finetune
        else:
            row |= store.done(iteration, "finetune")["metrics"]
        # 6. evaluate the new model on held-out prompts
        row |= _evaluate(iteration, policy, modality, splits.eval, reward, config, store, processes, progress)
        row["time_iteration_s"] = time.perf_counter() - started
        store.write_metrics(row)  # before the marker: a kill in between reruns the eval, never loses the row
        track(accelerator, row)
        store.mark_done(iteration, "eval", {"metrics": row})
        if config.loop.keep_checkpoints:
            store.prune_checkpoints(config.loop.keep_checkpoints, protect=[iteration])
        if processes.is_main:
            logger.info(summary_line(row, config.loop.iterations))

    store.save_model_dir(store.final_dir, lambda d: modality.save(policy, d))
    processes.close()
    return RunResult(run_dir=store.root, metrics=store.read_metrics(), final_dir=store.final_dir)


# ----------------------------------------------------------------------------------------------
# Stages with persistence. Each returns its output and the metrics it contributes to the row.
# ----------------------------------------------------------------------------------------------


class Processes:
    """The processes of one run under accelerate, and where they meet. With one process all of it is trivial.

    With several: generation and scoring are sharded by batch (batch b goes to process b mod N, and its
    samples depend only on (seed, iteration, b), so the union equals a one-process run's); samples are
    gathered to every process; the main process alone selects and writes run-level files, in a run
    directory every process must see (one machine, or a shared file system); the fine-tune is
    data-parallel through accelerate (DDP, or FSDP2 as its config file says; see raftlib.sharding).
    """

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator
        self.count = accelerator.num_processes
        self.rank = accelerator.process_index
        self.is_main = accelerator.is_main_process

    def shard(self, batches: int) -> list[int] | None:
        """This process's batch indices (None: one process does them all)."""
        return None if self.count == 1 else list(range(self.rank, batches, self.count))

    def wait(self) -> None:
        if self.count > 1:
            self.accelerator.wait_for_everyone()

    def close(self) -> None:
        """Meet, then end the process group while the interpreter is whole.

        Modules that went through FSDP2 sit in reference cycles holding gloo/NCCL work objects; if the process
        group is destroyed first and those are collected only at interpreter exit, the backend's threads are torn
        down with the interpreter and a finished worker aborts ("terminate called without an active exception",
        SIGABRT: seen once in CI after a LoRA run under FSDP had written everything). Collect them first.
        """
        gc.collect()
        self.wait()
        self.accelerator.end_training()

    def gather(self, mine: dict[int, list]) -> list:
        """Every process's batches, on every process, flattened in batch order."""
        from accelerate.utils import gather_object

        merged: dict[int, list] = {}
        for part in gather_object([mine]):
            merged.update(part)
        return [item for index in sorted(merged) for item in merged[index]]


class _ReadOnlyRunStore:
    """The run store as a process other than the main one uses it: it reads, and writes only its own batches."""

    _MAIN_ONLY = frozenset(
        {"write_config", "write_metrics", "mark_done", "write_table", "save_model_dir", "prune_checkpoints"}
    )

    def __init__(self, store: RunStore) -> None:
        self._store = store

    def __getattr__(self, name: str):
        if name in self._MAIN_ONLY:
            return lambda *args, **kwargs: None
        return getattr(self._store, name)


def _generate(iteration, policy, modality, prompts, config, store, processes, progress):
    if (marker := store.done(iteration, "generate")) is not None:
        parts = store.load_batches(iteration, "generate")
        rows = [r for b in sorted(parts) for r in parts[b]]
        return [modality.record.from_row(r) for r in rows], marker["metrics"]
    started = time.perf_counter()
    parts = store.load_batches(iteration, "generate")
    completed = {b: [modality.record.from_row(r) for r in rows] for b, rows in parts.items() if b != EXTERNAL_BATCH}
    produced: dict[int, list] = {}

    def on_batch(index, batch):  # every process persists the batches it drew
        store.save_batch(iteration, "generate", index, [s.to_row() for s in batch])
        produced[index] = batch

    mine = processes.shard(math.ceil(len(prompts) / config.generation.prompts_per_batch))
    samples = modality.generate(
        policy, prompts, stream=iteration, completed=completed, progress=progress, description=f"generate {iteration}",
        on_batch=on_batch, batch_indices=mine,
    )  # fmt: skip
    if mine is not None:
        samples = processes.gather({b: produced[b] if b in produced else completed[b] for b in mine})
    seconds = time.perf_counter() - started
    new_units = modality.generated_units(samples) - sum(modality.generated_units(b) for b in completed.values())
    if extra := modality.extra_candidates(policy, prompts):
        store.save_batch(iteration, "generate", EXTERNAL_BATCH, [s.to_row() for s in extra])
        samples = samples + extra
    metrics = {"time_generate_s": seconds, "generate_tokens_per_s": new_units / seconds if seconds else None}
    if completed:
        metrics["generate_resumed_batches"] = len(completed)
    store.mark_done(iteration, "generate", {"metrics": metrics})
    return samples, metrics


def _score(iteration, samples, prompts, modality, reward, config, store, processes, progress):
    started = time.perf_counter()

    def saved_batches():
        return {b: scores_from_rows(rows, reward.names) for b, rows in store.load_batches(iteration, "score").items()}

    score = dict(
        reward=reward, samples=samples, columns_by_prompt=columns_by_prompt(prompts), inputs=modality.reward_inputs,
        batch_size=config.reward.batch_size,
    )  # fmt: skip
    mine = processes.shard(math.ceil(len(samples) / config.reward.batch_size))
    scores = score_samples(
        **score, completed=saved_batches(), progress=progress, batch_indices=mine,
        on_batch=lambda b, s: store.save_batch(iteration, "score", b, scores_to_rows(s)),
    )  # fmt: skip
    if mine is not None:  # every shard is on disk once all processes are here; assemble them (nothing is rescored)
        processes.wait()
        scores = score_samples(**score, completed=saved_batches(), progress=False)
    return scores, {"time_score_s": time.perf_counter() - started}


def _select(iteration, policy, modality, samples, scores, reward, config, store, processes):
    if processes.is_main and store.done(iteration, "select") is None:
        kept, metrics = _select_once(iteration, policy, modality, samples, scores, config, store)
        processes.wait()
        return kept, metrics
    processes.wait()  # selection happens once, in the main process; the others read what it kept
    rows = store.read_table(iteration, "samples")
    kept = [modality.record.from_row(r) for r in rows if r["kept"]]
    return kept, store.done(iteration, "select")["metrics"]


def _select_once(iteration, policy, modality, samples, scores, config, store):
    started = time.perf_counter()
    section = config.selection
    ref_logprobs = modality.reference_logprobs(policy, samples) if section.kl_coef > 0 else None
    logprobs = [s.logprob for s in samples] if ref_logprobs is not None else None
    key = kl_ranking_key(scores.reward, logprobs, ref_logprobs, section.kl_coef)
    selection = select(
        section.strategy, key, np.array([s.prompt_id for s in samples]), np.array([s.sample_index for s in samples]),
        samples_per_prompt=config.generation.samples_per_prompt, keep_per_prompt=section.keep_per_prompt,
        threshold=section.threshold, max_kept=section.max_kept,
    )  # fmt: skip
    kept = [s for s, keep in zip(samples, selection.kept, strict=True) if keep]
    if not kept:
        raise RuntimeError(
            f"iteration {iteration}: no sample could be kept ({selection.invalid_count} invalid rewards)"
        )
    rows = sample_rows(iteration, samples, scores, selection, ref_logprobs, modality.sample_settings())
    store.write_table(iteration, "samples", rows)
    store.write_table(iteration, "kept", [r for r in rows if r["kept"]])
    metrics = selection_metrics(samples, scores, selection, ref_logprobs, modality.sample_metrics)
    metrics["time_select_s"] = time.perf_counter() - started
    store.mark_done(iteration, "select", {"metrics": metrics})
    return kept, metrics


def _finetune(iteration, policy, modality, kept, store, accelerator, progress):
    policy, stats = modality.finetune(policy, kept, iteration=iteration, accelerator=accelerator, progress=progress)
    directory = store.checkpoint_dir(iteration)
    if is_sharded(accelerator):
        # FSDP left each process a shard. Gather the whole weights to the main process once, write the checkpoint
        # from them, and let every process load it: the policy that generates next is the checkpoint, exactly
        # what a resumed run would load, and generation runs no collectives (processes draw different batches).
        weights = full_state_dict(modality.trained_module(policy))
        store.save_model_dir(directory, lambda d: modality.save(policy, d, state_dict=weights))
        del weights, policy
        accelerator.wait_for_everyone()
        policy = modality.load_policy(directory)
    else:
        store.save_model_dir(directory, lambda d: modality.save(policy, d))
    metrics = {
        "train_loss_first_epoch": stats.first_epoch_loss,
        "train_loss_last_epoch": stats.last_epoch_loss,
        "optimizer_steps": stats.optimizer_steps,
        "trained_tokens": stats.trained_tokens,
        "time_finetune_s": stats.seconds,
        "finetune_tokens_per_s": stats.tokens_per_second,
    }
    # Earlier stages' metrics ride in this marker so a resumed run can still report them.
    earlier = {
        k: v for s in ("generate", "select") for k, v in (store.done(iteration, s) or {}).get("metrics", {}).items()
    }
    store.mark_done(iteration, "finetune", {"metrics": earlier | metrics})
    return policy, metrics


def _evaluate(iteration, policy, modality, prompts, reward, config, store, processes, progress) -> dict[str, Any]:
    """Held-out reward and the modality's own measures (KL, perplexity, diversity, distance) of `policy`.

    Generation is sharded across processes; the main process scores and measures (the others return {}).
    """
    if not prompts:
        return {}
    started = time.perf_counter()
    produced: dict[int, list] = {}
    mine = processes.shard(math.ceil(len(prompts) / config.generation.prompts_per_batch))
    samples = modality.generate(
        policy, prompts, stream=EVAL_STREAM, samples_per_prompt=config.loop.eval_samples_per_prompt,
        progress=progress, description=f"eval {iteration}", batch_indices=mine,
        on_batch=lambda b, batch: produced.__setitem__(b, batch),
    )  # fmt: skip
    if mine is not None:
        samples = processes.gather(produced)
        if not processes.is_main:
            return {}
    scores = score_samples(
        reward, samples, columns_by_prompt(prompts), inputs=modality.reward_inputs,
        batch_size=config.reward.batch_size, progress=False,
    )  # fmt: skip
    metrics: dict[str, Any] = M.reward_stats(scores.reward, "eval_reward")
    metrics |= modality.sample_metrics(samples, "eval")
    if config.loop.pass_threshold is not None:  # a verifier's reward: pass@1 and pass@k of the held-out split
        k = config.loop.pass_k or config.loop.eval_samples_per_prompt
        metrics |= M.pass_at_k_metrics([s.prompt_id for s in samples], scores.reward, config.loop.pass_threshold, k)
    extra_metrics, extra_columns = modality.eval_metrics(policy, samples, prompts, iteration)
    metrics |= extra_metrics
    metrics["time_eval_s"] = time.perf_counter() - started
    rows = [
        s.to_row() | {"reward": r} | extra for s, r, extra in zip(samples, scores.reward, extra_columns, strict=True)
    ]
    store.write_table(iteration, "eval_samples", rows)
    return metrics
