"""Uncertainty over seeds: intervals that hold their coverage at the suite's n, paired differences, power, verdicts.

Pure functions (no files, no plots); `report.save_seed_table` writes what `summarize` computes. docs/statistics.md
says why each choice was made; in short:

- **Seed-level means and paired differences: Student-t intervals over seeds** (df = n - 1). Each seed is one
  training run, its value the mean over the same held-out prompts; the t-interval holds its 95 % coverage for
  normal seeds at any n >= 2 (tests/test_stats.py simulates the suite's n). A percentile bootstrap over 3 seeds
  is the seeds' [min, max] and covers about 75 %: it is not used for seeds.
- **Ratios** (RAFT's time over GRPO's): a t-interval of the mean log ratio, exponentiated (a geometric mean).
- **Bootstrap only from n = 10** (BCa), e.g. over prompts; `bca_mean_ci` refuses fewer.
- **Seeds and prompts crossed** (`crossed_paired_difference`): where every seed evaluates the same prompts, the
  per-(seed, prompt) differences form a seeds x prompts table; a two-way random-effects variance adds the prompt
  sampling the seed-level interval leaves out (t, df = seeds - 1). Shown beside the t-interval, never narrower.
- **Power**: `detectable_effect` is the smallest true mean difference a two-sided 5 % paired t-test over these
  seeds detects with 80 % power; every "not resolved" states it.
- **Verdicts**: "reproduces" / "opposite" when the interval excludes 0 on the paper's side / the other side;
  "identical runs" when the two sides are the same runs to the bit (nothing to resolve); else "not resolved at
  this sample size" with the detectable effect. Primary verdicts are Holm-adjusted across the paper's tables
  (`holm`); the rest are exploratory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import pandas as pd
from scipy import stats as _st

CONFIDENCE = 0.95
POWER = 0.80
N_RESAMPLES = 9_999
RANDOM_STATE = 0
MIN_BOOTSTRAP_N = 10
"""A bootstrap needs about this many units before its interval is trustworthy (the percentile interval of 3
seeds is their range)."""

REPRODUCES = "reproduces"
OPPOSITE = "opposite"
NOT_RESOLVED = "not resolved at this sample size"
IDENTICAL = "identical runs"
VERDICTS = (REPRODUCES, OPPOSITE, NOT_RESOLVED, IDENTICAL)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its interval: `n` units (seeds, usually), computed by `method`."""

    mean: float
    low: float
    high: float
    n: int
    method: str = "t"
    """t (Student-t over seeds), log-t (a ratio), bca, crossed t (seeds x prompts), or none (one unit)."""
    sd: float = math.nan
    """The units' standard deviation (for the power of a test of this size)."""

    def __str__(self) -> str:
        return format_interval(self.mean, self.low, self.high)

    @property
    def label(self) -> str:
        """What the interval is, for a table's caption: '95 % t-interval, 5 seeds'."""
        if self.method == "none" or self.n < 2:
            return f"no interval: n = {self.n}"
        kinds = {
            "t": "t-interval",
            "log-t": "t-interval of the log ratio",
            "bca": "BCa bootstrap",
            "crossed t": "t-interval over seeds x prompts",
        }
        return f"95 % {kinds.get(self.method, self.method)}, n = {self.n}"

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.mean, self.low, self.high)

    @property
    def null(self) -> float:
        """No change: 0 for a difference, 1 for a ratio (log-t)."""
        return 1.0 if self.method == "log-t" else 0.0

    def excludes_zero(self) -> bool:
        """The interval excludes no change (0; a ratio's 1)."""
        return self.low > self.null or self.high < self.null


def format_interval(mean: float, low: float, high: float, digits: int = 3) -> str:
    """'0.450 [0.400, 0.510]'; an interval that could not be computed (one seed) shows the mean alone."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return f"{mean:.{digits}f} [one seed: no interval]"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _clean(values: Sequence[float] | np.ndarray | pd.Series, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    if array.size == 0:
        raise ValueError(f"{what}: no values")
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: values must be finite, got {array.tolist()}")
    return array


# ----------------------------------------------------------------------------------------------
# Seed-level intervals
# ----------------------------------------------------------------------------------------------


def mean_ci(values: Sequence[float] | np.ndarray | pd.Series, confidence: float = CONFIDENCE) -> Interval:
    """Mean over seeds with its Student-t interval (df = n - 1). One value: no interval (nan, nan)."""
    array = _clean(values, "mean_ci")
    mean = float(array.mean())
    if array.size == 1:
        return Interval(mean, math.nan, math.nan, 1, "none")
    sd = float(array.std(ddof=1))
    half = float(_st.t.ppf(0.5 + confidence / 2, array.size - 1)) * sd / math.sqrt(array.size)
    return Interval(mean, mean - half, mean + half, array.size, "t", sd)


def _aligned(ours, baseline, what: str) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(ours, pd.Series) and isinstance(baseline, pd.Series):
        missing = set(ours.index) ^ set(baseline.index)
        if missing:
            raise ValueError(f"{what}: seeds {sorted(missing)} are in only one of the two series")
        baseline = baseline.loc[ours.index]
    a, b = _clean(ours, f"{what}(ours)"), _clean(baseline, f"{what}(baseline)")
    if a.shape != b.shape:
        raise ValueError(f"{what}: {a.size} values against {b.size}; pairs need equal lengths")
    return a, b


def paired_difference(ours, baseline, confidence: float = CONFIDENCE) -> Interval:
    """Mean of ours - baseline over seeds paired by position (same seed: same held-out prompts and sampling
    seeds), with the t-interval of the per-seed differences. Series indexed by seed are aligned by seed; a seed
    present in only one is an error, not silently dropped."""
    a, b = _aligned(ours, baseline, "paired_difference")
    return mean_ci(a - b, confidence)


def ratio_ci(ours, baseline, confidence: float = CONFIDENCE) -> Interval:
    """The geometric mean of ours / baseline over seeds, with the t-interval of the mean log ratio
    exponentiated (ratios are skewed; their logs are closer to normal). Values must be positive."""
    a, b = _aligned(ours, baseline, "ratio_ci")
    if (a <= 0).any() or (b <= 0).any():
        raise ValueError("ratio_ci: every value must be positive")
    logs = mean_ci(np.log(a / b), confidence)
    return Interval(math.exp(logs.mean), math.exp(logs.low), math.exp(logs.high), logs.n, "log-t", logs.sd)


def iqm(values: Sequence[float] | np.ndarray | pd.Series) -> float:
    """Interquartile mean (rliable): the mean of the middle 50 %, `trim_mean(x, 0.25)`, a trimmed mean (not
    the median). scipy cuts int(0.25 n) values from each end: with 3 seeds nothing is cut (IQM = mean), with 4 to
    7 the lowest and highest go."""
    return float(_st.trim_mean(_clean(values, "iqm"), 0.25))


def prediction_interval(values, confidence: float = CONFIDENCE) -> Interval:
    """Where one more seed's value lands (not the mean): mean +- t x sd x sqrt(1 + 1/n)."""
    array = _clean(values, "prediction_interval")
    if array.size < 2:
        return Interval(float(array.mean()), math.nan, math.nan, array.size, "none")
    sd = float(array.std(ddof=1))
    half = float(_st.t.ppf(0.5 + confidence / 2, array.size - 1)) * sd * math.sqrt(1 + 1 / array.size)
    mean = float(array.mean())
    return Interval(mean, mean - half, mean + half, array.size, "t prediction", sd)


# ----------------------------------------------------------------------------------------------
# Bootstraps, where there are enough units
# ----------------------------------------------------------------------------------------------


def bca_mean_ci(values, confidence: float = CONFIDENCE, random_state: int = RANDOM_STATE) -> Interval:
    """Mean with a BCa bootstrap interval; at least `MIN_BOOTSTRAP_N` values (use `mean_ci` below that)."""
    array = _clean(values, "bca_mean_ci")
    if array.size < MIN_BOOTSTRAP_N:
        raise ValueError(f"bca_mean_ci: {array.size} values; a bootstrap needs >= {MIN_BOOTSTRAP_N} (use mean_ci)")
    mean = float(array.mean())
    if np.ptp(array) == 0:
        return Interval(mean, mean, mean, array.size, "bca", 0.0)
    ci = _st.bootstrap(
        (array,),
        np.mean,
        n_resamples=N_RESAMPLES,
        confidence_level=confidence,
        method="BCa",
        random_state=np.random.default_rng(random_state),
    ).confidence_interval
    return Interval(mean, float(ci.low), float(ci.high), array.size, "bca", float(array.std(ddof=1)))


def crossed_paired_difference(
    frame: pd.DataFrame, ours: str, baseline: str, confidence: float = CONFIDENCE
) -> Interval:
    """Mean of ours - baseline over a seeds x prompts table (`frame`: columns seed, prompt, ours, baseline; every
    seed scored on the same prompts) with a t-interval whose variance adds the prompt sampling to the seeds'.

    The two-way random-effects model d[s, p] = mu + a[s] + b[p] + e[s, p] gives
    Var(mean) = var_a / S + var_b / P + var_e / (S P), each component estimated from the ANOVA mean squares and cut
    at 0 (var_a = (MS_seeds - MS_residual) / P, var_b = (MS_prompts - MS_residual) / S, var_e = MS_residual). So
    the variance is at least var(seed means) / S and the interval never narrower than the seed-level t-interval.
    df = S - 1, the seeds' (fewer than the prompts': wider than Satterthwaite's). Not a bootstrap: with 5 seeds,
    resampling seeds is the percentile interval of 5 values, which under-covers (tests/test_stats.py). `n` is
    the seed count.
    """
    for column in ("seed", "prompt", ours, baseline):
        if column not in frame:
            raise KeyError(f"crossed_paired_difference: no column {column!r} (columns: {', '.join(frame)})")
    table = (frame[ours] - frame[baseline]).groupby([frame["seed"], frame["prompt"]]).mean().unstack("prompt")
    if table.isna().any().any():
        raise ValueError("crossed_paired_difference: every seed must score every prompt (a crossed design)")
    values = table.to_numpy()  # (seeds, prompts)
    seeds, prompts = values.shape
    mean = float(values.mean())
    if seeds < 2:
        return Interval(mean, math.nan, math.nan, seeds, "none")
    row_means, column_means = values.mean(axis=1), values.mean(axis=0)
    mean_square_seeds = prompts * float(row_means.var(ddof=1))
    if prompts >= 2:
        residual = values - row_means[:, None] - column_means[None, :] + mean
        mean_square_prompts = seeds * float(column_means.var(ddof=1))
        mean_square_residual = float((residual**2).sum()) / ((seeds - 1) * (prompts - 1))
    else:  # one prompt: the seeds' variance is all there is
        mean_square_prompts = mean_square_residual = 0.0
    seed_component = max(0.0, (mean_square_seeds - mean_square_residual) / prompts)
    prompt_component = max(0.0, (mean_square_prompts - mean_square_residual) / seeds)
    variance = seed_component / seeds + prompt_component / prompts + mean_square_residual / (seeds * prompts)
    half = float(_st.t.ppf(0.5 + confidence / 2, seeds - 1)) * math.sqrt(variance)
    return Interval(mean, mean - half, mean + half, seeds, "crossed t", float(row_means.std(ddof=1)))


def crossed_between(
    per_prompt: pd.DataFrame | None, ours: str, baseline: str, metric: str, by: str = "method"
) -> Interval | None:
    """`crossed_paired_difference` of two rows' labels of a long per-prompt table (columns seed, prompt, `by`,
    `metric`: the hh and ablations notebooks' per-prompt Parquet), over the (seed, prompt) cells both scored; None
    where the table lacks either side or the metric."""
    if per_prompt is None or metric not in per_prompt or per_prompt[metric].isna().all():
        return None
    rows = per_prompt[per_prompt[by].isin([ours, baseline])]
    wide = rows.pivot_table(index=["seed", "prompt"], columns=by, values=metric).reset_index()
    if not {ours, baseline} <= set(wide):
        return None
    both = wide.dropna(subset=[ours, baseline])
    return crossed_paired_difference(both, ours, baseline) if len(both) else None


def percentile_bootstrap_ci(values, confidence: float = CONFIDENCE, random_state: int = RANDOM_STATE) -> Interval:
    """The percentile bootstrap the suite used over seeds before (kept for the coverage test that retires it:
    at 3 seeds it is the seeds' [min, max])."""
    array = _clean(values, "percentile_bootstrap_ci")
    if np.ptp(array) == 0:
        return Interval(float(array.mean()), float(array[0]), float(array[0]), array.size, "percentile")
    ci = _st.bootstrap(
        (array,),
        np.mean,
        n_resamples=N_RESAMPLES,
        confidence_level=confidence,
        method="percentile",
        random_state=np.random.default_rng(random_state),
    ).confidence_interval
    return Interval(float(array.mean()), float(ci.low), float(ci.high), array.size, "percentile")


def coverage(interval, n: int, trials: int = 2_000, seed: int = 0) -> float:
    """Share of `trials` simulated samples of n standard-normal seeds whose `interval(values)` holds 0."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(trials):
        result = interval(rng.standard_normal(n))
        hits += result.low <= 0 <= result.high
    return hits / trials


# ----------------------------------------------------------------------------------------------
# Power, tests and verdicts
# ----------------------------------------------------------------------------------------------


def detectable_effect(interval: Interval, power: float = POWER, confidence: float = CONFIDENCE) -> float:
    """The smallest true mean difference a two-sided paired t-test at 1 - confidence over `interval.n` seeds with
    their spread `interval.sd` detects with probability `power`: (t_{1-a/2} + t_{power}) x sd / sqrt(n), df n-1
    (the usual normal-approximation formula with t quantiles). NaN below 2 seeds; 0 when every seed agrees. A
    ratio (log-t) gives the detectable ratio factor exp(effect on the log scale): 1.4 means a 40 % change."""
    if interval.n < 2 or math.isnan(interval.sd):
        return math.nan
    df = interval.n - 1
    effect = (_st.t.ppf(0.5 + confidence / 2, df) + _st.t.ppf(power, df)) * interval.sd / math.sqrt(interval.n)
    return math.exp(effect) if interval.method == "log-t" else effect


def sd_from_detectable(
    detectable: float, n: int, *, log: bool = False, power: float = POWER, confidence: float = CONFIDENCE
) -> float:
    """The seeds' standard deviation behind `detectable_effect`'s number for n seeds (`log`: a ratio factor,
    whose spread is on the log scale): the same formula solved for sd."""
    if n < 2:
        return math.nan
    effect = math.log(detectable) if log else detectable
    return effect * math.sqrt(n) / float(_st.t.ppf(0.5 + confidence / 2, n - 1) + _st.t.ppf(power, n - 1))


SEEDS_LIMIT = 10_000
"""`seeds_to_detect` gives up beyond this many seeds (None)."""


def seeds_to_detect(effect: float, sd: float, power: float = POWER, confidence: float = CONFIDENCE) -> int | None:
    """The fewest seeds (at least 2) whose paired t-test at 1 - confidence detects a true mean difference `effect`
    with probability `power`, given the seeds' spread `sd`: `detectable_effect` solved for n. It falls as n grows,
    so a doubling search then bisection finds the first n where it reaches |effect|. None for no effect, no spread
    known, or more than `SEEDS_LIMIT` seeds. Read it as "an effect this large would take about N seeds", not as a
    promise: sd is itself estimated from the few seeds run."""
    effect = abs(effect)
    if not (math.isfinite(effect) and math.isfinite(sd)) or effect == 0:
        return None

    def detected(n: int) -> bool:
        df = n - 1
        return (_st.t.ppf(0.5 + confidence / 2, df) + _st.t.ppf(power, df)) * sd / math.sqrt(n) <= effect

    high = 2
    while not detected(high):
        if high >= SEEDS_LIMIT:
            return None
        high = min(2 * high, SEEDS_LIMIT)
    low = max(2, high // 2)
    while low < high:  # the first n in [low, high] that detects
        middle = (low + high) // 2
        low, high = (low, middle) if detected(middle) else (middle + 1, high)
    return high


def p_value(interval: Interval) -> float:
    """Two-sided p-value of the t-test of mean = 0 behind a t-interval (log-t: of log ratio = 0)."""
    if interval.n < 2 or math.isnan(interval.sd):
        return math.nan
    center = math.log(interval.mean) if interval.method == "log-t" else interval.mean
    if interval.sd == 0:
        return 0.0 if center != 0 else 1.0
    statistic = center / (interval.sd / math.sqrt(interval.n))
    return float(2 * _st.t.sf(abs(statistic), interval.n - 1))


def holm(p_values: Mapping[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (step-down; family-wise error held at the level compared against)."""
    order = sorted(p_values, key=lambda k: p_values[k])
    adjusted, running = {}, 0.0
    m = len(order)
    for rank, key in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[key]))
        adjusted[key] = running
    return adjusted


def holm_interval(interval: Interval, family_size: int, rank: int) -> Interval:
    """The t-interval at the confidence the Holm step of `rank` (0-based, by p-value) uses in a family."""
    level = 1 - (1 - CONFIDENCE) / max(1, family_size - rank)
    if interval.n < 2:
        return interval
    half = float(_st.t.ppf(0.5 + level / 2, interval.n - 1)) * interval.sd / math.sqrt(interval.n)
    if interval.method == "log-t":  # sd is that of the log ratios: widen on the log scale
        center = math.log(interval.mean)
        return replace(interval, low=math.exp(center - half), high=math.exp(center + half))
    return replace(interval, low=interval.mean - half, high=interval.mean + half)


Direction = Literal["up", "down"] | int


def verdict(
    interval: Interval | tuple[float, float, float], paper_direction: Direction, identical: bool = False
) -> str:
    """What the interval of a change (a paired difference, last-minus-first along a sweep, ours - baseline) says
    about the paper's direction: "reproduces" if it excludes 0 on the paper's side (a ratio: 1), "opposite" if on
    the other side, "identical runs" when `identical` (the two sides are the same runs), else "not resolved at this
    sample size" (it holds 0, touching included, or could not be computed).

    `paper_direction`: "up" / +1 (the paper's value rises) or "down" / -1.
    """
    sign = {"up": 1, "down": -1, 1: 1, -1: -1}.get(paper_direction)  # type: ignore[arg-type]
    if sign is None:
        raise ValueError(f"verdict: paper_direction must be 'up', 'down', 1 or -1, got {paper_direction!r}")
    if identical:
        return IDENTICAL
    low, high = (interval.low, interval.high) if isinstance(interval, Interval) else tuple(interval)[1:3]
    null = 1.0 if isinstance(interval, Interval) and interval.method == "log-t" else 0.0
    if math.isnan(low) or math.isnan(high) or low <= null <= high:
        return NOT_RESOLVED
    return REPRODUCES if (low > null) == (sign > 0) else OPPOSITE


def reading(interval: Interval, paper_direction: Direction, identical: bool = False, digits: int = 3) -> str:
    """The verdict with what it rests on: 'reproduces: +0.35 [0.10, 0.54] (95 % t-interval, n = 5)'; a "not
    resolved" adds the effect the seeds could have detected."""
    word = verdict(interval, paper_direction, identical)
    text = f"{word}: {format_interval(interval.mean, interval.low, interval.high, digits)} ({interval.label})"
    if word == NOT_RESOLVED and interval.n > 1:
        text += f"; detectable at 80 % power: {detectable_effect(interval):.{digits}g}"
    return text


def paper_direction(first: float, last: float) -> Literal["up", "down"]:
    """The direction of a paper's trend from its first and last reported values (a tie is an error: a flat
    trend is not a direction a difference can reproduce)."""
    if first == last:
        raise ValueError(f"paper_direction: the paper's first and last values are equal ({first}); no direction")
    return "up" if last > first else "down"


def trend(rows: pd.DataFrame, setting: str, metric: str, first, last, seed: str = "seed") -> Interval:
    """Paired difference last-minus-first along a sweep, seed by seed (the same seed's runs at the two ends share
    prompts and sampling seeds). `rows` holds one row per (setting, seed)."""
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

    return paired_difference(at(last), at(first))


def summarize(
    rows: pd.DataFrame,
    metrics: Sequence[str],
    by: str | Sequence[str] = "setting",
    seed: str = "seed",
    bounds: Mapping[str, tuple[float, float]] | None = None,
) -> pd.DataFrame:
    """Per-seed rows -> one row per setting: for each metric M the mean as `M`, its 95 % t-interval as
    `M_ci95_low` / `M_ci95_high` and its interquartile mean `M_iqm`; then `n_seeds`. Settings keep their
    first-seen order (a sweep's order), not sorted.

    `bounds` names metrics that cannot leave a range (a share: (0, 1)); their intervals are cut to it. A
    t-interval is symmetric and can reach past a bound the mean cannot cross (a share's 1.06); cutting it there
    drops only values the mean cannot take, so the interval covers as often as before."""
    bounds = dict(bounds or {})
    unknown = sorted(set(bounds) - set(metrics))
    if unknown:
        raise KeyError(f"summarize: bounds for {unknown} name no metric of {list(metrics)}")
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
                names = [metric, f"{metric}_ci95_low", f"{metric}_ci95_high", f"{metric}_iqm"]
                record |= dict.fromkeys(names, math.nan)
                continue
            interval = mean_ci(values)
            floor, ceiling = bounds.get(metric, (-math.inf, math.inf))
            record |= {
                metric: interval.mean,
                f"{metric}_ci95_low": max(interval.low, floor),
                f"{metric}_ci95_high": min(interval.high, ceiling),
                f"{metric}_iqm": iqm(values),
            }
        record["n_seeds"] = int(group[seed].nunique())
        out.append(record)
    return pd.DataFrame(out).set_index(keys if len(keys) > 1 else keys[0])
