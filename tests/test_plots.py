"""The seaborn figures render headless (Agg), save as PNG, label every mark, and draw stats' intervals."""

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import seaborn as sns

from raftsuite import plots, report, stats

COLORBLIND = sns.color_palette("colorblind")


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


def test_runs_frame_is_tidy(tmp_path):
    frame = plots.runs_frame(write_runs(tmp_path), ["eval_reward_mean"])
    assert list(frame.columns) == ["label", "seed", "iteration", "eval_reward_mean"] and len(frame) == 24
    with pytest.raises(KeyError, match=r"metrics\.jsonl: no metric \['eval_kl'\]"):
        plots.runs_frame({"RAFT": {0: tmp_path / "RAFT_s0"}}, ["eval_kl"])


def test_iteration_bands(tmp_path):
    frame = plots.runs_frame(write_runs(tmp_path))
    fig = plots.plot_iteration_bands(frame, "eval_reward_mean", "Held-out reward per iteration", "reward (proxy RM)")
    ax = fig.axes[0]
    assert ax.get_title() == "Held-out reward per iteration" and ax.get_ylabel() == "reward (proxy RM)"
    assert ax.get_xlabel() == "RAFT iteration"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [
        "RAFT (n=3 seeds)",
        "random selection (n=3 seeds)",
        "one seed",
        "95% CI of the mean (bootstrap over seeds)",
    ]
    # The thick line is the mean over seeds, in the palette's first colour: at iteration 2, 0.1 + 0.4.
    thick = [line for line in ax.get_lines() if line.get_linewidth() > 2]
    assert np.allclose(thick[0].get_ydata(), [0.1 + 0.2 * i for i in range(1, 5)])
    assert matplotlib.colors.to_rgb(thick[0].get_color()) == pytest.approx(COLORBLIND[0])
    # The band is stats.mean_ci's: three seeds 0.2 i + (0, 0.1, 0.2) give [0.2 i, 0.2 i + 0.2], so over
    # iterations 1-4 it runs from 0.2 to 1.0.
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert (band.min(), band.max()) == pytest.approx((0.2, 1.0))
    assert len([line for line in ax.get_lines() if line.get_linewidth() < 1]) == 6  # one thin line per run
    saved_png(fig, tmp_path, "bands")


def sweep_rows():
    return pd.DataFrame(
        {
            "K": [8, 8, 8, 16, 16, 16, 32, 32, 32],
            "seed": [0, 1, 2] * 3,
            "proxy_reward": [0.4, 0.5, 0.6, 0.5, 0.6, 0.6, 0.6, 0.8, 0.7],
        }
    )


def test_sweep_point_and_interval_with_paper_markers(tmp_path):
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
    assert right.get_ylabel() == "paper's value"
    # Error bars from stats.mean_ci: three seeds -> [min, max] of each setting.
    segments = [seg for coll in ax.collections for seg in getattr(coll, "get_segments", list)()]
    bars = sorted((float(s[0][0]), float(s[0][1]), float(s[1][1])) for s in segments)
    rows = sweep_rows()
    for (_, low, high), setting in zip(bars, [8, 16, 32], strict=True):
        interval = stats.mean_ci(rows[rows["K"] == setting]["proxy_reward"])
        assert (low, high) == pytest.approx((interval.low, interval.high))
    assert [b[0] for b in bars] == [0.0, 1.0, 2.0]
    paper_line = right.get_lines()[0]
    assert list(paper_line.get_ydata()) == [2.180, 2.251, 2.329] and paper_line.get_marker() == "D"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["ours: mean and 95% CI (3 seeds)", "ours: one seed", "paper (its own reward scale, right axis)"]
    saved_png(fig, tmp_path, "sweep")
    with pytest.raises(KeyError, match=r"paper values for settings \[64\]"):
        plots.plot_sweep(sweep_rows(), "K", "proxy_reward", "t", "x", "y", paper={64: 2.4})


def test_paired_differences_forest(tmp_path):
    intervals = {
        "RAFT - random selection": stats.paired_difference([0.7, 0.8, 0.75], [0.5, 0.55, 0.6]),
        "RAFT - GRPO": stats.paired_difference([0.7, 0.8, 0.75], [0.72, 0.7, 0.8]),
    }
    verdicts = {k: stats.verdict(v, "up") for k, v in intervals.items()}
    fig = plots.plot_paired_differences(intervals, "Paired differences, held-out proxy reward", "difference", verdicts)
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert ticks[0] == "RAFT - random selection\n0.200 [0.150, 0.250] (n=3) · reproduces"
    assert ticks[1] == "RAFT - GRPO\n0.010 [-0.050, 0.100] (n=3) · not resolved at this sample size"
    saved_png(fig, tmp_path, "paired")
