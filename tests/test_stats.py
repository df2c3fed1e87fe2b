"""raftsuite.stats against values computed by hand (t quantiles from the tables), and the coverage at the suite's n
that chose the Student-t interval over the percentile bootstrap of 3-5 seeds."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from raftsuite import report, stats
from raftsuite.stats import Interval

# Two-sided 95 % Student-t quantiles as printed in the tables (df = 2, 4) and the 80 % one (df = 4).
T975_DF2, T975_DF4, T80_DF4 = 4.3027, 2.7764, 0.9410


def test_t_quantiles_of_the_tables_are_scipys():
    # The hand computations below use the tabled values; scipy's agree to their 4 decimals.
    assert st.t.ppf(0.975, 2) == pytest.approx(T975_DF2, abs=5e-5)
    assert st.t.ppf(0.975, 4) == pytest.approx(T975_DF4, abs=5e-5)
    assert st.t.ppf(0.80, 4) == pytest.approx(T80_DF4, abs=5e-5)


# ---- seed-level intervals -----------------------------------------------------------------------------


def test_mean_ci_is_the_student_t_interval_by_hand():
    # [1, 2, 6]: mean 3, sd sqrt((4 + 1 + 9) / 2) = sqrt(7); half-width t(0.975, 2) sqrt(7) / sqrt(3) = 6.572.
    interval = stats.mean_ci([1.0, 2.0, 6.0])
    half = T975_DF2 * math.sqrt(7) / math.sqrt(3)
    assert (interval.mean, interval.n, interval.method) == (3.0, 3, "t")
    assert interval.sd == pytest.approx(math.sqrt(7))
    assert (interval.low, interval.high) == pytest.approx((3 - half, 3 + half), abs=1e-3)
    # Not the seeds' range, which the percentile bootstrap of 3 seeds gave: much wider at n = 3.
    assert interval.low < 1.0 and interval.high > 6.0
    # Five seeds [0, 0, 0, 0, 10]: mean 2, sd sqrt((4 x 4 + 64) / 4) = sqrt(20), df 4.
    five = stats.mean_ci(np.array([0, 0, 0, 0, 10]))
    half = T975_DF4 * math.sqrt(20) / math.sqrt(5)
    assert five.as_tuple() == pytest.approx((2.0, 2 - half, 2 + half), abs=1e-3)
    # And exactly scipy's own t.interval (same numbers, a Series in).
    expected = st.t.interval(0.95, 4, loc=2.0, scale=st.sem([0, 0, 0, 0, 10]))
    assert (five.low, five.high) == pytest.approx(expected, rel=1e-12)
    assert stats.mean_ci(pd.Series([0, 0, 0, 0, 10], index=[4, 3, 2, 1, 0])) == five
    # A lower confidence narrows it with the df-4 quantile for 90 %.
    ninety = stats.mean_ci([0, 0, 0, 0, 10], confidence=0.90)
    assert ninety.high - ninety.mean == pytest.approx(st.t.ppf(0.95, 4) * math.sqrt(20) / math.sqrt(5))


def test_mean_ci_edge_cases():
    one = stats.mean_ci([0.7])
    assert (one.mean, one.n, one.method) == (0.7, 1, "none")
    assert math.isnan(one.low) and math.isnan(one.high) and math.isnan(one.sd)
    assert str(one) == "0.700 [one seed: no interval]" and one.label == "no interval: n = 1"
    assert not one.excludes_zero()
    assert stats.mean_ci([2.0, 2.0, 2.0]) == Interval(2.0, 2.0, 2.0, 3, "t", 0.0)  # every seed agrees: no width
    with pytest.raises(ValueError, match="no values"):
        stats.mean_ci([])
    with pytest.raises(ValueError, match="finite"):
        stats.mean_ci([1.0, float("nan")])


def test_interval_record():
    interval = stats.mean_ci([0.6, 0.8, 0.7])
    assert interval.label == "95 % t-interval, n = 3"
    assert str(interval) == "0.700 [0.452, 0.948]"
    assert Interval(1.2, 1.1, 1.3, 5, "log-t").label == "95 % t-interval of the log ratio, n = 5"
    assert Interval(0.1, 0.0, 0.2, 5, "crossed t").label == "95 % t-interval over seeds x prompts, n = 5"
    assert Interval(0.1, 0.0, 0.2, 12, "bca").label == "95 % BCa bootstrap, n = 12"
    assert Interval(0.3, 0.1, 0.5, 3).excludes_zero() and Interval(-0.3, -0.5, -0.1, 3).excludes_zero()
    assert not Interval(0.3, 0.0, 0.5, 3).excludes_zero()  # touching 0 is not excluding it
    assert not Interval(0.3, -0.1, 0.5, 3).excludes_zero()
    assert stats.format_interval(float("nan"), 0.0, 1.0) == "—"
    assert stats.format_interval(0.12345, 0.1, 0.2, digits=2) == "0.12 [0.10, 0.20]"


def test_interquartile_mean_follows_rliable():
    assert stats.iqm([1, 2, 3]) == 2.0  # int(0.75) = 0 cut from each end: the mean
    assert stats.iqm([1, 2, 3, 10]) == 2.5  # one cut from each end: (2 + 3) / 2
    assert stats.iqm([1, 2, 3, 4, 100]) == 3.0  # the diverged seed does not move it
    assert stats.iqm([1, 2, 3, 4, 100]) != np.median([1, 2, 3, 4, 100, 200])  # a trimmed mean, not the median


def test_prediction_interval_by_hand():
    # One more seed lands within mean +- t sd sqrt(1 + 1/n): [1, 2, 6] -> 3 +- 4.3027 sqrt(7) sqrt(4/3).
    interval = stats.prediction_interval([1.0, 2.0, 6.0])
    half = T975_DF2 * math.sqrt(7) * math.sqrt(4 / 3)
    assert interval.as_tuple() == pytest.approx((3.0, 3 - half, 3 + half), abs=1e-3)
    # sqrt(n + 1) times the mean's interval.
    mean = stats.mean_ci([1.0, 2.0, 6.0])
    assert interval.high - interval.mean == pytest.approx(2 * (mean.high - mean.mean))
    assert math.isnan(stats.prediction_interval([1.0]).low)


def test_paired_difference_pairs_by_seed():
    # differences 2, 3, 1: mean 2, sd 1, half-width t(0.975, 2) / sqrt(3)
    paired = stats.paired_difference([3, 5, 7], [1, 2, 6])
    assert paired.as_tuple() == pytest.approx((2.0, 2 - T975_DF2 / math.sqrt(3), 2 + T975_DF2 / math.sqrt(3)), abs=1e-3)
    assert (paired.n, paired.method, paired.sd) == (3, "t", 1.0)
    # Seeds differ a lot but ours beats the baseline by exactly 1 on each: paired, that is certain; the two
    # seed-level intervals overlap almost entirely.
    assert stats.paired_difference([10, 20, 30], [9, 19, 29]) == Interval(1.0, 1.0, 1.0, 3, "t", 0.0)
    assert stats.mean_ci([10, 20, 30]).low < stats.mean_ci([9, 19, 29]).high
    # Series are aligned by seed, not by position: the baseline below is [1, 2, 6] by seed.
    ours = pd.Series([3.0, 5.0, 7.0], index=[0, 1, 2])
    baseline = pd.Series([6.0, 1.0, 2.0], index=[2, 0, 1])
    assert stats.paired_difference(ours, baseline) == paired
    # An array carries no seeds: paired by position, [3, 5, 7] - [6, 1, 2] = [-3, 4, 5].
    assert stats.paired_difference(ours, baseline.to_numpy()) == stats.mean_ci([-3.0, 4.0, 5.0]) != paired
    with pytest.raises(ValueError, match=r"seeds \[2, 3\] are in only one"):
        stats.paired_difference(ours, pd.Series([1.0, 2.0, 6.0], index=[0, 1, 3]))
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired_difference([1, 2], [1, 2, 3])


def test_ratio_ci_is_a_geometric_mean_with_a_log_t_interval():
    # Every seed twice as slow: ratio 2 exactly, no width.
    assert stats.ratio_ci([2.0, 4.0, 8.0], [1.0, 2.0, 4.0]) == Interval(2.0, 2.0, 2.0, 3, "log-t", 0.0)
    # Ratios 1, 2, 4: logs 0, ln 2, 2 ln 2 -> mean ln 2 (geometric mean 2, the arithmetic mean is 7/3), sd ln 2.
    ratio = stats.ratio_ci([1.0, 4.0, 12.0], [1.0, 2.0, 3.0])
    half = T975_DF2 * math.log(2) / math.sqrt(3)
    assert ratio.mean == pytest.approx(2.0) and ratio.method == "log-t" and ratio.sd == pytest.approx(math.log(2))
    assert (ratio.low, ratio.high) == pytest.approx((2 * math.exp(-half), 2 * math.exp(half)), rel=1e-3)
    assert ratio.low * ratio.high == pytest.approx(ratio.mean**2)  # symmetric on the log scale
    assert ratio.label == "95 % t-interval of the log ratio, n = 3"
    # Series aligned by seed, as for differences.
    ours, baseline = (
        pd.Series([1.0, 4.0, 12.0], index=["a", "b", "c"]),
        pd.Series([3.0, 1.0, 2.0], index=["c", "a", "b"]),
    )
    assert stats.ratio_ci(ours, baseline) == ratio
    with pytest.raises(ValueError, match="positive"):
        stats.ratio_ci([1.0, 0.0], [1.0, 1.0])


# ---- bootstraps ----------------------------------------------------------------------------------------


def test_bca_needs_ten_values():
    with pytest.raises(ValueError, match=r"9 values; a bootstrap needs >= 10 \(use mean_ci\)"):
        stats.bca_mean_ci(np.arange(9.0))
    assert stats.bca_mean_ci([3.0] * 10) == Interval(3.0, 3.0, 3.0, 10, "bca", 0.0)
    values = np.random.default_rng(0).normal(loc=1.0, size=40)
    bca = stats.bca_mean_ci(values)
    t = stats.mean_ci(values)
    assert bca.method == "bca" and bca.n == 40 and bca.low < bca.mean < bca.high
    assert bca.mean == t.mean
    # At n = 40 of normal data the BCa and t-intervals nearly agree (within a fifth of the t half-width).
    half = t.high - t.mean
    assert abs(bca.low - t.low) < 0.2 * half and abs(bca.high - t.high) < 0.2 * half
    assert stats.bca_mean_ci(values) == bca  # a fixed random state


def crossed_frame(differences: np.ndarray) -> pd.DataFrame:
    """Seeds x prompts table of ours - baseline as the long frame crossed_paired_difference reads."""
    seeds, prompts = differences.shape
    rows = [
        {"seed": s, "prompt": f"p{p}", "raft": 1.0 + differences[s, p], "random": 1.0}
        for s in range(seeds)
        for p in range(prompts)
    ]
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # order must not matter


def test_crossed_paired_difference_degenerate_cases():
    # Every (seed, prompt) improves by exactly 0.25: no variance, the interval is the point.
    same = stats.crossed_paired_difference(crossed_frame(np.full((4, 6), 0.25)), "raft", "random")
    assert same.as_tuple() == pytest.approx((0.25, 0.25, 0.25))
    assert (same.n, same.method, same.label) == (4, "crossed t", "95 % t-interval over seeds x prompts, n = 4")
    # Rows equal across prompts, two seeds at 0 and 1: no prompt variance, so it is the seed-level t-interval,
    # 0.5 +- t(0.975, 1) x sd(0, 1) / sqrt(2) = 0.5 +- 12.706 x 0.5.
    two_seeds = stats.crossed_paired_difference(crossed_frame(np.array([[0.0] * 5, [1.0] * 5])), "raft", "random")
    assert two_seeds.as_tuple() == pytest.approx(stats.mean_ci([0.0, 1.0]).as_tuple())
    assert two_seeds.high == pytest.approx(0.5 + 12.7062 * 0.5, rel=1e-4)
    assert two_seeds.sd == pytest.approx(math.sqrt(0.5))  # the sd of the per-seed means
    # One seed: no interval.
    one = stats.crossed_paired_difference(crossed_frame(np.array([[0.1, 0.3]])), "raft", "random")
    assert one.mean == pytest.approx(0.2) and one.method == "none" and math.isnan(one.low)


def test_crossed_paired_difference_carries_the_prompt_variance():
    # Five seeds that agree closely (per-seed means within 0.01) on 20 prompts whose differences vary a lot:
    # the t-interval over per-seed means is narrow, the crossed one adds the prompts' variance and is wider.
    rng = np.random.default_rng(1)
    differences = rng.normal(0.2, 1.0, size=20)[None, :] + rng.normal(0.0, 0.01, size=(5, 1))
    frame = crossed_frame(differences)
    crossed = stats.crossed_paired_difference(frame, "raft", "random")
    per_seed = frame.assign(d=frame["raft"] - frame["random"]).groupby("seed")["d"].mean()
    seed_level = stats.mean_ci(per_seed)
    assert crossed.mean == pytest.approx(seed_level.mean) == pytest.approx(differences.mean())
    assert (crossed.high - crossed.low) > 10 * (seed_level.high - seed_level.low)
    # ~ 2 x t(0.975, 4) x sd(prompts) / sqrt(20): the prompt sampling dominates.
    expected = 2 * 2.776 * differences.mean(axis=0).std(ddof=1) / math.sqrt(20)
    assert (crossed.high - crossed.low) == pytest.approx(expected, rel=0.05)


def test_crossed_interval_is_never_narrower_than_the_seed_level_one():
    # Pure noise: the estimated seed and prompt components are often negative, cut at 0; never narrower.
    rng = np.random.default_rng(3)
    for _ in range(50):
        differences = rng.normal(0.0, 1.0, size=(5, 12))
        frame = crossed_frame(differences)
        crossed = stats.crossed_paired_difference(frame, "raft", "random")
        seed_level = stats.mean_ci(differences.mean(axis=1))
        assert crossed.low <= seed_level.low + 1e-12 and crossed.high >= seed_level.high - 1e-12


@pytest.mark.parametrize(
    ("seed_sd", "prompt_sd", "residual_sd"), [(1.0, 0.0, 1.0), (0.1, 1.0, 0.5), (0.5, 0.5, 2.0), (0.0, 1.0, 0.0)]
)
def test_crossed_interval_holds_its_coverage_at_five_seeds(seed_sd, prompt_sd, residual_sd):
    # The suite's design: 5 seeds x the same 20 prompts, seeds and prompts both random. Whatever dominates the
    # variance, the interval covers the true mean (0) at least 93 % of the time at nominal 95 %.
    rng = np.random.default_rng(0)
    trials, hits = 1_000, 0
    for _ in range(trials):
        values = (
            rng.normal(0, seed_sd, size=(5, 1))
            + rng.normal(0, prompt_sd, size=(1, 20))
            + rng.normal(0, residual_sd, size=(5, 20))
        )
        interval = stats.crossed_paired_difference(crossed_frame(values), "raft", "random")
        hits += interval.low <= 0 <= interval.high
    assert hits / trials >= 0.93


def test_crossed_paired_difference_names_missing_columns_and_refuses_a_non_crossed_design():
    frame = crossed_frame(np.array([[0.0, 1.0], [1.0, 2.0]]))
    with pytest.raises(KeyError, match="no column 'grpo'"):
        stats.crossed_paired_difference(frame, "raft", "grpo")
    with pytest.raises(KeyError, match="no column 'prompt'"):
        stats.crossed_paired_difference(frame.drop(columns="prompt"), "raft", "random")
    # Seed 1 did not score prompt p0: not a crossed design.
    partial = frame[~((frame["seed"] == 1) & (frame["prompt"] == "p0"))]
    with pytest.raises(ValueError, match="every seed must score every prompt"):
        stats.crossed_paired_difference(partial, "raft", "random")


# ---- coverage at the suite's n -------------------------------------------------------------------------


def test_coverage_counts_intervals_that_hold_zero():
    assert stats.coverage(lambda v: Interval(0.0, -math.inf, math.inf, len(v)), n=3, trials=50) == 1.0
    assert stats.coverage(lambda v: Interval(1.5, 1.0, 2.0, len(v)), n=3, trials=50) == 0.0
    assert stats.coverage(lambda v: Interval(math.nan, math.nan, math.nan, len(v)), n=3, trials=50) == 0.0
    # [min, max] of 3 standard-normal values misses 0 when all three fall on one side: 1 - 2 / 8 = 0.75.
    # 20 000 trials: binomial sd 0.003, the margin 0.015 is 5 sd.
    span = stats.coverage(lambda v: Interval(v.mean(), v.min(), v.max(), len(v)), n=3, trials=20_000, seed=1)
    assert span == pytest.approx(0.75, abs=0.015)


def test_percentile_bootstrap_of_three_seeds_is_their_range():
    # Each resample repeats the smallest seed with probability 1/27 = 3.7 % > 2.5 % (likewise the largest),
    # so the 2.5th and 97.5th percentiles of the resample means are the min and the max.
    assert stats.percentile_bootstrap_ci([1.0, 2.0, 6.0]).as_tuple() == pytest.approx((3.0, 1.0, 6.0))
    assert stats.percentile_bootstrap_ci([-0.3, 0.9, 0.2]).as_tuple() == pytest.approx((0.8 / 3, -0.3, 0.9))


@pytest.mark.parametrize("n", [5, 3])
def test_t_interval_holds_its_coverage_at_the_suites_n(n):
    # Standard-normal seeds: the t-interval's true coverage is exactly 95 % at any n >= 2. With 4 000 trials the
    # estimate's binomial sd is sqrt(0.95 x 0.05 / 4000) = 0.0034, so [0.93, 0.97] is +-5.8 sd: a correct
    # interval leaves it with probability < 1e-8 whatever the simulation seed, while a normal (z) interval
    # (about 89 % at n = 5, 81 % at n = 3) or a too-wide one falls outside.
    covered = stats.coverage(stats.mean_ci, n=n, trials=4_000, seed=n)
    assert 0.93 <= covered <= 0.97


def test_percentile_bootstrap_of_three_seeds_undercovers():
    # The old interval: at 3 seeds it is the seeds' [min, max], true coverage 1 - 2 (1/2)^3 = 75 %. It is slow
    # (9 999 resamples per call), so 400 trials: binomial sd sqrt(0.75 x 0.25 / 400) = 0.022, and 0.93 lies
    # 8 sd above 0.75 (never flaky); the +-0.09 window around 75 % is 4 sd.
    covered = stats.coverage(stats.percentile_bootstrap_ci, n=3, trials=400, seed=3)
    assert covered < 0.93
    assert covered == pytest.approx(0.75, abs=0.09)
    # On the same simulated seeds the t-interval holds 95 % (binomial sd 0.011 at 400 trials; 0.91 is 3.7 sd).
    assert stats.coverage(stats.mean_ci, n=3, trials=400, seed=3) > 0.91


# ---- power, tests and verdicts -------------------------------------------------------------------------


def test_detectable_effect_by_hand():
    # (t(0.975, 4) + t(0.80, 4)) x sd / sqrt(n) = (2.7764 + 0.9410) x 0.1 / sqrt(5) = 0.1662
    interval = Interval(0.05, -0.07, 0.17, 5, "t", 0.1)
    assert stats.detectable_effect(interval) == pytest.approx((T975_DF4 + T80_DF4) * 0.1 / math.sqrt(5), abs=1e-4)
    assert stats.detectable_effect(interval) == pytest.approx(0.16625, abs=1e-4)
    # More power or more confidence needs a larger effect; doubling the sd doubles it.
    assert stats.detectable_effect(interval, power=0.9) > stats.detectable_effect(interval)
    assert stats.detectable_effect(Interval(0.05, -0.1, 0.2, 5, "t", 0.2)) == pytest.approx(
        2 * stats.detectable_effect(interval)
    )
    assert math.isnan(stats.detectable_effect(stats.mean_ci([0.4])))
    assert stats.detectable_effect(stats.mean_ci([0.5, 0.5, 0.5])) == 0.0  # every seed agrees


def test_p_value_is_the_one_sample_t_test():
    differences = [0.2, 0.3, 0.1, 0.25, 0.05]
    assert stats.p_value(stats.mean_ci(differences)) == pytest.approx(st.ttest_1samp(differences, 0.0).pvalue)
    ours, baseline = [1.2, 1.5, 1.1, 1.4], [1.0, 1.0, 1.0, 1.0]
    ratio = stats.ratio_ci(ours, baseline)
    assert stats.p_value(ratio) == pytest.approx(st.ttest_1samp(np.log(np.divide(ours, baseline)), 0.0).pvalue)
    assert stats.p_value(stats.paired_difference([2, 3], [1, 2])) == 0.0  # every seed +1: no spread
    assert stats.p_value(stats.paired_difference([2, 3], [2, 3])) == 1.0
    assert math.isnan(stats.p_value(stats.mean_ci([0.4])))


def test_holm_by_hand():
    # Sorted 0.01 (a), 0.03 (c), 0.04 (b): 3 x 0.01 = 0.03; 2 x 0.03 = 0.06; 1 x 0.04 = 0.04 -> 0.06 (monotone).
    adjusted = stats.holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert list(adjusted) == ["a", "c", "b"]  # in the step-down order
    assert stats.holm({"x": 0.5, "y": 0.6}) == {"x": 1.0, "y": 1.0}  # capped at 1
    assert stats.holm({"only": 0.02}) == {"only": 0.02}
    # Holm rejects exactly those a 5 % step-down test rejects: a (0.03) only, not c or b (0.06).
    assert [k for k, p in adjusted.items() if p < 0.05] == ["a"]


def test_holm_interval_widens_to_the_step_level():
    interval = stats.mean_ci([0.2, 0.3, 0.1, 0.25, 0.05])
    first = stats.holm_interval(interval, family_size=3, rank=0)  # level 1 - 0.05 / 3: t(1 - 0.05 / 6, 4)
    half = st.t.ppf(1 - 0.05 / 6, 4) * interval.sd / math.sqrt(5)
    assert (first.low, first.high) == pytest.approx((interval.mean - half, interval.mean + half))
    assert first.mean == interval.mean and first.n == 5 and first.low < interval.low
    last = stats.holm_interval(interval, family_size=3, rank=2)  # the last step tests at 0.05: unchanged
    assert (last.low, last.high) == pytest.approx((interval.low, interval.high))
    one = stats.mean_ci([0.3])
    assert stats.holm_interval(one, 3, 0) is one


def test_verdict_follows_the_interval():
    assert stats.verdict(Interval(0.3, 0.1, 0.5, 3), "up") == stats.REPRODUCES == "reproduces"
    assert stats.verdict(Interval(0.3, 0.1, 0.5, 3), "down") == stats.OPPOSITE == "opposite"
    assert stats.verdict((-0.3, -0.5, -0.1), -1) == "reproduces"
    assert stats.verdict((-0.3, -0.5, -0.1), 1) == "opposite"
    assert stats.verdict((0.2, -0.1, 0.5), 1) == stats.NOT_RESOLVED == "not resolved at this sample size"
    assert stats.verdict((0.2, 0.0, 0.5), 1) == "not resolved at this sample size"  # touching 0 is not excluding
    assert stats.verdict(stats.mean_ci([0.4]), "up") == "not resolved at this sample size"  # one seed
    with pytest.raises(ValueError, match="paper_direction"):
        stats.verdict((0.2, 0.1, 0.5), "rise")
    with pytest.raises(ValueError, match="paper_direction"):
        stats.verdict((0.2, 0.1, 0.5), 0)


def test_verdict_identical_runs():
    # The same runs on both sides: nothing to resolve, whatever the interval says.
    same = stats.paired_difference([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert same == Interval(0.0, 0.0, 0.0, 3, "t", 0.0)
    assert stats.verdict(same, "up", identical=True) == stats.IDENTICAL == "identical runs"
    assert stats.verdict(same, "up") == "not resolved at this sample size"
    assert stats.verdict(Interval(0.3, 0.1, 0.5, 3), "up", identical=True) == "identical runs"
    assert set(stats.VERDICTS) == {"reproduces", "opposite", "not resolved at this sample size", "identical runs"}


def test_verdict_of_a_ratio_tests_against_one():
    # A log-t interval is of a ratio: its null is 1, not 0 (every ratio is above 0).
    faster = Interval(0.8, 0.7, 0.9, 5, "log-t")
    assert stats.verdict(faster, "down") == "reproduces" and stats.verdict(faster, "up") == "opposite"
    holds_one = Interval(1.1, 0.95, 1.2, 5, "log-t")
    assert stats.verdict(holds_one, "up") == "not resolved at this sample size"
    assert stats.verdict(Interval(1.1, 0.95, 1.2, 5, "t"), "up") == "reproduces"  # the same numbers as a difference
    assert stats.verdict(Interval(1.0, 1.0, 1.2, 5, "log-t"), "up") == "not resolved at this sample size"  # touching 1
    # From data: RAFT's time is about half of GRPO's on every seed.
    ratio = stats.ratio_ci([10.0, 11.0, 9.0, 10.5, 9.5], [20.0, 21.0, 19.0, 20.0, 20.0])
    assert ratio.high < 1.0 and stats.verdict(ratio, "down") == "reproduces"


def test_reading_states_the_interval_and_the_detectable_effect():
    rise = stats.paired_difference([0.7, 0.8, 0.75, 0.72, 0.78], [0.5, 0.55, 0.6, 0.52, 0.58])
    assert stats.reading(rise, "up") == f"reproduces: {rise} (95 % t-interval, n = 5)"
    unclear = stats.paired_difference([0.3, 0.5, 0.35], [0.4, 0.3, 0.3])
    text = stats.reading(unclear, "up")
    assert text.startswith(f"not resolved at this sample size: {unclear} (95 % t-interval, n = 3); ")
    assert text.endswith(f"detectable at 80 % power: {stats.detectable_effect(unclear):.3g}")
    assert (
        stats.reading(stats.mean_ci([0.4]), "up")
        == "not resolved at this sample size: 0.400 [one seed: no interval] (no interval: n = 1)"
    )


def test_paper_direction():
    assert stats.paper_direction(2.180, 2.329) == "up" and stats.paper_direction(2.198, 2.143) == "down"
    with pytest.raises(ValueError, match="no direction"):
        stats.paper_direction(2.2, 2.2)


def per_seed_rows() -> pd.DataFrame:
    # K sweep, three seeds; proxy reward rises by 0.2, 0.3, 0.1 from K=8 to K=32 on seeds 0, 1, 2.
    return pd.DataFrame(
        {
            "setting": [8, 8, 8, 16, 16, 16, 32, 32, 32],
            "seed": [0, 1, 2] * 3,
            "proxy_reward": [0.4, 0.5, 0.6, 0.5, 0.6, 0.6, 0.6, 0.8, 0.7],
            "perplexity": [100.0, 110.0, 120.0, 101.0, 111.0, 121.0, 102.0, 112.0, 122.0],
        }
    )


def test_trend_is_last_minus_first_seed_by_seed():
    rise = stats.trend(per_seed_rows(), "setting", "proxy_reward", first=8, last=32)
    # differences 0.2, 0.3, 0.1: mean 0.2, sd 0.1 -> 0.2 +- 4.3027 x 0.1 / sqrt(3) = [-0.048, 0.448]
    half = T975_DF2 * 0.1 / math.sqrt(3)
    assert rise.as_tuple() == pytest.approx((0.2, 0.2 - half, 0.2 + half), abs=1e-4)
    assert rise == stats.paired_difference([0.6, 0.8, 0.7], [0.4, 0.5, 0.6])
    # Every seed rose, yet three seeds do not resolve it at 95 % (the old [min, max] said "reproduces").
    assert stats.verdict(rise, stats.paper_direction(2.180, 2.329)) == "not resolved at this sample size"
    # Perplexity rises by exactly 2 on every seed: resolved.
    assert stats.verdict(stats.trend(per_seed_rows(), "setting", "perplexity", 8, 32), "up") == "reproduces"
    # Seeds are paired by their label, not by row order.
    shuffled = per_seed_rows().sample(frac=1.0, random_state=5)
    assert stats.trend(shuffled, "setting", "proxy_reward", first=8, last=32) == rise
    with pytest.raises(ValueError, match="no rows with setting == 64"):
        stats.trend(per_seed_rows(), "setting", "proxy_reward", first=8, last=64)
    with pytest.raises(KeyError, match="no column 'gold_reward'"):
        stats.trend(per_seed_rows(), "setting", "gold_reward", first=8, last=32)
    with pytest.raises(ValueError, match="more than one row for a seed"):
        stats.trend(pd.concat([per_seed_rows(), per_seed_rows().head(1)]), "setting", "proxy_reward", 8, 32)
    with pytest.raises(ValueError, match=r"seeds \[2\] are in only one"):
        stats.trend(per_seed_rows().drop(index=8), "setting", "proxy_reward", first=8, last=32)


def test_summary_table_and_its_csv_files(tmp_path):
    rows = per_seed_rows().sample(frac=1.0, random_state=3).sort_values("setting", key=lambda s: -s, kind="stable")
    summary = report.save_seed_table(rows, tmp_path, "table5_k", metrics=["proxy_reward", "perplexity"])
    assert list(summary.index) == [32, 16, 8]  # first-seen order, as the caller laid out the sweep
    assert list(summary.columns) == [
        "proxy_reward",
        "proxy_reward_ci95_low",
        "proxy_reward_ci95_high",
        "proxy_reward_iqm",
        "perplexity",
        "perplexity_ci95_low",
        "perplexity_ci95_high",
        "perplexity_iqm",
        "n_seeds",
    ]
    # K=8: 0.4, 0.5, 0.6 -> 0.5 +- 4.3027 x 0.1 / sqrt(3) = [0.2516, 0.7484], the t-interval
    half = T975_DF2 * 0.1 / math.sqrt(3)
    assert summary.loc[8, "proxy_reward"] == pytest.approx(0.5)
    low, high = summary.loc[8, "proxy_reward_ci95_low"], summary.loc[8, "proxy_reward_ci95_high"]
    assert (low, high) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-4)
    assert summary.loc[16, "proxy_reward_iqm"] == pytest.approx(1.7 / 3)
    assert (summary["n_seeds"] == 3).all()
    seeds = pd.read_csv(tmp_path / "table5_k_seeds.csv")
    assert list(seeds.columns) == ["setting", "seed", "proxy_reward", "perplexity"] and len(seeds) == 9
    table = pd.read_csv(tmp_path / "table5_k.csv", index_col=0)
    assert list(table.index) == [32, 16, 8]
    assert table.loc[32, "perplexity_ci95_high"] == 136.8414  # 112 + 4.30265 x 10 / sqrt(3), to 4 decimals
    cells = report.interval_table(summary, ["proxy_reward"])
    assert cells.loc[8, "proxy_reward"] == "0.500 [0.252, 0.748]" and cells["seeds"].tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match=r"more than one row for seed\(s\) \[0\]"):
        stats.summarize(pd.concat([rows, rows.head(1)]), ["proxy_reward"])
    with pytest.raises(KeyError, match="no column 'gold_reward'"):
        stats.summarize(rows, ["gold_reward"])


def test_summary_cuts_a_bounded_metric_s_interval_to_its_range():
    # seeds of a share near 1: the symmetric t-interval reaches past 1, the share cannot
    rows = pd.DataFrame({"setting": ["a"] * 5, "seed": range(5), "share": [1.0, 1.0, 0.62, 0.7, 0.86]})
    plain = stats.mean_ci(rows["share"])
    assert plain.high > 1
    summary = stats.summarize(rows, ["share"], bounds={"share": (0.0, 1.0)})
    assert summary.loc["a", "share_ci95_high"] == 1.0
    assert summary.loc["a", "share_ci95_low"] == pytest.approx(plain.low)  # inside the range: untouched
    assert summary.loc["a", "share"] == pytest.approx(plain.mean)
    with pytest.raises(KeyError, match=r"bounds for \['other'\]"):
        stats.summarize(rows, ["share"], bounds={"other": (0.0, 1.0)})


def test_summary_by_several_keys_with_one_seed_and_missing_values():
    rows = pd.DataFrame(
        {
            "method": ["raft", "raft", "raft", "grpo"],
            "model": ["tiny"] * 4,
            "seed": [0, 1, 2, 0],
            "reward": [0.1, 0.2, 0.3, 0.4],
            "kl": [np.nan, np.nan, np.nan, 1.0],
        }
    )
    summary = stats.summarize(rows, ["reward", "kl"], by=["method", "model"])
    assert list(summary.index) == [("raft", "tiny"), ("grpo", "tiny")]
    grpo = summary.loc[("grpo", "tiny")]
    assert grpo["reward"] == 0.4 and math.isnan(grpo["reward_ci95_low"]) and grpo["n_seeds"] == 1  # no interval
    raft = summary.loc[("raft", "tiny")]
    assert math.isnan(raft["kl"]) and math.isnan(raft["kl_iqm"])  # no value at all: a gap, not an error
    assert raft["reward_ci95_high"] == pytest.approx(0.2 + T975_DF2 * 0.1 / math.sqrt(3), abs=1e-4)


def test_headline_with_an_interval(tmp_path):
    shown = report.write_headline(
        tmp_path,
        "K sweep",
        {"K=32 proxy": stats.mean_ci([0.6, 0.8, 0.7]), "ratio": (0.45, 0.40, 0.51), "one seed": stats.mean_ci([1.0])},
    )
    numbers = json.loads((tmp_path / "headline.json").read_text())["numbers"]
    stored = numbers["K=32 proxy"]
    # 0.7 +- 4.3027 x 0.1 / sqrt(3): [0.452, 0.948], stored with its n and what kind of interval it is
    assert stored["mean"] == pytest.approx(0.7) and stored["n"] == 3 and stored["interval"] == "95 % t-interval, n = 3"
    assert (stored["ci95_low"], stored["ci95_high"]) == pytest.approx((0.7 - 0.24841, 0.7 + 0.24841), abs=1e-4)
    assert numbers["one seed"] == {
        "mean": 1.0,
        "ci95_low": None,
        "ci95_high": None,
        "n": 1,
        "interval": "no interval: n = 1",
    }
    assert numbers["ratio"] == {"mean": 0.45, "ci95_low": 0.40, "ci95_high": 0.51}
    assert report.format_headline_value(numbers["ratio"]) == "0.450 [0.400, 0.510]"
    assert report.format_headline_value(stored) == "0.700 [0.452, 0.948] (95 % t-interval, n = 3)"
    assert shown["K=32 proxy"] == "0.700 [0.452, 0.948] (95 % t-interval, n = 3)"
    assert shown["one seed"] == "1.000 [one seed: no interval] (no interval: n = 1)"
    assert report.format_headline_value(0.25) == "0.250" and report.format_headline_value(7) == "7"
    with pytest.raises(ValueError, match="an interval is"):
        report.write_headline(tmp_path, "bad", {"x": (1.0, 2.0)})


def test_claims_carry_verdict_p_value_and_detectable_effect(tmp_path):
    rise = stats.paired_difference([0.7, 0.8, 0.75, 0.72, 0.78], [0.5, 0.55, 0.6, 0.52, 0.58])
    unclear = stats.paired_difference([0.3, 0.5, 0.35], [0.4, 0.3, 0.3])
    claims = [
        report.Claim("Table 3", "RAFT above random selection", "0.77 -> 2.29", rise, "up", primary=True),
        report.Claim("Table 5", "reward rises with K", "2.18 -> 2.33", unclear, "up"),
        report.Claim("§5", "KL 0.001 changes nothing", "-", stats.mean_ci([0.0, 0.0]), "up", identical=True),
        report.Claim("Table 4", "one seed", "-", stats.mean_ci([0.4]), "up"),
    ]
    table = report.write_claims(tmp_path, claims)
    stored = json.loads((tmp_path / report.CLAIMS_FILE).read_text())
    assert [c["verdict"] for c in stored] == [
        "reproduces",
        "not resolved at this sample size",
        "identical runs",
        "not resolved at this sample size",
    ]
    assert stored[0]["n"] == 5 and stored[0]["interval"] == "95 % t-interval, n = 5" and stored[0]["primary"]
    assert stored[0]["ours"] == str(rise) and stored[0]["detectable_at_80pct_power"] is None
    assert stored[0]["p_value"] == pytest.approx(stats.p_value(rise))
    assert stored[1]["detectable_at_80pct_power"] == pytest.approx(stats.detectable_effect(unclear))
    assert stored[3]["p_value"] is None and stored[3]["detectable_at_80pct_power"] is None  # nan -> null in JSON
    lines = report.claims_markdown(table).splitlines()
    expected = f"- **reproduces** (primary): RAFT above random selection: ours {rise} (95 % t-interval, n = 5)"
    assert lines[0] == expected + "; paper 0.77 -> 2.29"
    assert lines[1].endswith(f"; detectable at 80 % power: {stats.detectable_effect(unclear):.3g}); paper 2.18 -> 2.33")
    assert lines[1].startswith("- **not resolved at this sample size** (exploratory): ")
    assert lines[-1].startswith("Exploratory verdicts carry no multiplicity control")


# ---- for_each_seed -------------------------------------------------------------------------------------


def test_for_each_seed_stacks_rows_and_resumes(tmp_path):
    from raftsuite.seeds import for_each_seed

    calls = []

    def experiment(seed):
        calls.append(seed)
        if seed == 2 and len(calls) == 3:
            raise RuntimeError("killed mid-seed")
        return [{"setting": "K8", "reward": np.float64(0.1 * seed)}, {"setting": "K16", "reward": 0.2 * seed}]

    params = {"iterations": 3}
    with pytest.raises(RuntimeError, match="killed"):
        for_each_seed([0, 1, 2], experiment, tmp_path, params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed_0.json", "seed_1.json"]  # nothing half-written
    rows = for_each_seed([0, 1, 2], experiment, tmp_path, params)
    assert calls == [0, 1, 2, 2]  # the rerun computed only the seed that had not finished
    assert list(rows.columns) == ["seed", "setting", "reward"] and len(rows) == 6
    assert rows["reward"].tolist() == pytest.approx([0.0, 0.0, 0.1, 0.2, 0.2, 0.4])
    fresh = for_each_seed([0, 1, 2], experiment)  # no cache: all computed, the same frame
    pd.testing.assert_frame_equal(rows, fresh)
    assert calls == [0, 1, 2, 2, 0, 1, 2]
    # A seed made with other params is recomputed (never read back stale) and its file replaced.
    for_each_seed([0], experiment, tmp_path, {"iterations": 4})
    assert calls[-1] == 0 and len(calls) == 8
    assert json.loads((tmp_path / "seed_0.json").read_text())["params"] == {"seed": 0, "iterations": 4}
    for_each_seed([1], experiment, tmp_path, params)  # seed 1 still matches: read back
    assert len(calls) == 8
    summary = stats.summarize(rows, ["reward"])
    assert summary.loc["K16", "reward"] == pytest.approx(0.2) and summary.loc["K16", "n_seeds"] == 3
    with pytest.raises(TypeError, match="return a dict, a list of dicts or a DataFrame"):
        for_each_seed([5], lambda seed: 0.5)


def test_seeds_to_detect_is_the_first_seed_count_whose_detectable_effect_reaches_the_effect():
    rng = np.random.default_rng(3)
    seeds = rng.normal(0.1, 0.3, size=5)
    interval = stats.mean_ci(seeds)
    assert stats.sd_from_detectable(stats.detectable_effect(interval), 5) == pytest.approx(interval.sd)

    def detectable(n: int) -> float:
        return stats.detectable_effect(stats.Interval(0.0, math.nan, math.nan, n, "t", interval.sd))

    for effect in (0.05, 0.1, 0.3, 1.0):
        n = stats.seeds_to_detect(effect, interval.sd)
        assert detectable(n) <= effect and (n == 2 or detectable(n - 1) > effect)
    assert stats.seeds_to_detect(-0.1, interval.sd) == stats.seeds_to_detect(0.1, interval.sd)  # either sign
    assert stats.seeds_to_detect(0.0, interval.sd) is None and stats.seeds_to_detect(1e-6, interval.sd) is None
    assert stats.seeds_to_detect(0.1, 0.0) == 2  # no spread: the fewest seeds a t-test can use


def test_the_index_says_how_many_seeds_the_observed_difference_would_take():
    from raftsuite import index

    unclear = stats.mean_ci([-0.3, 0.2, -0.4, 0.1, -0.1])
    detectable = stats.detectable_effect(unclear)
    assert stats.sd_from_detectable(detectable, 5) == pytest.approx(unclear.sd)
    claim = {
        "ours": f"{unclear.mean:.3f} [{unclear.low:.3f}, {unclear.high:.3f}]",
        "n": 5,
        "interval": "95 % t-interval, n = 5",
        "detectable_at_80pct_power": detectable,
    }
    expected = stats.seeds_to_detect(round(unclear.mean, 3), unclear.sd)
    assert index._power_note(claim).endswith(f"; the observed {unclear.mean:.3f} would take about {expected} seeds")
    ratio = stats.ratio_ci([1.0, 2.0, 0.5, 1.5, 0.8], [1.2, 1.5, 1.0, 2.5, 1.0])
    factor = stats.detectable_effect(ratio)
    claim = {
        "ours": f"{ratio.mean:.3f} [{ratio.low:.3f}, {ratio.high:.3f}]",
        "n": 5,
        "interval": "95 % t-interval of the log ratio, n = 5",
        "detectable_at_80pct_power": factor,
    }
    assert stats.sd_from_detectable(factor, 5, log=True) == pytest.approx(ratio.sd)
    seeds = stats.seeds_to_detect(math.log(round(ratio.mean, 3)), ratio.sd)
    assert index._power_note(claim).endswith(f"would take about {seeds} seeds")
    # no seed count where the spread does not shrink with seeds alone, or nothing was observed
    crossed = claim | {"interval": "95 % t-interval over seeds x prompts, n = 5"}
    assert index._power_note(crossed) == f"detectable at 80 % power: {factor:.3g}"
    assert index._power_note(claim | {"ours": "0.000 [0.000, 2.0]"}) == f"detectable at 80 % power: {factor:.3g}"
