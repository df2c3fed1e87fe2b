"""Uncertainty over seeds: means with 95 % bootstrap intervals, paired differences, verdicts from intervals.

Pure functions (no files, no plots); `report.save_seed_table` writes what `summarize` computes.

Which unit to resample (say it beside every table):

- **seeds** (`mean_ci`, `paired_difference`): each seed is one training run, its value the mean over the
  held-out prompts. Right for the question the suite asks — "what would another training run give?" — and
  for the cross-machine question (a fresh run elsewhere differs in training arithmetic, like another
  seed does). Prompts stay fixed: the interval says nothing about other prompts.
- **prompts clustered by seed** (`clustered_mean_ci`, `clustered_paired_difference`): the observations are
  per-prompt scores under each seed's model. Prompts under one model are not independent (they share its
  weights), so a bootstrap over all prompts pooled would count seeds x prompts independent units and give
  intervals far too narrow. The two-stage bootstrap resamples seeds, then prompts within each drawn seed:
  it keeps the seed-to-seed variance and adds the held-out prompt sampling variance the seed-level
  interval leaves out. Right when the claim is about the prompt distribution too, or when a table's seeds
  are few and its prompts many.

Method: the percentile bootstrap (`scipy.stats.bootstrap(method="percentile")`), 9,999 resamples, a fixed
random state, so every table is reproducible to the last digit. Not BCa: with 3-5 seeds BCa's acceleration
comes from 3-5 leave-one-out means and its bias correction from a lumpy bootstrap distribution (3 values
have only 10 distinct resample means), so its corrections are noise; the percentile interval stays inside
the data's range and is what rliable reports. Be honest about small n: with 3 seeds each resample has a
1/27 chance of repeating the smallest value, more than 2.5 %, so the 95 % percentile interval is exactly
[min, max] of the seeds, which covers the true mean only about 75 % of the time (1 - 2 x 1/2^3 for a
symmetric spread). A verdict at n = 3 is weaker than its "95 %" says; `Interval.n` travels with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats as _st

CONFIDENCE = 0.95
N_RESAMPLES = 9_999
RANDOM_STATE = 0

REPRODUCES = "reproduces"
OPPOSITE = "opposite"
NOT_RESOLVED = "not resolved at this sample size"


@dataclass(frozen=True)
class Interval:
    """A point estimate with its 95 % interval; `n` is the number of resampled units (seeds, usually)."""

    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return format_interval(self.mean, self.low, self.high)

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.mean, self.low, self.high)

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def format_interval(mean: float, low: float, high: float, digits: int = 3) -> str:
    """'0.450 [0.400, 0.510]'; an interval that could not be computed (one seed) shows the mean alone."""
    if math.isnan(low) or math.isnan(high):
        return f"{mean:.{digits}f} [no interval: one seed]"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _clean(values: Sequence[float] | np.ndarray | pd.Series, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    if array.size == 0:
        raise ValueError(f"{what}: no values")
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: values must be finite, got {array.tolist()}")
    return array


def _bootstrap(data: tuple[np.ndarray, ...], statistic, paired: bool, confidence: float, random_state: int):
    return _st.bootstrap(
        data,
        statistic,
        n_resamples=N_RESAMPLES,
        paired=paired,
        vectorized=True,
        confidence_level=confidence,
        method="percentile",
        random_state=np.random.default_rng(random_state),
    ).confidence_interval


def mean_ci(
    values: Sequence[float] | np.ndarray | pd.Series, confidence: float = CONFIDENCE, random_state: int = RANDOM_STATE
) -> Interval:
    """Mean over seeds with its percentile-bootstrap interval. One value: the interval is (nan, nan)."""
    array = _clean(values, "mean_ci")
    mean = float(array.mean())
    if array.size == 1:
        return Interval(mean, math.nan, math.nan, 1)
    if np.ptp(array) == 0:  # every seed agrees: scipy would warn of a degenerate distribution
        return Interval(mean, mean, mean, array.size)
    ci = _bootstrap((array,), lambda x, axis: x.mean(axis=axis), False, confidence, random_state)
    return Interval(mean, float(ci.low), float(ci.high), array.size)


def iqm(values: Sequence[float] | np.ndarray | pd.Series) -> float:
    """Interquartile mean (rliable): the mean of the middle 50 %, `trim_mean(x, 0.25)`.

    scipy cuts int(0.25 n) values from each end: with 3 seeds nothing is cut (IQM = mean), with 4 or 5 the
    lowest and highest go. It resists one diverged seed better than the mean and is less noisy than the median.
    """
    return float(_st.trim_mean(_clean(values, "iqm"), 0.25))


def paired_difference(
    ours: Sequence[float] | np.ndarray | pd.Series,
    baseline: Sequence[float] | np.ndarray | pd.Series,
    confidence: float = CONFIDENCE,
    random_state: int = RANDOM_STATE,
) -> Interval:
    """Mean of ours - baseline over units paired by position (same seed: same held-out prompts and sampling
    seeds), with the bootstrap interval of the per-unit differences. Pass Series indexed by seed to have
    them aligned by seed; a seed present in only one is an error, not silently dropped."""
    if isinstance(ours, pd.Series) and isinstance(baseline, pd.Series):
        missing = set(ours.index) ^ set(baseline.index)
        if missing:
            raise ValueError(f"paired_difference: seeds {sorted(missing)} are in only one of the two series")
        baseline = baseline.loc[ours.index]
    a, b = _clean(ours, "paired_difference(ours)"), _clean(baseline, "paired_difference(baseline)")
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: {a.size} values against {b.size}; pairs need equal lengths")
    return mean_ci(a - b, confidence, random_state)


def clustered_mean_ci(
    values: Sequence[float] | np.ndarray | pd.Series,
    clusters: Sequence | np.ndarray | pd.Series,
    confidence: float = CONFIDENCE,
    random_state: int = RANDOM_STATE,
) -> Interval:
    """Mean over prompts grouped by seed (cluster), with a two-stage percentile bootstrap: draw seeds with
    replacement, then each drawn seed's prompts with replacement; the statistic is the mean of the per-seed
    means (each seed weighs the same, as in the seed-level table). See the module docstring for when."""
    array = _clean(values, "clustered_mean_ci")
    labels = np.asarray(clusters).ravel()
    if labels.shape != array.shape:
        raise ValueError(f"clustered_mean_ci: {array.size} values against {labels.size} cluster labels")
    groups = [array[labels == label] for label in pd.unique(labels)]
    mean = float(np.mean([g.mean() for g in groups]))
    if len(groups) == 1 and groups[0].size == 1:
        return Interval(mean, math.nan, math.nan, 1)
    rng = np.random.default_rng(random_state)
    n = len(groups)
    drawn = rng.integers(0, n, size=(N_RESAMPLES, n))  # (B, seeds): stage one
    # Stage two, one seed at a time: for every place that seed was drawn, the mean of a fresh resample
    # of its prompts.
    inner = np.empty((N_RESAMPLES, n))
    for index, group in enumerate(groups):
        where = drawn == index
        picks = rng.integers(0, group.size, size=(int(where.sum()), group.size))
        inner[where] = group[picks].mean(axis=1)
    estimates = inner.mean(axis=1)  # (B,)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(estimates, [alpha, 1 - alpha])
    return Interval(mean, float(low), float(high), n)


def clustered_paired_difference(
    frame: pd.DataFrame,
    ours: str,
    baseline: str,
    cluster: str = "seed",
    confidence: float = CONFIDENCE,
    random_state: int = RANDOM_STATE,
) -> Interval:
    """Paired difference per row (one prompt under one seed, both methods scored on it), clustered by seed."""
    for column in (ours, baseline, cluster):
        if column not in frame:
            raise KeyError(f"clustered_paired_difference: no column {column!r} (columns: {', '.join(frame)})")
    return clustered_mean_ci(frame[ours] - frame[baseline], frame[cluster], confidence, random_state)


def probability_of_improvement(
    ours: Sequence[float] | np.ndarray | pd.Series,
    baseline: Sequence[float] | np.ndarray | pd.Series,
    confidence: float = CONFIDENCE,
    random_state: int = RANDOM_STATE,
) -> Interval:
    """P(X > Y) + P(X = Y) / 2 for a run X of ours and a run Y of the baseline (rliable; the Mann-Whitney U
    over n x m), with an interval from resampling each side's seeds independently. Above 0.5: ours tends
    to win. It reads the runs as unpaired; use `paired_difference` when seeds are paired."""
    x, y = _clean(ours, "probability_of_improvement(ours)"), _clean(baseline, "probability_of_improvement(baseline)")

    def statistic(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        wins = (a[..., :, None] > b[..., None, :]).mean(axis=(-1, -2))
        ties = (a[..., :, None] == b[..., None, :]).mean(axis=(-1, -2))
        return wins + 0.5 * ties

    point = float(statistic(x, y))
    if x.size == 1 and y.size == 1:
        return Interval(point, math.nan, math.nan, 1)
    ci = _bootstrap((x, y), statistic, False, confidence, random_state)
    return Interval(point, float(ci.low), float(ci.high), min(x.size, y.size))


Direction = Literal["up", "down"] | int


def verdict(interval: Interval | tuple[float, float, float], paper_direction: Direction) -> str:
    """What the interval of a change (a paired difference, last-minus-first along a sweep, ours - baseline)
    says about the paper's direction: "reproduces" if it excludes 0 on the paper's side, "opposite" if it
    excludes 0 on the other side, "not resolved at this sample size" if it holds 0 (or could not be computed).

    `paper_direction`: "up" / +1 (the paper's value rises) or "down" / -1.
    """
    sign = {"up": 1, "down": -1, 1: 1, -1: -1}.get(paper_direction)  # type: ignore[arg-type]
    if sign is None:
        raise ValueError(f"verdict: paper_direction must be 'up', 'down', 1 or -1, got {paper_direction!r}")
    low, high = (interval.low, interval.high) if isinstance(interval, Interval) else tuple(interval)[1:3]
    if math.isnan(low) or math.isnan(high) or low <= 0 <= high:
        return NOT_RESOLVED
    return REPRODUCES if (low > 0) == (sign > 0) else OPPOSITE


def paper_direction(first: float, last: float) -> Literal["up", "down"]:
    """The direction of a paper's trend from its first and last reported values (a tie is an error: a flat
    trend is not a direction a difference can reproduce)."""
    if first == last:
        raise ValueError(f"paper_direction: the paper's first and last values are equal ({first}); no direction")
    return "up" if last > first else "down"


def trend(
    rows: pd.DataFrame, setting: str, metric: str, first, last, seed: str = "seed", random_state: int = RANDOM_STATE
) -> Interval:
    """Paired difference last-minus-first along a sweep, seed by seed (the same seed's runs at the two ends
    share prompts and sampling seeds). `rows` holds one row per (setting, seed)."""
    for column in (setting, metric, seed):
        if column not in rows:
            raise KeyError(f"trend: no column {column!r} (columns: {', '.join(rows)})")

    def at(value) -> pd.Series:
        chosen = rows[rows[setting] == value]
        if chosen.empty:
            raise ValueError(f"trend: no rows with {setting} == {value!r} (values: {sorted(rows[setting].unique())})")
        if chosen[seed].duplicated().any():
            raise ValueError(f"trend: {setting} == {value!r} has more than one row for a seed")
        return chosen.set_index(seed)[metric]

    return paired_difference(at(last), at(first), random_state=random_state)


def summarize(
    rows: pd.DataFrame,
    metrics: Sequence[str],
    by: str | Sequence[str] = "setting",
    seed: str = "seed",
    random_state: int = RANDOM_STATE,
) -> pd.DataFrame:
    """Per-seed rows -> one row per setting: for each metric M the mean as `M`, its interval as
    `M_ci95_low` / `M_ci95_high` and its interquartile mean `M_iqm`; then `n_seeds`. Settings keep their
    first-seen order (a sweep's order), not sorted."""
    keys = [by] if isinstance(by, str) else list(by)
    for column in [*keys, seed, *metrics]:
        if column not in rows:
            raise KeyError(f"summarize: no column {column!r} (columns: {', '.join(rows)})")
    out = []
    for key, group in rows.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)  # pandas gives a tuple for a list of keys
        record = dict(zip(keys, key, strict=True))
        if group[seed].duplicated().any():
            repeated = sorted(group[seed][group[seed].duplicated()].unique().tolist())
            raise ValueError(f"summarize: setting {record} has more than one row for seed(s) {repeated}")
        for metric in metrics:
            values = group[metric].dropna()
            if values.empty:
                record |= dict.fromkeys(
                    [metric, f"{metric}_ci95_low", f"{metric}_ci95_high", f"{metric}_iqm"], math.nan
                )
                continue
            interval = mean_ci(values, random_state=random_state)
            record |= {
                metric: interval.mean,
                f"{metric}_ci95_low": interval.low,
                f"{metric}_ci95_high": interval.high,
                f"{metric}_iqm": iqm(values),
            }
        record["n_seeds"] = int(group[seed].nunique())
        out.append(record)
    return pd.DataFrame(out).set_index(keys if len(keys) > 1 else keys[0])
