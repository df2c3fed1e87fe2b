"""The RAFT loop (Dong et al. 2023, Table 1), read top to bottom.

    for t in 1..T:  prompts --generate K each--> samples --score--> rewards --select--> kept --fine-tune--> model_t
                    then evaluate model_t on held-out prompts

What is generated, scored and trained comes from a *modality* (`raftlib.modality.Modality`):
`raftlib.text.modality.TextModality` for a causal language model (RAFTConfig),
`raftlib.diffusion.modality.ImageModality` for a diffusion model (DiffusionConfig). Prompts, selection, the run
store, resume and the metrics rows are the same for both.

Every stage is one `raftlib.stage.Stage`: it persists its output (per batch, where it works in batches) and
then its marker, so `resume(run_dir)` skips finished stages, reuses finished batches and reruns an unfinished
fine-tune from the previous checkpoint. All randomness is seeded from (seed, iteration, batch): a resumed run
keeps exactly the samples an uninterrupted run keeps. The plumbing (the run in progress, its processes, the
stage primitive, the start of a run) lives in `raftlib.stage` and `raftlib.start`; this file is the algorithm.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raftlib import evaluation
from raftlib.bookkeeping import quiet_transformers, sample_rows, selection_metrics, summary_line, track
from raftlib.data import columns_by_prompt, prompts_for_iteration
from raftlib.evaluation import EVAL_STREAM
from raftlib.records import Scores
from raftlib.scoring import score_samples
from raftlib.select import kl_ranking_key, select
from raftlib.stage import Run, SampleParts, ScoreParts
from raftlib.start import RunResult, open_run, start_run

if TYPE_CHECKING:
    from raftlib.diffusion.config import DiffusionConfig
    from raftlib.rewards import WeightedReward
    from raftlib.text.config import RAFTConfig

logger = logging.getLogger("raftlib")

__all__ = ["EVAL_STREAM", "RunResult", "resume", "run"]


def run(config: RAFTConfig | DiffusionConfig, *, reward: WeightedReward | None = None) -> RunResult:
    """Run RAFT as configured (a RAFTConfig aligns a language model, a DiffusionConfig an image model).

    A run directory holding this same config is resumed, not restarted.
    """
    with open_run(config.output_dir, config) as (config, store), quiet_transformers():
        return _execute(start_run(config, store, reward))


def resume(run_dir: str | Path, *, reward: WeightedReward | None = None) -> RunResult:
    """Continue a run from its directory after a crash or a kill, losing and duplicating nothing."""
    with open_run(run_dir) as (config, store), quiet_transformers():
        return _execute(start_run(config, store, reward))


def _execute(run: Run) -> RunResult:
    config, store = run.config, run.store
    # The model entering the first unfinished iteration: the newest finished fine-tune, or the base.
    trained = [t for t in range(1, config.loop.iterations + 1) if store.done(t, "finetune")]
    policy = run.modality.load_policy(store.checkpoint_dir(max(trained)) if trained else None)
    _evaluate(run, 0, policy)

    for iteration in range(1, config.loop.iterations + 1):
        if not run.stage(iteration, "finetune").done:
            # 1. the b prompts of this iteration
            prompts = prompts_for_iteration(run.splits.train, iteration, config.loop.prompts_per_iteration, config.seed)
            # 2. K samples per prompt
            samples = _generate(run, iteration, policy, prompts)
            # 3. a reward for every sample
            scores = _score(run, iteration, samples, prompts)
            # 4. keep the best: local best-of-K, global top 1/K, or threshold; KL only changes the key
            kept = _select(run, iteration, policy, samples, scores)
            # 5. fine-tune on what was kept, from the model that generated it
            policy = _finetune(run, iteration, policy, kept)
        # 6. evaluate the new model on held-out prompts
        _evaluate(run, iteration, policy)
        if config.loop.keep_checkpoints and run.is_main:
            store.prune_checkpoints(config.loop.keep_checkpoints, protect=[iteration])

    if run.is_main:
        store.save_model_dir(store.final_dir, lambda d: run.modality.save(policy, d))
    run.processes.wait()
    run.modality.close()  # an inference engine tears down the process groups it joined: after the last barrier
    run.processes.close()
    return RunResult(run_dir=store.root, metrics=store.read_metrics(), final_dir=store.final_dir)


# ----------------------------------------------------------------------------------------------
# The stages: each its algorithm line, around the stage primitive (raftlib.stage)
# ----------------------------------------------------------------------------------------------


def _generate(run: Run, iteration: int, policy, prompts) -> list:
    stage = run.stage(iteration, "generate", SampleParts(run.modality.record))
    if stage.done:
        return stage.assemble()
    batches = stage.batches()
    run.modality.generate(policy, prompts, stream=iteration, candidates=True, batches=batches)
    samples = stage.assemble()
    drawn = [s for index in sorted(stage.drawn) for s in stage.drawn[index]]  # this process's, just now
    speed = run.modality.generated_units(drawn) / stage.seconds
    metrics = {"generate_tokens_per_s": speed, "generate_resumed_batches": len(batches.completed)}
    stage.finish(**metrics | run.modality.check_generation(policy, drawn))
    return samples


def _score(run: Run, iteration: int, samples, prompts) -> Scores:
    stage = run.stage(iteration, "score", ScoreParts(run.reward.names))
    if not stage.done:
        score_samples(
            run.reward,
            samples,
            columns_by_prompt(prompts),
            inputs=run.modality.reward_inputs,
            batch_size=run.config.reward.batch_size,
            batches=stage.batches(),
        )
    scores = stage.assemble()
    if not stage.done:
        stage.finish()
    return scores


def _select(run: Run, iteration: int, policy, samples, scores: Scores) -> list:
    """Selection happens once, in the main process; the others read what it kept."""
    stage = run.stage(iteration, "select")
    if not stage.done and run.is_main:
        section, modality = run.config.selection, run.modality
        ref_logprobs = modality.reference_logprobs(policy, samples) if section.kl_coef > 0 else None
        logprobs = [s.logprob for s in samples] if ref_logprobs is not None else None
        key = kl_ranking_key(scores.reward, logprobs, ref_logprobs, section.kl_coef)
        selection = select(
            section,
            key,
            np.array([s.prompt_id for s in samples]),
            np.array([s.sample_index for s in samples]),
            samples_per_prompt=run.config.generation.samples_per_prompt,
            iteration=iteration,
        )
        if not selection.kept.any():
            raise RuntimeError(
                f"iteration {iteration}: no sample could be kept ({selection.invalid_count} invalid rewards)"
            )
        rows = sample_rows(iteration, samples, scores, selection, ref_logprobs, modality.sample_settings())

        def write() -> None:
            run.store.write_table(iteration, "samples", rows)
            run.store.write_table(iteration, "kept", [r for r in rows if r["kept"]])

        stage.finish(write, **selection_metrics(samples, scores, selection, ref_logprobs, modality.sample_metrics))
    run.processes.wait()
    return [run.modality.record.from_row(r) for r in run.store.read_table(iteration, "kept")]


def _finetune(run: Run, iteration: int, policy, kept):
    stage, store, modality = run.stage(iteration, "finetune"), run.store, run.modality
    accelerator = run.processes.accelerator
    policy, stats = modality.finetune(
        policy, kept, iteration=iteration, accelerator=accelerator, progress=run.config.logging.progress_bars
    )
    policy = run.save_checkpoint(iteration, policy)  # and reload it where FSDP left each process a shard
    modality.refresh(policy, store.checkpoint_dir(iteration))
    stage.finish(
        train_loss_first_epoch=stats.first_epoch_loss,
        train_loss_last_epoch=stats.last_epoch_loss,
        optimizer_steps=stats.optimizer_steps,
        trained_tokens=stats.trained_tokens,
        finetune_tokens_per_s=stats.tokens_per_second,
    )
    return policy


def _evaluate(run: Run, iteration: int, policy) -> None:
    """Held-out reward and the modality's own measures of `policy` (`raftlib.evaluation`, the one evaluation
    path), then the iteration's metrics row and marker (the row first: a kill in between reruns the
    evaluation, never loses the row)."""
    stage = run.stage(iteration, "eval", SampleParts(run.modality.record))
    if stage.done:
        return
    metrics: dict[str, Any] = {}
    loop = run.config.loop
    if run.splits.eval and (iteration % loop.eval_every == 0 or iteration == loop.iterations):
        evaluation.draw(run.modality, policy, run.splits.eval, run.config, stage.batches())
        samples = stage.assemble()  # every process's batches
        if run.is_main:  # the main process scores and measures; the others wait at the next barrier
            held_out = evaluation.measure(
                run.modality, run.reward, policy, samples, run.splits.eval, run.config, iteration
            )
            run.store.write_table(iteration, "eval_samples", held_out.rows)
            metrics = held_out.metrics
    row = run.row(iteration, **metrics, time_eval_s=stage.seconds)
    if run.is_main:
        run.store.write_metrics(row)
        if iteration:
            logger.info(summary_line(row, run.config.loop.iterations))
    stage.finish(**metrics)
    track(run.processes.accelerator, row)
