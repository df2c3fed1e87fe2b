"""The RAFT loop (Dong et al. 2023, Table 1), read top to bottom.

    for t in 1..T:  prompts --generate K each--> samples --score--> rewards --select--> kept --fine-tune--> model_t
                    then evaluate model_t on held-out prompts

Every stage persists its output and then writes a marker, so `resume(run_dir)` skips finished stages,
reuses finished generation and scoring batches, and reruns an unfinished fine-tune from the previous
checkpoint. All randomness is seeded from (seed, iteration, batch): a resumed run keeps exactly the
samples an uninterrupted run keeps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raftlib import metrics as M
from raftlib.bookkeeping import (
    config_diff,
    examples_of,
    external_samples,
    quiet_transformers,
    reference_model,
    sample_rows,
    scores_from_rows,
    scores_to_rows,
    selection_metrics,
    setup_logging,
    summary_line,
    track,
)
from raftlib.config import ConfigError, RAFTConfig
from raftlib.data import columns_by_prompt, load_external_samples, load_prompts, prompts_for_iteration
from raftlib.finetune import completion_logprobs, finetune, reference_perplexity
from raftlib.generate import generate_samples
from raftlib.models import load_policy, load_tokenizer, save_model
from raftlib.records import Sample
from raftlib.rewards import WeightedReward, build_reward, score_samples
from raftlib.select import kl_ranking_key, select
from raftlib.store import RunDirError, RunStore

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


def run(config: RAFTConfig, *, reward: WeightedReward | None = None) -> RunResult:
    """Run RAFT as configured. A run directory holding this same config is resumed, not restarted."""
    setup_logging(config.logging.level)
    store = RunStore(config.output_dir).lock()
    try:
        if store.has_run():
            saved = RAFTConfig.from_yaml(store.config_path)
            if saved != config:
                changed = config_diff(saved.to_dict(), config.to_dict())
                raise RunDirError(
                    f"{store.root} holds a run with a different config ({', '.join(changed)}); "
                    "use another output_dir, or resume it with `python -m raftlib resume`"
                )
            logger.info("%s already holds this run: resuming it", store.root)
        else:
            store.write_config(config.to_yaml())
        with quiet_transformers():
            return _execute(config, store, reward)
    finally:
        store.unlock()


def resume(run_dir: str | Path, *, reward: WeightedReward | None = None) -> RunResult:
    """Continue a run from its directory after a crash or a kill, losing and duplicating nothing."""
    store = RunStore(run_dir)
    if not store.has_run():
        raise RunDirError(f"{run_dir} has no config.yaml: it is not a raftlib run directory")
    config = RAFTConfig.from_yaml(store.config_path)
    setup_logging(config.logging.level)
    store.lock()
    try:
        with quiet_transformers():
            return _execute(config, store, reward)
    finally:
        store.unlock()


def _execute(config: RAFTConfig, store: RunStore, reward: WeightedReward | None) -> RunResult:
    from accelerate import Accelerator

    accelerator = Accelerator(
        gradient_accumulation_steps=config.training.gradient_accumulation_steps,
        mixed_precision=config.training.mixed_precision,
        log_with="tensorboard" if config.logging.tensorboard else None,
        project_dir=str(store.root),
    )
    if accelerator.num_processes > 1:
        raise ConfigError(
            "multi-process runs (sharded generation, DDP fine-tune) are not supported yet; run one process"
        )
    if config.logging.tensorboard:
        accelerator.init_trackers("tensorboard")
    device = accelerator.device
    progress = config.logging.progress_bars
    logger.info("derived sizes: %s", config.derived())

    tokenizer = load_tokenizer(config.model)
    splits = load_prompts(config.data, config.seed)
    reward = reward or build_reward(config.reward)
    external = load_external_samples(config.selection.external_samples) if config.selection.external_samples else {}

    # The model entering the first unfinished iteration: the newest finished fine-tune, or the base.
    trained = [t for t in range(1, config.loop.iterations + 1) if store.done(t, "finetune")]
    last_trained = max(trained, default=0)
    policy = load_policy(config.model, store.checkpoint_dir(last_trained) if last_trained else None, device)

    if not store.done(0, "eval"):
        row0 = {"iteration": 0} | _evaluate(0, policy, tokenizer, splits.eval, reward, config, store, progress)
        store.write_metrics(row0)
        track(accelerator, row0)
        store.mark_done(0, "eval", {"metrics": row0})

    for iteration in range(1, config.loop.iterations + 1):
        if store.done(iteration, "eval"):
            continue
        started = time.perf_counter()
        row: dict[str, Any] = {"iteration": iteration}
        if not store.done(iteration, "finetune"):
            # 1. the b prompts of this iteration
            prompts = prompts_for_iteration(splits.train, iteration, config.loop.prompts_per_iteration, config.seed)
            # 2. K samples per prompt (finished batches come back from the run directory)
            samples, row_generate = _generate(iteration, policy, tokenizer, prompts, external, config, store, progress)
            # 3. rewards (finished batches come back from the run directory)
            scores, row_score = _score(iteration, samples, prompts, reward, config, store, progress)
            # 4. keep the best: local best-of-K, global top 1/K, or threshold; KL only changes the key
            kept, row_select = _select(iteration, policy, tokenizer, samples, scores, reward, config, store)
            # 5. fine-tune on what was kept, from the model that generated it
            policy, row_finetune = _finetune(iteration, policy, tokenizer, kept, config, store, accelerator, progress)
            row |= row_generate | row_score | row_select | row_finetune
        else:
            row |= store.done(iteration, "finetune")["metrics"]
        # 6. evaluate the new model on held-out prompts
        row |= _evaluate(iteration, policy, tokenizer, splits.eval, reward, config, store, progress)
        row["time_iteration_s"] = time.perf_counter() - started
        store.write_metrics(row)  # before the marker: a kill in between reruns the eval, never loses the row
        track(accelerator, row)
        store.mark_done(iteration, "eval", {"metrics": row})
        if config.loop.keep_checkpoints:
            store.prune_checkpoints(config.loop.keep_checkpoints, protect=[iteration])
        logger.info(summary_line(row, config.loop.iterations))

    store.save_model_dir(store.final_dir, lambda d: save_model(policy, tokenizer, d))
    accelerator.end_training()
    return RunResult(run_dir=store.root, metrics=store.read_metrics(), final_dir=store.final_dir)


# ----------------------------------------------------------------------------------------------
# Stages with persistence. Each returns its output and the metrics it contributes to the row.
# ----------------------------------------------------------------------------------------------


def _generate(iteration, policy, tokenizer, prompts, external, config, store, progress):
    if (marker := store.done(iteration, "generate")) is not None:
        parts = store.load_batches(iteration, "generate")
        rows = [r for b in sorted(parts) for r in parts[b]]
        return [Sample.from_row(r) for r in rows], marker["metrics"]
    started = time.perf_counter()
    parts = store.load_batches(iteration, "generate")
    completed = {b: [Sample.from_row(r) for r in rows] for b, rows in parts.items() if b != EXTERNAL_BATCH}
    samples = generate_samples(
        policy, tokenizer, prompts, config.generation,
        seed=config.seed, stream=iteration, max_prompt_tokens=config.data.max_prompt_tokens,
        completed=completed, progress=progress, description=f"generate {iteration}",
        on_batch=lambda b, batch: store.save_batch(iteration, "generate", b, [s.to_row() for s in batch]),
    )  # fmt: skip
    seconds = time.perf_counter() - started
    reused = sum(s.completion_token_count for batch in completed.values() for s in batch)
    new_tokens = sum(s.completion_token_count for s in samples) - reused
    if external:
        extra = external_samples(policy, tokenizer, prompts, external, config)
        store.save_batch(iteration, "generate", EXTERNAL_BATCH, [s.to_row() for s in extra])
        samples = samples + extra
    metrics = {"time_generate_s": seconds, "generate_tokens_per_s": new_tokens / seconds if seconds else None}
    if completed:
        metrics["generate_resumed_batches"] = len(completed)
    store.mark_done(iteration, "generate", {"metrics": metrics})
    return samples, metrics


def _score(iteration, samples, prompts, reward, config, store, progress):
    started = time.perf_counter()
    completed = {b: scores_from_rows(rows, reward.names) for b, rows in store.load_batches(iteration, "score").items()}
    scores = score_samples(
        reward, samples, columns_by_prompt(prompts),
        batch_size=config.reward.batch_size, completed=completed, progress=progress,
        on_batch=lambda b, s: store.save_batch(iteration, "score", b, scores_to_rows(s)),
    )  # fmt: skip
    return scores, {"time_score_s": time.perf_counter() - started}


def _select(iteration, policy, tokenizer, samples, scores, reward, config, store):
    if store.done(iteration, "select") is not None:
        rows = store.read_table(iteration, "samples")
        kept = [Sample.from_row(r) for r in rows if r["kept"]]
        return kept, store.done(iteration, "select")["metrics"]
    started = time.perf_counter()
    section = config.selection
    ref_logprobs = None
    if section.kl_coef > 0:
        with reference_model(policy, config) as reference:
            ref_logprobs, _ = completion_logprobs(reference, examples_of(samples), tokenizer.pad_token_id)
    key = kl_ranking_key(scores.reward, [s.logprob for s in samples], ref_logprobs, section.kl_coef)
    selection = select(
        section.strategy, key, np.array([s.prompt_id for s in samples]), np.array([s.sample_index for s in samples]),
        samples_per_prompt=config.generation.samples_per_prompt, keep_per_prompt=section.keep_per_prompt,
        threshold=section.threshold,
    )  # fmt: skip
    kept = [s for s, keep in zip(samples, selection.kept, strict=True) if keep]
    if not kept:
        raise RuntimeError(
            f"iteration {iteration}: no sample could be kept ({selection.invalid_count} invalid rewards)"
        )
    rows = sample_rows(iteration, samples, scores, selection, ref_logprobs, config)
    store.write_table(iteration, "samples", rows)
    store.write_table(iteration, "kept", [r for r in rows if r["kept"]])
    metrics = selection_metrics(samples, scores, selection, ref_logprobs, reward)
    metrics["time_select_s"] = time.perf_counter() - started
    store.mark_done(iteration, "select", {"metrics": metrics})
    return kept, metrics


def _finetune(iteration, policy, tokenizer, kept, config, store, accelerator, progress):
    policy, stats = finetune(
        policy, examples_of(kept), config.training, pad_id=tokenizer.pad_token_id, seed=config.seed,
        iteration=iteration, accelerator=accelerator, progress=progress,
    )  # fmt: skip
    store.save_model_dir(store.checkpoint_dir(iteration), lambda d: save_model(policy, tokenizer, d))
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


def _evaluate(iteration, policy, tokenizer, prompts, reward, config, store, progress) -> dict[str, Any]:
    """Held-out reward, KL to the initial model, reference perplexity and diversity of `policy`."""
    if not prompts:
        return {}
    started = time.perf_counter()
    samples = generate_samples(
        policy, tokenizer, prompts, config.generation,
        seed=config.seed, stream=EVAL_STREAM, samples_per_prompt=config.loop.eval_samples_per_prompt,
        max_prompt_tokens=config.data.max_prompt_tokens, progress=progress, description=f"eval {iteration}",
    )  # fmt: skip
    scores = score_samples(
        reward, samples, columns_by_prompt(prompts), batch_size=config.reward.batch_size, progress=False
    )
    metrics: dict[str, Any] = M.reward_stats(scores.reward, "eval_reward")
    metrics |= M.text_metrics([s.completion for s in samples], "eval")
    metrics["eval_length_tokens"] = M.completion_length_mean([s.completion_token_count for s in samples])
    ref_logprobs = [s.logprob for s in samples]
    if iteration > 0:
        with reference_model(policy, config) as reference:
            ref_logprobs, _ = completion_logprobs(reference, examples_of(samples), tokenizer.pad_token_id)
    metrics["eval_kl"] = M.kl_estimate([s.logprob for s in samples], ref_logprobs)
    if config.data.reference_column:
        metrics["eval_reference_ppl"] = reference_perplexity(
            policy,
            tokenizer,
            prompts,
            config.data.reference_column,
            chat_template=config.generation.chat_template,
            max_prompt_tokens=config.data.max_prompt_tokens,
        )
    metrics["time_eval_s"] = time.perf_counter() - started
    rows = [
        s.to_row() | {"reward": r, "ref_logprob": lp}
        for s, r, lp in zip(samples, scores.reward, ref_logprobs, strict=True)
    ]
    store.write_table(iteration, "eval_samples", rows)
    return metrics
