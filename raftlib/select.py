"""Selection: which samples are kept. Pure functions of arrays, unit-tested by hand.

Ranking key (the paper's Eq. 5): key = r - beta * (log pi_theta(y|x) - log pi_0(y|x)). With beta = 0
it is the reward. KL changes the ranking only; the fine-tune loss stays plain cross-entropy.

Ties break deterministically: the lower (prompt_id, sample_index) wins, so the same rewards always keep
the same samples. Samples whose reward or key is None, NaN or +-inf are never kept and are counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from raftlib.records import Selection
from raftlib.sections import SelectionSection


def as_float_array(values: Sequence[float | None]) -> np.ndarray:
    """None -> NaN, so one mask (np.isfinite) marks every unusable value."""
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def kl_ranking_key(
    rewards: Sequence[float | None],
    logprobs: Sequence[float] | None = None,
    ref_logprobs: Sequence[float] | None = None,
    kl_coef: float = 0.0,
) -> np.ndarray:
    """r - kl_coef * (logprob - ref_logprob), elementwise; NaN where the reward is unusable."""
    key = as_float_array(rewards)
    if kl_coef == 0.0:
        return key
    if logprobs is None or ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs the samples' logprobs under the policy and the reference model")
    log_ratio = np.asarray(logprobs, dtype=np.float64) - np.asarray(ref_logprobs, dtype=np.float64)
    return key - kl_coef * log_ratio


def _order(key: np.ndarray, prompt_ids: np.ndarray, sample_indices: np.ndarray) -> np.ndarray:
    """Indices sorted best first: key descending, then prompt_id, then sample_index ascending."""
    return np.lexsort((sample_indices, prompt_ids, -key))


def select_local(
    key: np.ndarray, prompt_ids: np.ndarray, sample_indices: np.ndarray, keep_per_prompt: int = 1
) -> Selection:
    """Best `keep_per_prompt` of each prompt's samples (the paper's default: best of K)."""
    key, prompt_ids, sample_indices = _check(key, prompt_ids, sample_indices)
    valid = np.isfinite(key)
    kept = np.zeros(len(key), dtype=bool)
    taken: dict[int, int] = {}
    for i in _order(np.where(valid, key, -np.inf), prompt_ids, sample_indices):
        if not valid[i]:
            continue
        pid = int(prompt_ids[i])
        if taken.get(pid, 0) < keep_per_prompt:
            kept[i] = True
            taken[pid] = taken.get(pid, 0) + 1
    return _result(kept, key, valid, prompt_ids)


def select_global(key: np.ndarray, prompt_ids: np.ndarray, sample_indices: np.ndarray, fraction: float) -> Selection:
    """Top `fraction` of the whole batch (the paper's global variant, fraction = 1/K).

    The count is round(N * fraction) of all N samples, unusable ones included, so invalid rewards
    shrink the kept set rather than letting worse samples in.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return select_count(key, prompt_ids, sample_indices, math.floor(len(key) * fraction + 0.5))


def select_count(key: np.ndarray, prompt_ids: np.ndarray, sample_indices: np.ndarray, count: int) -> Selection:
    """The `count` best of the batch (fewer when fewer rewards are usable): a control matched in kept count."""
    key, prompt_ids, sample_indices = _check(key, prompt_ids, sample_indices)
    valid = np.isfinite(key)
    order = [i for i in _order(np.where(valid, key, -np.inf), prompt_ids, sample_indices) if valid[i]]
    kept = np.zeros(len(key), dtype=bool)
    kept[order[:count]] = True
    return _result(kept, key, valid, prompt_ids)


def select_threshold(key: np.ndarray, prompt_ids: np.ndarray, threshold: float) -> Selection:
    """Every sample whose key is >= threshold (e.g. all verified-correct answers, as in RAFT++)."""
    key = np.asarray(key, dtype=np.float64)
    prompt_ids = np.asarray(prompt_ids)
    valid = np.isfinite(key)
    kept = valid & (np.where(valid, key, -np.inf) >= threshold)
    return _result(kept, key, valid, prompt_ids)


def select(
    section: SelectionSection,
    key: np.ndarray,
    prompt_ids: np.ndarray,
    sample_indices: np.ndarray,
    *,
    samples_per_prompt: int,
    iteration: int = 1,
) -> Selection:
    """Dispatch on `section.strategy` (a `selection` config section); then keep at most `section.max_kept` of the
    chosen, best key first. `iteration` picks the count of `kept_counts` (strategy count)."""
    strategy, keep_per_prompt, threshold, max_kept = (
        section.strategy,
        section.keep_per_prompt,
        section.threshold,
        section.max_kept,
    )
    count = section.kept_counts[iteration - 1] if strategy == "count" and section.kept_counts else None
    if strategy == "local":
        selection = select_local(key, prompt_ids, sample_indices, keep_per_prompt)
    elif strategy == "global":
        selection = select_global(key, prompt_ids, sample_indices, 1.0 / samples_per_prompt)
    elif strategy == "threshold":
        if threshold is None:
            raise ValueError("threshold selection needs a threshold")
        selection = select_threshold(key, prompt_ids, threshold)
    elif strategy == "count":
        if count is None:
            raise ValueError("count selection needs a count")
        selection = select_count(key, prompt_ids, sample_indices, count)
    else:
        raise ValueError(f"unknown selection strategy {strategy!r}")
    if max_kept is not None:
        selection = cap_kept(selection, prompt_ids, sample_indices, max_kept)
    return selection


def cap_kept(selection: Selection, prompt_ids: np.ndarray, sample_indices: np.ndarray, max_kept: int) -> Selection:
    """Keep only the `max_kept` best of an already kept set (the SD notebook: best of K, then the top 8 of 10)."""
    kept = np.asarray(selection.kept)
    if kept.sum() <= max_kept:
        return selection
    key = np.where(kept, selection.ranking_key, -np.inf)
    order = _order(key, np.asarray(prompt_ids), np.asarray(sample_indices))
    capped = np.zeros_like(kept)
    capped[order[:max_kept]] = True
    return replace(selection, kept=capped)


def _check(key, prompt_ids, sample_indices):
    key = np.asarray(key, dtype=np.float64)
    prompt_ids = np.asarray(prompt_ids)
    sample_indices = np.asarray(sample_indices)
    if not (len(key) == len(prompt_ids) == len(sample_indices)):
        raise ValueError("key, prompt_ids and sample_indices must have the same length")
    return key, prompt_ids, sample_indices


def _result(kept: np.ndarray, key: np.ndarray, valid: np.ndarray, prompt_ids: np.ndarray) -> Selection:
    prompts_with_valid = set(prompt_ids[valid].tolist())
    all_prompts = set(prompt_ids.tolist())
    return Selection(
        kept=kept,
        ranking_key=np.where(valid, key, np.nan),
        invalid_count=int((~valid).sum()),
        prompts_without_valid_sample=len(all_prompts - prompts_with_valid),
    )
