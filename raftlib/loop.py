"""The RAFT loop (Dong et al. 2023, Table 1), read top to bottom.

    for t in 1..T:  prompts --generate K each--> samples --score--> rewards --select--> kept --fine-tune--> model_t
                    then evaluate model_t on held-out prompts

Every stage persists its output and then writes a marker, so `resume(run_dir)` skips finished stages,
reuses finished generation and scoring batches, and reruns an unfinished fine-tune from the previous
checkpoint. All randomness is seeded from (seed, iteration, batch): a resumed run keeps exactly the
samples an uninterrupted run keeps.
"""

from __future__ import annotations

import gc
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from raftlib import metrics as M
from raftlib.config import ConfigError, RAFTConfig
from raftlib.data import columns_by_prompt, load_external_samples, load_prompts, prompts_for_iteration
from raftlib.finetune import completion_logprobs, finetune
from raftlib.generate import encode_prompts, generate_samples
from raftlib.models import is_peft_model, load_base_model, load_policy, load_tokenizer, save_model
from raftlib.records import Prompt, Sample, Scores, Selection
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
    store = RunStore(config.output_dir).lock()
    try:
        if store.has_run():
            saved = RAFTConfig.from_yaml(store.config_path)
            if saved != config:
                changed = _diff(saved.to_dict(), config.to_dict())
                raise RunDirError(
                    f"{store.root} holds a run with a different config ({', '.join(changed)}); "
                    "use another output_dir, or resume it with `python -m raftlib resume`"
                )
            logger.info("%s already holds this run: resuming it", store.root)
        else:
            store.write_config(config.to_yaml())
        with _quiet_transformers():
            return _execute(config, store, reward)
    finally:
        store.unlock()


def resume(run_dir: str | Path, *, reward: WeightedReward | None = None) -> RunResult:
    """Continue a run from its directory after a crash or a kill, losing and duplicating nothing."""
    store = RunStore(run_dir)
    if not store.has_run():
        raise RunDirError(f"{run_dir} has no config.yaml: it is not a raftlib run directory")
    store.lock()
    try:
        with _quiet_transformers():
            return _execute(RAFTConfig.from_yaml(store.config_path), store, reward)
    finally:
        store.unlock()


def _execute(config: RAFTConfig, store: RunStore, reward: WeightedReward | None) -> RunResult:
    from accelerate import Accelerator

    _setup_logging(config.logging.level)
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
        _track(accelerator, row0)
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
        _track(accelerator, row)
        store.mark_done(iteration, "eval", {"metrics": row})
        if config.loop.keep_checkpoints:
            store.prune_checkpoints(config.loop.keep_checkpoints, protect=[iteration])
        logger.info(_summary(row, config.loop.iterations))

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
        extra = _external_samples(policy, tokenizer, prompts, external, config)
        store.save_batch(iteration, "generate", EXTERNAL_BATCH, [s.to_row() for s in extra])
        samples = samples + extra
    metrics = {"time_generate_s": seconds, "generate_tokens_per_s": new_tokens / seconds if seconds else None}
    if completed:
        metrics["generate_resumed_batches"] = len(completed)
    store.mark_done(iteration, "generate", {"metrics": metrics})
    return samples, metrics


def _score(iteration, samples, prompts, reward, config, store, progress):
    started = time.perf_counter()
    completed = {b: _scores_from_rows(rows, reward.names) for b, rows in store.load_batches(iteration, "score").items()}
    scores = score_samples(
        reward, samples, columns_by_prompt(prompts),
        batch_size=config.reward.batch_size, completed=completed, progress=progress,
        on_batch=lambda b, s: store.save_batch(iteration, "score", b, _scores_to_rows(s)),
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
            ref_logprobs, _ = completion_logprobs(reference, _examples(samples), tokenizer.pad_token_id)
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
    rows = _sample_rows(iteration, samples, scores, selection, ref_logprobs, config)
    store.write_table(iteration, "samples", rows)
    store.write_table(iteration, "kept", [r for r in rows if r["kept"]])
    metrics = _selection_metrics(samples, scores, selection, ref_logprobs, reward)
    metrics["time_select_s"] = time.perf_counter() - started
    store.mark_done(iteration, "select", {"metrics": metrics})
    return kept, metrics


def _finetune(iteration, policy, tokenizer, kept, config, store, accelerator, progress):
    policy, stats = finetune(
        policy, _examples(kept), config.training, pad_id=tokenizer.pad_token_id, seed=config.seed,
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
            ref_logprobs, _ = completion_logprobs(reference, _examples(samples), tokenizer.pad_token_id)
    metrics["eval_kl"] = M.kl_estimate([s.logprob for s in samples], ref_logprobs)
    if config.data.reference_column:
        metrics["eval_reference_ppl"] = _reference_perplexity(policy, tokenizer, prompts, config)
    metrics["time_eval_s"] = time.perf_counter() - started
    rows = [
        s.to_row() | {"reward": r, "ref_logprob": lp}
        for s, r, lp in zip(samples, scores.reward, ref_logprobs, strict=True)
    ]
    store.write_table(iteration, "eval_samples", rows)
    return metrics


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


@contextmanager
def reference_model(policy, config: RAFTConfig):
    """pi_0: the LoRA policy with its adapter disabled, or the base weights loaded for the moment."""
    if is_peft_model(policy):
        with policy.disable_adapter():
            yield policy
        return
    reference = load_base_model(config.model, next(policy.parameters()).device)
    try:
        yield reference
    finally:
        del reference
        gc.collect()


def _examples(samples: list[Sample]) -> list[tuple[list[int], list[int]]]:
    return [(s.prompt_token_ids, s.completion_token_ids) for s in samples]


def _external_samples(policy, tokenizer, prompts: list[Prompt], external: dict[int, list[str]], config) -> list[Sample]:
    """Candidates from a file (a teacher's, say) for this iteration's prompts, with their policy logprob."""
    k = config.generation.samples_per_prompt
    chosen = [p for p in dict.fromkeys(prompts) if p.prompt_id in external]
    prompt_ids = encode_prompts(
        tokenizer,
        chosen,
        chat_template=config.generation.chat_template,
        max_prompt_tokens=config.data.max_prompt_tokens,
    )
    samples = []
    for prompt, ids in zip(chosen, prompt_ids, strict=True):
        for j, text in enumerate(external[prompt.prompt_id]):
            completion_ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            samples.append(
                Sample(prompt.prompt_id, k + j, prompt.text, text, ids, completion_ids, 0.0, "eos", "external")
            )
    logprobs, _ = completion_logprobs(policy, _examples(samples), tokenizer.pad_token_id)
    return [replace(s, logprob=lp) for s, lp in zip(samples, logprobs, strict=True)]


def _reference_perplexity(policy, tokenizer, prompts: list[Prompt], config: RAFTConfig) -> float:
    column = config.data.reference_column
    usable = [p for p in prompts if isinstance(p.columns.get(column), str) and p.columns[column]]
    if not usable:
        return float("nan")
    prompt_ids = encode_prompts(
        tokenizer,
        usable,
        chat_template=config.generation.chat_template,
        max_prompt_tokens=config.data.max_prompt_tokens,
    )
    examples = [
        (ids, tokenizer(p.columns[column], add_special_tokens=False)["input_ids"])
        for p, ids in zip(usable, prompt_ids, strict=True)
    ]
    sums, counts = completion_logprobs(policy, examples, tokenizer.pad_token_id)
    return M.perplexity(-sum(sums), sum(counts))


def _scores_to_rows(scores: Scores) -> list[dict[str, Any]]:
    return [
        {"reward": r} | {f"reward/{n}": v[i] for n, v in scores.components.items()} for i, r in enumerate(scores.reward)
    ]


def _scores_from_rows(rows: list[dict[str, Any]], names: list[str]) -> Scores:
    return Scores(reward=[r["reward"] for r in rows], components={n: [r[f"reward/{n}"] for r in rows] for n in names})


def _sample_rows(iteration, samples, scores: Scores, selection: Selection, ref_logprobs, config) -> list[dict]:
    g = config.generation
    settings = {"temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k, "max_new_tokens": g.max_new_tokens}
    rows = []
    for i, sample in enumerate(samples):
        row = sample.to_row() | {"iteration": iteration, "reward": scores.reward[i]}
        row |= {f"reward/{name}": values[i] for name, values in scores.components.items()}
        row |= {"ref_logprob": None if ref_logprobs is None else ref_logprobs[i]}
        row |= {"ranking_key": float(selection.ranking_key[i]), "kept": bool(selection.kept[i])} | settings
        rows.append(row)
    return rows


def _selection_metrics(samples, scores: Scores, selection: Selection, ref_logprobs, reward) -> dict[str, Any]:
    kept_rewards = [r for r, k in zip(scores.reward, selection.kept, strict=True) if k]
    policy_only = [(s, r) for s, r in zip(samples, scores.reward, strict=True) if s.source == "policy"]
    completions = [s.completion for s, _ in policy_only]
    metrics: dict[str, Any] = M.reward_stats([r for _, r in policy_only], "reward")
    metrics |= M.reward_stats(kept_rewards, "kept_reward")
    metrics["best_of_k_reward_mean"] = M.best_of_k_mean(
        [s.prompt_id for s, _ in policy_only], [r for _, r in policy_only]
    )
    for name, values in scores.components.items():
        metrics[f"reward/{name}_mean"] = M.reward_stats(values, "c")["c_mean"]
    metrics |= M.text_metrics(completions, "sample")
    metrics["sample_length_tokens"] = M.completion_length_mean([s.completion_token_count for s, _ in policy_only])
    metrics["sample_eos_fraction"] = float(np.mean([s.finish_reason == "eos" for s, _ in policy_only]))
    metrics["kept_count"] = selection.kept_count
    metrics["invalid_reward_count"] = selection.invalid_count
    metrics["prompts_without_valid_sample"] = selection.prompts_without_valid_sample
    metrics["kept_external_count"] = int(
        sum(k and s.source != "policy" for s, k in zip(samples, selection.kept, strict=True))
    )
    if ref_logprobs is not None:
        metrics["sample_kl"] = M.kl_estimate([s.logprob for s in samples], ref_logprobs)
    return metrics


def _track(accelerator, row: dict[str, Any]) -> None:
    """Send a metrics row to TensorBoard (or whatever tracker accelerate was given)."""
    if accelerator.trackers:
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "iteration"}
        accelerator.log(numbers, step=row["iteration"])


def _summary(row: dict[str, Any], total: int) -> str:
    def fmt(key: str) -> str:
        value = row.get(key)
        return "n/a" if value is None else f"{value:.3f}"

    return (
        f"iter {row['iteration']}/{total} | reward {fmt('reward_mean')} | kept {fmt('kept_reward_mean')} | "
        f"best-of-K {fmt('best_of_k_reward_mean')} | eval {fmt('eval_reward_mean')} | kl {fmt('eval_kl')} | "
        f"distinct-2 {fmt('eval_distinct_2')} | {row['time_iteration_s']:.1f}s"
    )


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return keys


@contextmanager
def _quiet_transformers():
    """transformers' per-load and per-save progress bars would drown the per-iteration summary."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _setup_logging(level: str) -> None:
    """Show the per-iteration summary when nobody configured logging (scripts, notebooks)."""
    logger.setLevel(level)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
