"""The loop's bookkeeping: Parquet rows, metrics rows, log lines, logging setup.

Kept out of loop.py so the loop reads top to bottom; nothing here decides what RAFT does.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any

from raftlib import metrics as M
from raftlib.records import Scores, Selection

logger = logging.getLogger("raftlib")


def scores_to_rows(scores: Scores) -> list[dict[str, Any]]:
    return [
        {"reward": r} | {f"reward/{n}": v[i] for n, v in scores.components.items()} for i, r in enumerate(scores.reward)
    ]


def scores_from_rows(rows: list[dict[str, Any]], names: list[str]) -> Scores:
    return Scores(reward=[r["reward"] for r in rows], components={n: [r[f"reward/{n}"] for r in rows] for n in names})


def sample_rows(iteration, samples, scores: Scores, selection: Selection, ref_logprobs, settings: dict) -> list[dict]:
    """samples.parquet: every sample with its reward, components, ranking key, kept flag and sampling settings."""
    rows = []
    for i, sample in enumerate(samples):
        row = sample.to_row() | {"iteration": iteration, "reward": scores.reward[i]}
        row |= {f"reward/{name}": values[i] for name, values in scores.components.items()}
        row |= {"ref_logprob": None if ref_logprobs is None else ref_logprobs[i]}
        row |= {"ranking_key": float(selection.ranking_key[i]), "kept": bool(selection.kept[i])} | settings
        rows.append(row)
    return rows


def selection_metrics(samples, scores: Scores, selection: Selection, ref_logprobs, sample_metrics) -> dict[str, Any]:
    """The select stage's metrics; `sample_metrics(samples, "sample")` adds the modality's own (diversity...)."""
    kept_rewards = [r for r, k in zip(scores.reward, selection.kept, strict=True) if k]
    policy_only = [(s, r) for s, r in zip(samples, scores.reward, strict=True) if s.source == "policy"]
    metrics: dict[str, Any] = M.reward_stats([r for _, r in policy_only], "reward")
    metrics |= M.reward_stats(kept_rewards, "kept_reward")
    metrics["best_of_k_reward_mean"] = M.best_of_k_mean(
        [s.prompt_id for s, _ in policy_only], [r for _, r in policy_only]
    )
    for name, values in scores.components.items():
        metrics[f"reward/{name}_mean"] = M.reward_stats(values, "c")["c_mean"]
    metrics |= sample_metrics([s for s, _ in policy_only], "sample")
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
    """One log line per iteration; the modality's own measures (KL, distinct-2 or image diversity) when present."""

    def fmt(key: str) -> str:
        value = row.get(key)
        return "n/a" if value is None else f"{value:.3f}"

    parts = [
        f"iter {row['iteration']}/{total}",
        f"reward {fmt('reward_mean')}",
        f"kept {fmt('kept_reward_mean')}",
        f"best-of-K {fmt('best_of_k_reward_mean')}",
        f"eval {fmt('eval_reward_mean')}",
    ]
    for key, label in (("eval_kl", "kl"), ("eval_distinct_2", "distinct-2"), ("eval_diversity", "diversity")):
        if key in row:
            parts.append(f"{label} {fmt(key)}")
    return " | ".join([*parts, f"{row['time_iteration_s']:.1f}s"])


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
        from diffusers.utils import logging as diffusers_logging
    except ImportError:  # diffusers is only needed for diffusion runs
        diffusers_logging = None
    diffusers_was = diffusers_logging is not None and diffusers_logging.is_progress_bar_enabled()
    if diffusers_logging is not None:
        diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        if diffusers_was:
            diffusers_logging.enable_progress_bar()


def setup_logging(level: str) -> None:
    """Show the per-iteration summary when nobody configured logging (scripts, notebooks)."""
    logger.setLevel(level)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
