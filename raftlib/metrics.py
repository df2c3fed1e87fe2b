"""Metrics the paper reports, as pure functions: reward statistics, diversity, KL estimate, perplexity.

Diversity follows the GEM benchmark definitions the paper used (Table 3):
- distinct-n: distinct n-grams / all n-grams, pooled over every completion (corpus level);
- MSTTR-100: the token stream of all completions cut into consecutive 100-token segments, the mean
  type-token ratio of the full segments (the last, partial segment is dropped).
Tokens are lower-cased words and punctuation marks (regex `\\w+|[^\\w\\s]`), not model tokens, so
numbers are comparable across tokenizers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams across `texts`; NaN when there is no n-gram at all."""
    total = 0
    seen: set[tuple[str, ...]] = set()
    for text in texts:
        tokens = words(text)
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else math.nan


def msttr(texts: Sequence[str], window: int = 100) -> float:
    """Mean segmental type-token ratio; NaN when the texts hold fewer than `window` tokens."""
    stream = [token for text in texts for token in words(text)]
    segments = [stream[i : i + window] for i in range(0, len(stream) - window + 1, window)]
    if not segments:
        return math.nan
    return float(np.mean([len(set(segment)) / window for segment in segments]))


def reward_stats(rewards: Sequence[float | None], prefix: str) -> dict[str, float | int]:
    """mean/std/max/min over usable rewards, plus how many were None or non-finite."""
    values = np.array([np.nan if r is None else r for r in rewards], dtype=np.float64)
    finite = values[np.isfinite(values)]
    stats: dict[str, float | int] = {
        f"{prefix}_count": len(values),
        f"{prefix}_invalid": int(len(values) - len(finite)),
    }
    if len(finite):
        stats.update(
            {
                f"{prefix}_mean": float(finite.mean()),
                f"{prefix}_std": float(finite.std()),
                f"{prefix}_max": float(finite.max()),
                f"{prefix}_min": float(finite.min()),
            }
        )
    else:
        stats.update({f"{prefix}_{k}": math.nan for k in ("mean", "std", "max", "min")})
    return stats


def best_of_k_mean(prompt_ids: Sequence[int], rewards: Sequence[float | None]) -> float:
    """Mean over prompts of the best usable reward among that prompt's samples (best-of-K reward)."""
    best: dict[int, float] = {}
    for pid, reward in zip(prompt_ids, rewards, strict=True):
        if reward is None or not math.isfinite(reward):
            continue
        best[pid] = max(best.get(pid, -math.inf), reward)
    return float(np.mean(list(best.values()))) if best else math.nan


def kl_estimate(logprobs: Sequence[float], ref_logprobs: Sequence[float]) -> float:
    """Monte-Carlo KL(pi_theta || pi_0) per sequence: mean of log pi_theta(y) - log pi_0(y), y ~ pi_theta.

    Unbiased only when y was sampled at temperature 1 without top-k/top-p; otherwise it estimates
    the divergence along the sampling distribution and is labelled so in the docs.
    """
    if len(logprobs) == 0:
        return math.nan
    return float(np.mean(np.asarray(logprobs, dtype=np.float64) - np.asarray(ref_logprobs, dtype=np.float64)))


def perplexity(total_nll: float, token_count: int) -> float:
    """exp(mean token negative log-likelihood)."""
    return math.exp(total_nll / token_count) if token_count else math.nan


def completion_length_mean(token_counts: Sequence[int]) -> float:
    return float(np.mean(token_counts)) if len(token_counts) else math.nan


def text_metrics(completions: Sequence[str], prefix: str) -> dict[str, float]:
    """Diversity and length of a set of completions (the paper's Table 3 columns)."""
    return {
        f"{prefix}_distinct_1": distinct_n(completions, 1),
        f"{prefix}_distinct_2": distinct_n(completions, 2),
        f"{prefix}_msttr_100": msttr(completions, 100),
        f"{prefix}_length_words": float(np.mean([len(words(c)) for c in completions])) if completions else math.nan,
    }


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from n samples of which c are correct (Chen et al. 2021, Eq. 1).

    1 - C(n - c, k) / C(n, k): the chance that k samples drawn without replacement from the n hold at
    least one correct one. Computed as a running product, as in the paper's numpy snippet, to stay exact
    for large n.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_metrics(
    prompt_ids: Sequence[int], rewards: Sequence[float | None], threshold: float, k: int, prefix: str = "eval"
) -> dict[str, float]:
    """Mean over prompts of pass@1 and pass@k; a sample is correct when its reward is >= threshold.

    None, NaN and ±inf rewards count as incorrect (a verifier that cannot parse an answer says None).
    Every prompt must have the same number of samples n >= k.
    """
    correct: dict[int, list[bool]] = {}
    for pid, reward in zip(prompt_ids, rewards, strict=True):
        ok = reward is not None and math.isfinite(reward) and reward >= threshold
        correct.setdefault(int(pid), []).append(ok)
    if not correct:
        return {f"{prefix}_pass_at_1": math.nan, f"{prefix}_pass_at_k": math.nan}
    sizes = {len(v) for v in correct.values()}
    if len(sizes) != 1:
        raise ValueError(f"pass@k needs the same number of samples per prompt, got sizes {sorted(sizes)}")
    return {
        f"{prefix}_pass_at_1": float(np.mean([pass_at_k(len(v), sum(v), 1) for v in correct.values()])),
        f"{prefix}_pass_at_k": float(np.mean([pass_at_k(len(v), sum(v), k) for v in correct.values()])),
    }


def token_entropy_mean(entropy_sums: Sequence[float | None], token_counts: Sequence[int]) -> float:
    """Token-level mean entropy: sum of per-token entropies over all tokens / number of tokens (None skipped)."""
    pairs = [(e, n) for e, n in zip(entropy_sums, token_counts, strict=True) if e is not None]
    tokens = sum(n for _, n in pairs)
    return sum(e for e, _ in pairs) / tokens if tokens else math.nan
