"""The loop's bookkeeping: Parquet rows, metrics rows, log lines, the reference model, logging setup.

Kept out of loop.py so the loop reads top to bottom; nothing here decides what RAFT does.
"""

from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np

from raftlib import metrics as M
from raftlib.config import RAFTConfig
from raftlib.finetune import completion_logprobs
from raftlib.generate import encode_prompts
from raftlib.models import is_peft_model, load_base_model
from raftlib.records import Prompt, Sample, Scores, Selection

logger = logging.getLogger("raftlib")


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


def examples_of(samples: list[Sample]) -> list[tuple[list[int], list[int]]]:
    return [(s.prompt_token_ids, s.completion_token_ids) for s in samples]


def external_samples(policy, tokenizer, prompts: list[Prompt], external: dict[int, list[str]], config) -> list[Sample]:
    """Candidates from a file (a teacher's, say) for this iteration's prompts, with their policy logprob."""
    k = config.generation.samples_per_prompt
    chosen = list({p.prompt_id: p for p in prompts if p.prompt_id in external}.values())  # each prompt once
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
    logprobs, _ = completion_logprobs(policy, examples_of(samples), tokenizer.pad_token_id)
    return [replace(s, logprob=lp) for s, lp in zip(samples, logprobs, strict=True)]


def scores_to_rows(scores: Scores) -> list[dict[str, Any]]:
    return [
        {"reward": r} | {f"reward/{n}": v[i] for n, v in scores.components.items()} for i, r in enumerate(scores.reward)
    ]


def scores_from_rows(rows: list[dict[str, Any]], names: list[str]) -> Scores:
    return Scores(reward=[r["reward"] for r in rows], components={n: [r[f"reward/{n}"] for r in rows] for n in names})


def sample_rows(iteration, samples, scores: Scores, selection: Selection, ref_logprobs, config) -> list[dict]:
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


def selection_metrics(samples, scores: Scores, selection: Selection, ref_logprobs, reward) -> dict[str, Any]:
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


def track(accelerator, row: dict[str, Any]) -> None:
    """Send a metrics row to TensorBoard (or whatever tracker accelerate was given)."""
    if accelerator.trackers:
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "iteration"}
        accelerator.log(numbers, step=row["iteration"])


def summary_line(row: dict[str, Any], total: int) -> str:
    def fmt(key: str) -> str:
        value = row.get(key)
        return "n/a" if value is None else f"{value:.3f}"

    return (
        f"iter {row['iteration']}/{total} | reward {fmt('reward_mean')} | kept {fmt('kept_reward_mean')} | "
        f"best-of-K {fmt('best_of_k_reward_mean')} | eval {fmt('eval_reward_mean')} | kl {fmt('eval_kl')} | "
        f"distinct-2 {fmt('eval_distinct_2')} | {row['time_iteration_s']:.1f}s"
    )


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return keys


@contextmanager
def quiet_transformers():
    """transformers' per-load and per-save progress bars would drown the per-iteration summary."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def setup_logging(level: str) -> None:
    """Show the per-iteration summary when nobody configured logging (scripts, notebooks)."""
    logger.setLevel(level)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
