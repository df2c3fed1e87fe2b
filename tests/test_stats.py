"""raftsuite.stats against values computed by hand (the bootstrap distribution of a few values is enumerable)."""

import math

import numpy as np
import pandas as pd
import pytest

from raftsuite import report, stats
from raftsuite.stats import Interval


def test_three_seeds_give_their_range():
    # Each resample repeats the smallest value with probability 1/27 = 3.7 % > 2.5 % (likewise the largest),
    # so the 2.5th and 97.5th percentiles of the resample means are min and max.
    assert stats.mean_ci([1.0, 2.0, 6.0]) == Interval(3.0, 1.0, 6.0, 3)
    # Two seeds: resample means 0 (1/4), 2 (1/2), 4 (1/4).
    assert stats.mean_ci([0.0, 4.0]) == Interval(2.0, 0.0, 4.0, 2)


def test_five_seeds_match_the_enumerated_bootstrap():
    # [0, 0, 0, 0, 10]: a resample mean is 2k with k ~ Binomial(5, 1/5); P(k <= 2) = 0.942, P(k <= 3) = 0.993,
    # so the 97.5th percentile is 2 x 3 = 6, and P(k = 0) = 0.328 puts the 2.5th at 0.
    assert stats.mean_ci([0, 0, 0, 0, 10]) == Interval(2.0, 0.0, 6.0, 5)


def test_edge_cases_are_sane_and_deterministic():
    one = stats.mean_ci([0.7])
    assert one.mean == 0.7 and math.isnan(one.low) and math.isnan(one.high) and one.n == 1
    assert stats.mean_ci([2.0, 2.0, 2.0]) == Interval(2.0, 2.0, 2.0, 3)
    values = np.random.default_rng(1).normal(size=8)
    assert stats.mean_ci(values) == stats.mean_ci(values)  # the fixed random state
    with pytest.raises(ValueError, match="no values"):
        stats.mean_ci([])
    with pytest.raises(ValueError, match="finite"):
        stats.mean_ci([1.0, float("nan")])


def test_interquartile_mean_follows_rliable():
    assert stats.iqm([1, 2, 3]) == 2.0  # int(0.75) = 0 cut from each end: the mean
    assert stats.iqm([1, 2, 3, 10]) == 2.5  # one cut from each end: (2 + 3) / 2
    assert stats.iqm([1, 2, 3, 4, 100]) == 3.0  # the diverged seed does not move it


def test_paired_difference_uses_the_pairs():
    # differences 2, 3, 1: mean 2, and with three pairs the interval is their range
    assert stats.paired_difference([3, 5, 7], [1, 2, 6]) == Interval(2.0, 1.0, 3.0, 3)
    # Seeds differ a lot but ours beats the baseline by exactly 1 on each: paired, that is certain;
    # unpaired, the two sets of runs overlap (probability of improvement 6/9).
    assert stats.paired_difference([10, 20, 30], [9, 19, 29]) == Interval(1.0, 1.0, 1.0, 3)
    assert stats.probability_of_improvement([10, 20, 30], [9, 19, 29]).mean == pytest.approx(6 / 9)
    # Series are aligned by seed, not by position.
    ours = pd.Series([3.0, 5.0, 7.0], index=[0, 1, 2])
    baseline = pd.Series([6.0, 1.0, 2.0], index=[2, 0, 1])
    assert stats.paired_difference(ours, baseline).mean == 2.0
    with pytest.raises(ValueError, match=r"seeds \[2, 3\] are in only one"):
        stats.paired_difference(ours, pd.Series([1.0, 2.0, 6.0], index=[0, 1, 3]))
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired_difference([1, 2], [1, 2, 3])


def test_probability_of_improvement_by_hand():
    # x = 1, 2, 3 against y = 0, 2, 4: wins 1>0, 2>0, 3>0, 3>2 = 4, one tie (2 = 2) counts 1/2: 4.5 / 9
    result = stats.probability_of_improvement([1, 2, 3], [0, 2, 4])
    assert result.mean == 0.5 and result.low <= 0.5 <= result.high
    assert stats.probability_of_improvement([5, 6, 7], [1, 2, 3]) == Interval(1.0, 1.0, 1.0, 3)


def test_clustered_bootstrap_reduces_to_the_seed_bootstrap_and_is_wider_than_pooling():
    # Prompts identical within each seed: only the seed draw matters, as in test_three_seeds_give_their_range.
    values = [1.0] * 4 + [2.0] * 4 + [6.0] * 4
    seeds = [0] * 4 + [1] * 4 + [2] * 4
    assert stats.clustered_mean_ci(values, seeds) == Interval(3.0, 1.0, 6.0, 3)
    # One seed: a bootstrap over its prompts, the enumerated case of test_five_seeds_match_the_enumerated_bootstrap.
    assert stats.clustered_mean_ci([0, 0, 0, 0, 10], [7] * 5) == Interval(2.0, 0.0, 6.0, 1)
    # Two seeds far apart with 50 prompts each: both draws land on one seed with probability 1/4, so the
    # interval spans both seeds; pooling the 100 prompts as if independent claims far more certainty.
    values = [0.0] * 50 + [10.0] * 50
    seeds = [0] * 50 + [1] * 50
    clustered = stats.clustered_mean_ci(values, seeds)
    assert (clustered.mean, clustered.low, clustered.high) == (5.0, 0.0, 10.0)
    pooled = stats.mean_ci(values)
    assert 3.0 < pooled.low < pooled.high < 7.0


def test_clustered_paired_difference_names_missing_columns():
    frame = pd.DataFrame({"seed": [0, 0, 1, 1], "raft": [1.0, 2.0, 3.0, 4.0], "random": [0.0, 1.0, 2.0, 3.0]})
    assert stats.clustered_paired_difference(frame, "raft", "random") == Interval(1.0, 1.0, 1.0, 2)
    with pytest.raises(KeyError, match="no column 'grpo'"):
        stats.clustered_paired_difference(frame, "raft", "grpo")


def test_verdict_follows_the_interval():
    assert stats.verdict(Interval(0.3, 0.1, 0.5, 3), "up") == "reproduces"
    assert stats.verdict(Interval(0.3, 0.1, 0.5, 3), "down") == "opposite"
    assert stats.verdict((-0.3, -0.5, -0.1), -1) == "reproduces"
    assert stats.verdict((0.2, -0.1, 0.5), 1) == "not resolved at this sample size"
    assert stats.verdict((0.2, 0.0, 0.5), 1) == "not resolved at this sample size"  # touching 0 is not excluding it
    assert stats.verdict(stats.mean_ci([0.4]), "up") == "not resolved at this sample size"  # one seed
    with pytest.raises(ValueError, match="paper_direction"):
        stats.verdict((0.2, 0.1, 0.5), "rise")
    assert stats.paper_direction(2.180, 2.329) == "up" and stats.paper_direction(2.198, 2.143) == "down"


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
    assert rise.mean == pytest.approx(0.2) and (rise.low, rise.high) == pytest.approx((0.1, 0.3))
    assert stats.verdict(rise, stats.paper_direction(2.180, 2.329)) == "reproduces"
    with pytest.raises(ValueError, match="no rows with setting == 64"):
        stats.trend(per_seed_rows(), "setting", "proxy_reward", first=8, last=64)


def test_summary_table_and_its_csv_files(tmp_path):
    rows = per_seed_rows().sample(frac=1.0, random_state=3).sort_values("setting", key=lambda s: -s, kind="stable")
    summary = report.save_seed_table(rows, tmp_path, "table5_k", metrics=["proxy_reward", "perplexity"])
    assert list(summary.index) == [32, 16, 8]  # first-seen order, as the caller laid out the sweep
    assert list(summary.columns) == [
        "proxy_reward", "proxy_reward_ci95_low", "proxy_reward_ci95_high", "proxy_reward_iqm",
        "perplexity", "perplexity_ci95_low", "perplexity_ci95_high", "perplexity_iqm", "n_seeds",
    ]  # fmt: skip
    assert summary.loc[8, "proxy_reward"] == pytest.approx(0.5)
    assert (summary.loc[8, "proxy_reward_ci95_low"], summary.loc[8, "proxy_reward_ci95_high"]) == pytest.approx(
        (0.4, 0.6)
    )
    assert summary.loc[16, "proxy_reward_iqm"] == pytest.approx(1.7 / 3)
    assert (summary["n_seeds"] == 3).all()
    seeds = pd.read_csv(tmp_path / "table5_k_seeds.csv")
    assert list(seeds.columns) == ["setting", "seed", "proxy_reward", "perplexity"] and len(seeds) == 9
    table = pd.read_csv(tmp_path / "table5_k.csv", index_col=0)
    assert table.loc[32, "perplexity_ci95_high"] == 122.0
    with pytest.raises(ValueError, match=r"more than one row for seed\(s\) \[0\]"):
        stats.summarize(pd.concat([rows, rows.head(1)]), ["proxy_reward"])
    with pytest.raises(KeyError, match="no column 'gold_reward'"):
        stats.summarize(rows, ["gold_reward"])


def test_headline_with_an_interval(tmp_path):
    report.write_headline(
        tmp_path,
        "K sweep",
        {"K=32 proxy": stats.mean_ci([0.6, 0.8, 0.7]), "ratio": (0.45, 0.40, 0.51), "one seed": stats.mean_ci([1.0])},
    )
    import json

    numbers = json.loads((tmp_path / "headline.json").read_text())["numbers"]
    assert numbers["ratio"] == {"mean": 0.45, "ci95_low": 0.40, "ci95_high": 0.51}
    assert report.format_headline_value(numbers["ratio"]) == "0.450 [0.400, 0.510]"
    assert report.format_headline_value(numbers["K=32 proxy"]) == "0.700 [0.600, 0.800]"
    assert report.format_headline_value(numbers["one seed"]) == "1.000 [no interval: one seed]"
    assert report.format_headline_value(0.25) == "0.250"
    with pytest.raises(ValueError, match="an interval is"):
        report.write_headline(tmp_path, "bad", {"x": (1.0, 2.0)})


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
    with pytest.raises(ValueError, match=r"seed_0\.json holds seed 0 computed with params \{'iterations': 3\}"):
        for_each_seed([0], experiment, tmp_path, {"iterations": 4})
    summary = stats.summarize(rows, ["reward"])
    assert summary.loc["K16", "reward"] == pytest.approx(0.2) and summary.loc["K16", "n_seeds"] == 3
    with pytest.raises(TypeError, match="return a dict, a list of dicts or a DataFrame"):
        for_each_seed([5], lambda seed: 0.5)
