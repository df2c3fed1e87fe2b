"""The seaborn figures render headless (Agg), save as PNG, label every mark, and draw stats' t-intervals."""

import json
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.colors
import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import seaborn as sns
from matplotlib.collections import LineCollection

from raftsuite import plots, report, stats

COLORBLIND = sns.color_palette("colorblind")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def write_runs(root):
    """Two methods x three seeds x four iterations of metrics.jsonl; reward = 0.1 seed + step x iteration."""
    runs = {}
    for label, step in (("RAFT", 0.2), ("random selection", 0.05)):
        runs[label] = {}
        for seed in range(3):
            run = root / f"{label.replace(' ', '_')}_s{seed}"
            run.mkdir()
            lines = [
                json.dumps({"iteration": i, "eval_reward_mean": 0.1 * seed + step * i, "reward_mean": 0.0})
                for i in range(1, 5)
            ]
            (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
            runs[label][seed] = run
    return runs


def saved_png(fig, tmp_path, name):
    path = report.save_figure(fig, tmp_path, name)
    plt.close(fig)
    image = matplotlib.image.imread(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas
    return path


def legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def error_bar_segments(ax):
    """(x, low, high) of every vertical error bar drawn on `ax`, sorted by x."""
    segments = [seg for coll in ax.collections if isinstance(coll, LineCollection) for seg in coll.get_segments()]
    return sorted((float(s[0][0]), float(s[0][1]), float(s[1][1])) for s in segments)


def test_runs_frame_is_tidy(tmp_path):
    frame = plots.runs_frame(write_runs(tmp_path), ["eval_reward_mean"])
    assert list(frame.columns) == ["label", "seed", "iteration", "eval_reward_mean"] and len(frame) == 24
    assert frame["label"].unique().tolist() == ["RAFT", "random selection"]
    with pytest.raises(KeyError, match=r"metrics\.jsonl: no metric \['eval_kl'\]"):
        plots.runs_frame({"RAFT": {0: tmp_path / "RAFT_s0"}}, ["eval_kl"])
    with pytest.raises(ValueError, match="no runs"):
        plots.runs_frame({})


def test_iteration_bands(tmp_path):
    frame = plots.runs_frame(write_runs(tmp_path))
    fig = plots.plot_iteration_bands(frame, "eval_reward_mean", "Held-out reward per iteration", "reward (proxy RM)")
    ax = fig.axes[0]
    assert ax.get_title() == "Held-out reward per iteration" and ax.get_ylabel() == "reward (proxy RM)"
    assert ax.get_xlabel() == "RAFT iteration"
    assert legend_texts(ax) == [
        "RAFT (n=3 seeds)",
        "random selection (n=3 seeds)",
        "one seed",
        "95 % t-interval of the mean over seeds",
    ]
    # The thick line is the mean over seeds, in the palette's first colour: at iteration i, 0.1 + 0.2 i.
    thick = [line for line in ax.get_lines() if line.get_linewidth() > 2]
    assert len(thick) == 2
    assert np.allclose(thick[0].get_ydata(), [0.1 + 0.2 * i for i in range(1, 5)])
    assert np.allclose(thick[1].get_ydata(), [0.1 + 0.05 * i for i in range(1, 5)])
    assert matplotlib.colors.to_rgb(thick[0].get_color()) == pytest.approx(COLORBLIND[0])
    assert matplotlib.colors.to_rgb(thick[1].get_color()) == pytest.approx(COLORBLIND[1])
    # The band is stats.mean_ci's t-interval: three seeds 0.2 i + (0, 0.1, 0.2), mean 0.2 i + 0.1, sd 0.1, so
    # 0.2 i + 0.1 +- 4.3027 x 0.1 / sqrt(3) = +-0.2484 (wider than the seeds' range [0.2 i, 0.2 i + 0.2]).
    assert len(ax.collections) == 2  # one band per method
    band = ax.collections[0].get_paths()[0].vertices
    half = 4.30265 * 0.1 / math.sqrt(3)
    for i in range(1, 5):
        at = band[band[:, 0] == i, 1]
        interval = stats.mean_ci(frame[(frame["label"] == "RAFT") & (frame["iteration"] == i)]["eval_reward_mean"])
        assert (at.min(), at.max()) == pytest.approx((interval.low, interval.high))
        assert (at.min(), at.max()) == pytest.approx((0.2 * i + 0.1 - half, 0.2 * i + 0.1 + half), abs=1e-4)
    thin = [line for line in ax.get_lines() if line.get_linewidth() < 1]
    assert len(thin) == 6  # one thin line per run
    assert sorted(tuple(np.round(line.get_ydata()[:1], 6)) for line in thin[:3]) == [(0.2,), (0.3,), (0.4,)]
    saved_png(fig, tmp_path, "bands")
    with pytest.raises(KeyError, match="no column 'eval_kl'"):
        plots.plot_iteration_bands(frame, "eval_kl", "t", "y")


def test_iteration_bands_with_one_seed_draw_no_band():
    frame = pd.DataFrame({"label": "RAFT", "seed": 0, "iteration": [1, 2, 3], "reward": [0.1, 0.2, 0.4]})
    fig = plots.plot_iteration_bands(frame, "reward", "one seed", "reward")
    ax = fig.axes[0]
    assert legend_texts(ax)[0].startswith("RAFT (n=1 seed")  # the seed count, even of one
    assert len(ax.collections) == 1 and ax.collections[0].get_paths() == []  # nan bounds: the band is empty
    thick = [line for line in ax.get_lines() if line.get_linewidth() > 2]
    assert np.allclose(thick[0].get_ydata(), [0.1, 0.2, 0.4])  # the mean of one seed is that seed


def sweep_rows():
    return pd.DataFrame(
        {
            "K": [8, 8, 8, 16, 16, 16, 32, 32, 32],
            "seed": [0, 1, 2] * 3,
            "proxy_reward": [0.4, 0.5, 0.6, 0.5, 0.6, 0.6, 0.6, 0.8, 0.7],
        }
    )


def test_sweep_point_and_interval_with_a_paper_panel(tmp_path):
    paper = {8: 2.180, 16: 2.251, 32: 2.329}
    fig = plots.plot_sweep(
        sweep_rows(),
        "K",
        "proxy_reward",
        "Table 5: final reward against K",
        "samples per prompt K",
        "held-out proxy reward",
        paper=paper,
    )
    ax, right = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "16", "32"]
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == (
        "Table 5: final reward against K",
        "samples per prompt K",
        "held-out proxy reward",
    )
    # Error bars are stats.mean_ci's t-intervals, one per setting at x = 0, 1, 2.
    bars = error_bar_segments(ax)
    rows = sweep_rows()
    assert [b[0] for b in bars] == [0.0, 1.0, 2.0]
    for (_, low, high), setting in zip(bars, [8, 16, 32], strict=True):
        interval = stats.mean_ci(rows[rows["K"] == setting]["proxy_reward"])
        assert (low, high) == pytest.approx((interval.low, interval.high))
    assert bars[0][1:] == pytest.approx((0.5 - 0.24841, 0.5 + 0.24841), abs=1e-4)  # 0.5 +- 4.3027 x 0.1 / sqrt(3)
    # Every seed is a dot: nine of them, just left of their setting.
    dots = ax.collections[0].get_offsets()
    assert len(dots) == 9 and np.all(np.abs(dots[:, 0] - rows["K"].map({8: 0, 16: 1, 32: 2}) + 0.18) <= 0.05)
    assert sorted(dots[:, 1]) == pytest.approx(sorted(rows["proxy_reward"]))
    # The paper's values in a panel of their own, from 0, sharing the settings' x positions.
    paper_line = right.get_lines()[0]
    assert list(paper_line.get_xdata()) == [0, 1, 2] and list(paper_line.get_ydata()) == [2.180, 2.251, 2.329]
    assert paper_line.get_marker() == "D" and paper_line.get_linestyle() == "--"
    assert right.get_ylim() == pytest.approx((0.0, 2.329 * 1.15))
    assert right.get_xlim() == pytest.approx(ax.get_xlim())
    assert right.get_ylabel() == "paper's value (axis from 0)" and right.get_title() == "paper (its own reward model)"
    assert [t.get_text() for t in right.get_xticklabels()] == ["8", "16", "32"]
    assert legend_texts(ax) == ["ours: mean and 95 % t-interval (3 seeds)", "ours: one seed"]
    saved_png(fig, tmp_path, "sweep")
    with pytest.raises(KeyError, match=r"paper values for settings \[64\]"):
        plots.plot_sweep(sweep_rows(), "K", "proxy_reward", "t", "x", "y", paper={64: 2.4})
    with pytest.raises(KeyError, match="no column 'seed'"):
        plots.plot_sweep(sweep_rows().drop(columns="seed"), "K", "proxy_reward", "t", "x", "y")


def test_sweep_with_one_seed_draws_no_error_bars(tmp_path):
    rows = pd.DataFrame({"K": [32, 8, 16], "seed": [0, 0, 0], "proxy_reward": [0.7, 0.4, 0.5]})
    fig = plots.plot_sweep(rows, "K", "proxy_reward", "one seed", "K", "reward")
    assert len(fig.axes) == 1  # no paper values, no paper panel
    ax = fig.axes[0]
    assert error_bar_segments(ax) == []  # one seed: no interval to draw
    assert all(len(c.lines[0].get_xdata()) == 0 for c in ax.containers)  # the error-bar call drew no points
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32", "8", "16"]  # first-seen order, not sorted
    means = [line for line in ax.get_lines() if len(line.get_xdata())]
    assert len(means) == 1 and list(means[0].get_xdata()) == [0, 1, 2]
    assert list(means[0].get_ydata()) == pytest.approx([0.7, 0.4, 0.5])
    assert legend_texts(ax) == ["ours: one seed: no interval (1 seed)", "ours: one seed"]
    saved_png(fig, tmp_path, "one_seed")


def test_sweep_with_mixed_seed_counts_bars_only_where_there_is_an_interval():
    rows = pd.DataFrame(
        {"K": [8, 8, 8, 16, 32, 32], "seed": [0, 1, 2, 0, 0, 1], "proxy_reward": [0.4, 0.5, 0.6, 0.5, 0.7, 0.8]}
    )
    fig = plots.plot_sweep(rows, "K", "proxy_reward", "mixed", "K", "reward")
    ax = fig.axes[0]
    bars = error_bar_segments(ax)
    assert [b[0] for b in bars] == [0.0, 2.0]  # K=16 has one seed: a marker, no bar
    two_seeds = stats.mean_ci([0.7, 0.8])  # 0.75 +- 12.706 x 0.0707 / sqrt(2)
    assert bars[1][1:] == pytest.approx((two_seeds.low, two_seeds.high))
    bare = [line for line in ax.get_lines() if list(line.get_xdata()) == [1]]
    assert len(bare) == 1 and list(bare[0].get_ydata()) == [0.5]
    assert legend_texts(ax)[0] == "ours: mean and 95 % t-interval (1–3 seeds)"


def test_sweep_into_given_axes_and_panels():
    fig, axes = plots.panels(2)
    assert len(axes) == 2 and tuple(fig.get_size_inches()) == pytest.approx((8.8, 3.6))
    out = plots.plot_sweep(sweep_rows(), "K", "proxy_reward", "left", "K", "reward", paper={8: 2.18}, ax=axes[0])
    assert out is fig and len(fig.axes) == 2  # drawn into the given axes; no extra paper panel
    assert axes[0].get_title() == "left" and len(error_bar_segments(axes[0])) == 3
    assert not axes[1].has_data()
    plots.plot_paper_values(axes[1], {8: 2.18, 32: 2.33}, [8, 16, 32], "K", "paper")
    line = axes[1].get_lines()[0]
    assert list(line.get_xdata()) == [0, 2] and axes[1].get_ylim()[0] == 0.0  # K=16 has no paper value
    assert axes[1].get_title() == "paper" and [t.get_text() for t in axes[1].get_xticklabels()] == ["8", "16", "32"]


def test_paired_differences_forest(tmp_path):
    intervals = {
        "RAFT - random selection": stats.paired_difference([0.7, 0.8, 0.75], [0.5, 0.55, 0.6]),
        "RAFT - GRPO": stats.paired_difference([0.7, 0.8, 0.75], [0.72, 0.7, 0.8]),
        "RAFT - SFT (one seed)": stats.paired_difference([0.7], [0.4]),
    }
    verdicts = {k: stats.verdict(v, "up") for k, v in intervals.items()}
    fig = plots.plot_paired_differences(intervals, "Paired differences, held-out proxy reward", "difference", verdicts)
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    # differences 0.2, 0.25, 0.15: 0.2 +- 4.3027 x 0.05 / sqrt(3) = [0.076, 0.324], the t-interval
    assert ticks[0] == "RAFT - random selection\n0.200 [0.076, 0.324] (n=3) · reproduces"
    # differences -0.02, 0.1, -0.05: sd 0.0794, 0.01 +- 4.3027 x 0.0794 / sqrt(3) = [-0.187, 0.207]
    assert ticks[1] == "RAFT - GRPO\n0.010 [-0.187, 0.207] (n=3) · not resolved at this sample size"
    assert ticks[2] == "RAFT - SFT (one seed)\n0.300 [one seed: no interval] (n=1) · not resolved at this sample size"
    # One error bar per comparison at its row, spanning its interval; none for the one seed (zero width).
    bars = sorted(
        (float(s[0][1]), float(s[0][0]), float(s[1][0]))
        for coll in ax.collections
        if isinstance(coll, LineCollection)
        for s in coll.get_segments()
    )
    assert [b[0] for b in bars] == [0.0, 1.0, 2.0]
    for (_, low, high), interval in zip(bars[:2], list(intervals.values())[:2], strict=True):
        assert (low, high) == pytest.approx((interval.low, interval.high))
    assert bars[2][1] == bars[2][2] == pytest.approx(0.3)
    # Blue where the interval clears 0, grey where it does not.
    colors = [matplotlib.colors.to_rgb(c.lines[0].get_color()) for c in ax.containers]
    assert colors[0] == pytest.approx(COLORBLIND[0]) and colors[1] == pytest.approx(COLORBLIND[7])
    assert colors[2] == pytest.approx(COLORBLIND[7])
    zero = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert len(zero) == 1 and list(zero[0].get_xdata()) == [0, 0]
    assert ax.get_ylim() == (2.5, -0.5)  # first comparison on top
    assert ax.get_title() == "Paired differences, held-out proxy reward" and ax.get_xlabel() == "difference"
    saved_png(fig, tmp_path, "paired")


def test_proxy_and_gold_panels(tmp_path):
    over = pd.DataFrame(
        [
            {"seed": s, "iteration": i, "proxy_reward": 0.1 * i + 0.01 * s, "gold_reward": 0.05 * i}
            for s in range(3)
            for i in range(1, 4)
        ]
    )
    fig = plots.plot_proxy_and_gold(over, "Proxy and gold reward")
    left, right = fig.axes
    assert left.get_title() == "Proxy and gold reward" and left.get_ylabel() == "mean reward"
    assert legend_texts(left) == [
        "proxy (learned RM, optimised) (n=3 seeds)",
        "gold (hidden preference, never seen) (n=3 seeds)",
        "one seed",
        "95 % t-interval of the mean over seeds",
    ]
    proxy, gold = (line.get_ydata() for line in left.get_lines() if line.get_linewidth() > 2)
    assert np.allclose(proxy, [0.11, 0.21, 0.31]) and np.allclose(gold, [0.05, 0.10, 0.15])
    assert legend_texts(right) == ["gold − proxy (n=3 seeds)", "one seed", "95 % t-interval of the mean over seeds"]
    (gap,) = (line.get_ydata() for line in right.get_lines() if line.get_linewidth() > 2)
    assert np.allclose(gap, [-0.06, -0.11, -0.16])  # falling: the proxy's gains outrun the gold's
    assert right.get_ylabel() == "gold − proxy"
    saved_png(fig, tmp_path, "proxy_gold")


def test_learning_rate_sweep_marks_the_choice_and_the_rejected_rates(tmp_path):
    sweep = pd.DataFrame(
        {
            "method": ["raft"] * 3 + ["grpo"] * 2,
            "learning_rate": [1e-4, 2e-4, 4e-4, 1e-4, 2e-4],
            "validation_reward": [0.2, 0.5, 0.9, 0.1, 0.3],
            "perplexity_over_sft": [1.1, 1.5, 6.0, 1.0, 1.2],
            "admissible": [True, True, False, True, True],
            "chosen": [False, True, False, False, True],
        }
    )
    fig = plots.plot_learning_rate_sweep(sweep, "sweep", max_perplexity_ratio=2.0)
    assert len(fig.axes) == 4  # reward and perplexity ratio, per method
    reward_ax = fig.axes[0]
    assert reward_ax.get_title() == "RAFT" and reward_ax.get_xscale() == "log"
    admissible, rejected, chosen = reward_ax.collections  # the order the scatters are drawn in
    assert admissible.get_offsets().tolist() == [[1e-4, 0.2], [2e-4, 0.5]]
    assert rejected.get_offsets().tolist() == [[4e-4, 0.9]]  # the highest reward, rejected by the limit
    assert chosen.get_offsets().tolist() == [[2e-4, 0.5]]
    ratio_ax = fig.axes[2]
    assert ratio_ax.get_yscale() == "log" and any(list(line.get_ydata()) == [2.0, 2.0] for line in ratio_ax.lines)
    assert [t.get_text() for t in fig.legends[0].get_texts()][-1] == "limit: 2 x SFT"
    saved_png(fig, tmp_path, "lr_sweep")
    with pytest.raises(KeyError, match="no column 'chosen'"):
        plots.plot_learning_rate_sweep(sweep.drop(columns="chosen"), "sweep")
    only_reward = plots.plot_learning_rate_sweep(sweep.drop(columns=["perplexity_over_sft", "admissible"]), "s")
    assert len(only_reward.axes) == 2  # no ratio: one row; no `admissible`: every rate is admissible
