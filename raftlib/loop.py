"""The RAFT loop (Dong et al. 2023, Table 1), read top to bottom.

    for t in 1..T:  prompts --generate K each--> samples --score--> rewards --select--> kept --fine-tune--> model_t
                    then evaluate model_t on held-out prompts

What is generated, scored and trained comes from a *modality* (`raftlib.modality.Modality`):
`raftlib.text.modality.TextModality` for a causal language model (RAFTConfig),
`raftlib.diffusion.modality.ImageModality` for a diffusion model (DiffusionConfig). Prompts, selection, the run
store, resume and the metrics rows are the same for both. Every stage takes the run in progress (`Run`: config,
store, processes, modality, reward) and the iteration; only the main process writes run-level files, and each
such write says so (`if run.is_main`).

Every stage persists its output and then writes a marker, so `resume(run_dir)` skips finished stages,
reuses finished generation and scoring batches, and reruns an unfinished fine-tune from the previous
checkpoint. All randomness is seeded from (seed, iteration, batch): a resumed run keeps exactly the
samples an uninterrupted run keeps.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raftlib import metrics as M
from raftlib.batches import Batches
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
from raftlib.config import load_config
from raftlib.data import PromptSplits, columns_by_prompt, load_prompts, prompts_for_iteration
from raftlib.modality import Modality, modality_for
from raftlib.plan import Hardware, check_fits
from raftlib.records import Scores
from raftlib.rewards import WeightedReward, build_reward
from raftlib.scoring import score_samples
from raftlib.select import kl_ranking_key, select
from raftlib.sharding import build_accelerator, full_state_dict, is_sharded, process_state
from raftlib.store import RunDirError, RunStore

if TYPE_CHECKING:
    from raftlib.diffusion.config import DiffusionConfig
    from raftlib.text.config import RAFTConfig

logger = logging.getLogger("raftlib")

EVAL_STREAM = 999_983
"""Seed stream of evaluation: the same random numbers at every iteration, so eval curves are less noisy."""


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
            if holds_same_run(store, config):
                logger.info("%s already holds this run: resuming it", store.root)
            else:
                store.write_config(config.to_yaml())
        process_state().wait_for_everyone()
        with quiet_transformers():
            return _execute(config, store, reward)
    finally:
        if main_process:
            store.unlock()


def holds_same_run(store: RunStore, config) -> bool:
    """Whether `store` already holds a run of this config (then it is resumed, not restarted).

    A run directory holding a different config raises RunDirError naming the keys that differ: a run is
    never continued under settings it did not start with.
    """
    if not store.has_run():
        return False
    saved = load_config(store.config_path)
    if saved != config:
        changed = config_diff(saved.to_dict(), config.to_dict())
        raise RunDirError(
            f"{store.root} holds a run with a different config ({', '.join(changed)}); "
            "use another output_dir, or resume it with `python -m raftlib resume`"
        )
    return True


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


def _execute(config, store: RunStore, reward: WeightedReward | None) -> RunResult:
    run = _start(config, store, reward)
    # The model entering the first unfinished iteration: the newest finished fine-tune, or the base.
    trained = [t for t in range(1, config.loop.iterations + 1) if store.done(t, "finetune")]
    last_trained = max(trained, default=0)
    policy = run.modality.load_policy(store.checkpoint_dir(last_trained) if last_trained else None)

    if not store.done(0, "eval"):
        _record(run, 0, {"iteration": 0} | _evaluate(run, 0, policy))

    for iteration in range(1, config.loop.iterations + 1):
        if store.done(iteration, "eval"):
            continue
        started = time.perf_counter()
        row: dict[str, Any] = {"iteration": iteration}
        if not store.done(iteration, "finetune"):
            # 1. the b prompts of this iteration
            prompts = prompts_for_iteration(run.splits.train, iteration, config.loop.prompts_per_iteration, config.seed)
            # 2. K samples per prompt (finished batches come back from the run directory)
            samples, row_generate = _generate(run, iteration, policy, prompts)
            # 3. rewards (finished batches come back from the run directory)
            scores, row_score = _score(run, iteration, samples, prompts)
            # 4. keep the best: local best-of-K, global top 1/K, or threshold; KL only changes the key
            kept, row_select = _select(run, iteration, policy, samples, scores)
            # 5. fine-tune on what was kept, from the model that generated it
            policy, row_finetune = _finetune(run, iteration, policy, kept)
            row |= row_generate | row_score | row_select | row_finetune
        else:
            row |= store.done(iteration, "finetune")["metrics"]
        # 6. evaluate the new model on held-out prompts
        row |= _evaluate(run, iteration, policy)
        row["time_iteration_s"] = time.perf_counter() - started
        _record(run, iteration, row)
        if config.loop.keep_checkpoints and run.is_main:
            store.prune_checkpoints(config.loop.keep_checkpoints, protect=[iteration])
        if run.is_main:
            logger.info(summary_line(row, config.loop.iterations))

    if run.is_main:
        store.save_model_dir(store.final_dir, lambda d: run.modality.save(policy, d))
    run.processes.close()
    return RunResult(run_dir=store.root, metrics=store.read_metrics(), final_dir=store.final_dir)


# ----------------------------------------------------------------------------------------------
# The run in progress
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One run in progress, as every stage sees it."""

    config: RAFTConfig | DiffusionConfig
    store: RunStore
    processes: Processes
    modality: Modality
    reward: WeightedReward
    splits: PromptSplits
    """The prompts: train (drawn from each iteration) and eval (held out)."""

    @property
    def is_main(self) -> bool:
        """The main process: the one that selects and writes run-level files (the others write their batches)."""
        return self.processes.is_main

    def batches(
        self, iteration: int, stage: str, count: int, completed: dict[int, Any], produced: dict[int, Any]
    ) -> Batches:
        """How a stage of `count` batches runs: reuse `completed`, draw only this process's share, and save each
        new batch in the run directory (every process saves the batches it drew) and in `produced`."""

        def on_batch(index: int, result) -> None:
            self.store.save_batch(iteration, stage, index, _rows_of(result))
            produced[index] = result

        return Batches(
            completed=completed, on_batch=on_batch, indices=self.processes.shard(count),
            progress=self.config.logging.progress_bars, description=f"{stage} {iteration}",
        )  # fmt: skip


def _rows_of(result) -> list[dict[str, Any]]:
    """A batch's run-store rows: samples as their rows, scores as one row per sample."""
    if isinstance(result, list):
        return [s.to_row() for s in result]
    return scores_to_rows(result)


def _start(config, store: RunStore, reward: WeightedReward | None) -> Run:
    """The accelerator, processes, modality, prompts and reward of a run; logs what the run will do."""
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
    if config.logging.tensorboard:
        accelerator.init_trackers("tensorboard")
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
    modality = modality_for(config, accelerator.device)
    splits = load_prompts(config.data, config.seed)
    return Run(config, store, processes, modality, reward or build_reward(config.reward), splits)


def _record(run: Run, iteration: int, row: dict[str, Any]) -> None:
    """An iteration's metrics row, then its marker: a kill in between reruns the eval, never loses the row."""
    if run.is_main:
        run.store.write_metrics(row)
        run.store.mark_done(iteration, "eval", {"metrics": row})
    track(run.processes.accelerator, row)


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


# ----------------------------------------------------------------------------------------------
# Stages with persistence. Each takes the run and the iteration and returns its output and the
# metrics it contributes to the row. A stage's marker follows its output and is the main process's.
# ----------------------------------------------------------------------------------------------


def _generate(run: Run, iteration: int, policy, prompts) -> tuple[list, dict[str, Any]]:
    store, modality = run.store, run.modality
    saved = store.load_batches(iteration, "generate")
    completed = {b: [modality.record.from_row(r) for r in rows] for b, rows in saved.items()}
    if (marker := store.done(iteration, "generate")) is not None:
        return [s for b in sorted(completed) for s in completed[b]], marker["metrics"]
    started = time.perf_counter()
    produced: dict[int, list] = {}
    batches = run.batches(iteration, "generate", _count(prompts, run.config.generation.prompts_per_batch),
                          completed, produced)  # fmt: skip
    samples = modality.generate(policy, prompts, stream=iteration, candidates=True, batches=batches)
    if batches.indices is not None:
        samples = run.processes.gather({b: produced[b] if b in produced else completed[b] for b in batches.indices})
    seconds = time.perf_counter() - started
    new_units = modality.generated_units(samples) - sum(modality.generated_units(b) for b in completed.values())
    metrics = {"time_generate_s": seconds, "generate_tokens_per_s": new_units / seconds if seconds else None}
    if completed:
        metrics["generate_resumed_batches"] = len(completed)
    if run.is_main:
        store.mark_done(iteration, "generate", {"metrics": metrics})
    return samples, metrics


def _score(run: Run, iteration: int, samples, prompts) -> tuple[Scores, dict[str, Any]]:
    store, reward = run.store, run.reward

    def saved_batches() -> dict[int, Scores]:
        return {b: scores_from_rows(rows, reward.names) for b, rows in store.load_batches(iteration, "score").items()}

    score = dict(
        reward=reward, samples=samples, columns_by_prompt=columns_by_prompt(prompts),
        inputs=run.modality.reward_inputs, batch_size=run.config.reward.batch_size,
    )  # fmt: skip
    if (marker := store.done(iteration, "score")) is not None:  # every batch is on disk: assemble, score nothing
        return score_samples(**score, batches=Batches(completed=saved_batches(), progress=False)), marker["metrics"]
    started = time.perf_counter()
    batches = run.batches(iteration, "score", _count(samples, run.config.reward.batch_size), saved_batches(), {})
    scores = score_samples(**score, batches=batches)
    if batches.indices is not None:  # every shard is on disk once all processes are here; assemble them
        run.processes.wait()
        scores = score_samples(**score, batches=Batches(completed=saved_batches(), progress=False))
    metrics = {"time_score_s": time.perf_counter() - started}
    if run.is_main:
        store.mark_done(iteration, "score", {"metrics": metrics})
    return scores, metrics


def _select(run: Run, iteration: int, policy, samples, scores: Scores) -> tuple[list, dict[str, Any]]:
    """Selection happens once, in the main process; the others read what it kept."""
    if run.is_main and run.store.done(iteration, "select") is None:
        kept, metrics = _select_once(run, iteration, policy, samples, scores)
        run.processes.wait()
        return kept, metrics
    run.processes.wait()
    rows = run.store.read_table(iteration, "samples")
    kept = [run.modality.record.from_row(r) for r in rows if r["kept"]]
    return kept, run.store.done(iteration, "select")["metrics"]


def _select_once(run: Run, iteration: int, policy, samples, scores: Scores) -> tuple[list, dict[str, Any]]:
    started = time.perf_counter()
    config, modality, store = run.config, run.modality, run.store
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


def _finetune(run: Run, iteration: int, policy, kept) -> tuple[Any, dict[str, Any]]:
    store, modality, accelerator = run.store, run.modality, run.processes.accelerator
    policy, stats = modality.finetune(
        policy, kept, iteration=iteration, accelerator=accelerator, progress=run.config.logging.progress_bars
    )
    directory = store.checkpoint_dir(iteration)
    if is_sharded(accelerator):
        # FSDP left each process a shard. Gather the whole weights to the main process once, write the checkpoint
        # from them, and let every process load it: the policy that generates next is the checkpoint, exactly
        # what a resumed run would load, and generation runs no collectives (processes draw different batches).
        weights = full_state_dict(modality.trained_module(policy))
        if run.is_main:
            store.save_model_dir(directory, lambda d: modality.save(policy, d, state_dict=weights))
        del weights, policy
        accelerator.wait_for_everyone()
        policy = modality.load_policy(directory)
    elif run.is_main:
        store.save_model_dir(directory, lambda d: modality.save(policy, d))
    metrics = {
        "train_loss_first_epoch": stats.first_epoch_loss,
        "train_loss_last_epoch": stats.last_epoch_loss,
        "optimizer_steps": stats.optimizer_steps,
        "trained_tokens": stats.trained_tokens,
        "time_finetune_s": stats.seconds,
        "finetune_tokens_per_s": stats.tokens_per_second,
    }
    if run.is_main:
        # Earlier stages' metrics ride in this marker so a resumed run can still report them.
        earlier = {
            k: v
            for stage in ("generate", "score", "select")
            for k, v in (store.done(iteration, stage) or {}).get("metrics", {}).items()
        }
        store.mark_done(iteration, "finetune", {"metrics": earlier | metrics})
    return policy, metrics


def _evaluate(run: Run, iteration: int, policy) -> dict[str, Any]:
    """Held-out reward and the modality's own measures (KL, perplexity, diversity, distance) of `policy`.

    Generation is sharded across processes; the main process scores and measures (the others return {}).
    """
    prompts, config, modality = run.splits.eval, run.config, run.modality
    if not prompts:
        return {}
    started = time.perf_counter()
    produced: dict[int, list] = {}
    batches = Batches(
        on_batch=produced.__setitem__, indices=run.processes.shard(_count(prompts, config.generation.prompts_per_batch)),
        progress=config.logging.progress_bars, description=f"eval {iteration}",
    )  # fmt: skip
    samples = modality.generate(
        policy, prompts, stream=EVAL_STREAM, samples_per_prompt=config.loop.eval_samples_per_prompt, batches=batches
    )
    if batches.indices is not None:
        samples = run.processes.gather(produced)
        if not run.is_main:
            return {}
    scores = score_samples(
        run.reward, samples, columns_by_prompt(prompts), inputs=modality.reward_inputs,
        batch_size=config.reward.batch_size, batches=Batches(progress=False),
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
    run.store.write_table(iteration, "eval_samples", rows)
    return metrics


def _count(items, batch_size: int) -> int:
    """Batches of `batch_size` in `items`."""
    return -(-len(items) // batch_size)
