"""Figures with their uncertainty, drawn with seaborn: per-seed curves with a 95 % band over iterations, and
sweeps as a mean with its 95 % interval per setting beside the paper's values.

Each figure stands alone: a title that says what was measured and on what, axis labels with units, a legend
naming every mark (seeds, mean, interval, paper), and seaborn's "colorblind" palette. The intervals are
`stats.mean_ci`'s (Student-t over seeds), so a figure and its table show the same numbers; a mark from one seed
has no error bar (there is no interval to draw).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raftsuite import stats
from raftsuite.report import read_metrics

PALETTE = "colorblind"
PAPER_COLOR = "black"


def use_style() -> None:
    """seaborn's whitegrid theme with the colour-blind-safe palette (call once per notebook, or rely on the
    functions below, which call it)."""
    import seaborn as sns

    sns.set_theme(style="whitegrid", palette=PALETTE, context="notebook")


def runs_frame(runs: Mapping[str, Mapping[int, str | Path]], metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Several runs' metrics.jsonl as one tidy frame: columns label, seed, iteration and the metrics.

    runs: {label: {seed: run directory}}, e.g. {"RAFT": {0: "runs/tiny/hh/raft_s0", 1: ...}, "random": {...}}.
    """
    frames = []
    for label, by_seed in runs.items():
        for seed, run_dir in by_seed.items():
            metrics_frame = read_metrics(run_dir).reset_index()
            if metrics:
                missing = [m for m in metrics if m not in metrics_frame]
                if missing:
                    raise KeyError(
                        f"{Path(run_dir) / 'metrics.jsonl'}: no metric {missing} (has {list(metrics_frame)})"
                    )
                metrics_frame = metrics_frame[["iteration", *metrics]]
            frames.append(metrics_frame.assign(label=label, seed=seed))
    if not frames:
        raise ValueError("runs_frame: no runs")
    frame = pd.concat(frames, ignore_index=True)
    return frame[["label", "seed", "iteration", *(c for c in frame if c not in ("label", "seed", "iteration"))]]


def _interval_rows(frame: pd.DataFrame, keys: list[str], metric: str) -> pd.DataFrame:
    rows = []
    for key, group in frame.dropna(subset=[metric]).groupby(keys, sort=False):
        interval = stats.mean_ci(group[metric])
        rows.append(
            dict(zip(keys, key, strict=True)) | {"mean": interval.mean, "low": interval.low, "high": interval.high}
        )
    return pd.DataFrame(rows)


def plot_iteration_bands(
    frame: pd.DataFrame,
    metric: str,
    title: str,
    ylabel: str,
    hue: str = "label",
    xlabel: str = "RAFT iteration",
    ax: Any = None,
):
    """One colour per `hue` value: each seed's curve as a thin line, the mean over seeds as a thick one, and
    its 95 % interval as a band. `frame` is `runs_frame(...)` (columns hue, seed, iteration, metric)."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    use_style()
    for column in (hue, "seed", "iteration", metric):
        if column not in frame:
            raise KeyError(f"plot_iteration_bands: no column {column!r} (columns: {', '.join(frame)})")
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 4.2))
    labels = list(dict.fromkeys(frame[hue]))
    colors = dict(zip(labels, sns.color_palette(PALETTE, len(labels)), strict=True))
    summary = _interval_rows(frame, [hue, "iteration"], metric)
    handles = []
    for label in labels:
        color = colors[label]
        runs = frame[frame[hue] == label]
        sns.lineplot(
            data=runs,
            x="iteration",
            y=metric,
            units="seed",
            estimator=None,
            color=color,
            alpha=0.35,
            linewidth=0.8,
            ax=ax,
            legend=False,
        )
        band = summary[summary[hue] == label].sort_values("iteration")
        ax.fill_between(band["iteration"], band["low"], band["high"], color=color, alpha=0.2, linewidth=0)
        ax.plot(band["iteration"], band["mean"], color=color, linewidth=2.2, marker="o", markersize=4)
        handles.append(
            Line2D(
                [],
                [],
                color=color,
                linewidth=2.2,
                marker="o",
                label=f"{label} (n={runs['seed'].nunique()} seed{'s' * (runs['seed'].nunique() != 1)})",
            )
        )
    handles += [
        Line2D([], [], color="grey", linewidth=0.8, alpha=0.6, label="one seed"),
        Patch(color="grey", alpha=0.25, label="95 % t-interval of the mean over seeds"),
    ]
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if pd.api.types.is_integer_dtype(frame["iteration"]):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return fig


def panels(count: int, width: float = 4.4, height: float = 3.6):
    """(figure, list of `count` axes side by side): one figure of several small panels."""
    import matplotlib.pyplot as plt

    use_style()
    fig, axes = plt.subplots(1, count, figsize=(width * count, height), squeeze=False)
    return fig, list(axes[0])


def plot_sweep(
    rows: pd.DataFrame,
    setting: str,
    metric: str,
    title: str,
    xlabel: str,
    ylabel: str,
    paper: Mapping[Any, float] | None = None,
    ax: Any = None,
):
    """A sweep: settings on x in the order they first appear, each seed as a small dot, the mean as a marker with
    its 95 % t-interval as an error bar (none where a setting has one seed: there is no interval).

    With `paper` ({setting: value}), the paper's values go in a panel of their own whose axis starts at 0, so a
    change of 2.18 -> 2.33 looks as large as it is (a twin axis would stretch it to the full height beside ours);
    both panels share the x settings. `ax`: draw ours into it (no paper panel then: `plot_paper_values`).
    """
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.lines import Line2D

    use_style()
    for column in (setting, "seed", metric):
        if column not in rows:
            raise KeyError(f"plot_sweep: no column {column!r} (columns: {', '.join(rows)})")
    if ax is not None:
        fig, paper = ax.figure, None
    elif paper:
        fig, (ax, paper_ax) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    else:
        fig, ax = plt.subplots(figsize=(6, 4.2))
    ours_color = sns.color_palette(PALETTE)[0]
    order = list(dict.fromkeys(rows[setting]))
    position = {value: i for i, value in enumerate(order)}
    x = rows[setting].map(position).to_numpy(dtype=float)
    # Seeds just left of their setting (seeded jitter: the figure is reproducible), clear of the error bar.
    jitter = np.random.default_rng(0).uniform(-0.05, 0.05, size=len(x))
    ax.scatter(x - 0.18 + jitter, rows[metric], s=16, color=ours_color, alpha=0.5, linewidth=0, zorder=2)
    summary = _interval_rows(rows, [setting], metric).set_index(setting).loc[order]
    xs = np.arange(len(order))
    n = rows.groupby(setting)["seed"].nunique().loc[order]
    with_interval = (n > 1).to_numpy()
    yerr = np.vstack([summary["mean"] - summary["low"], summary["high"] - summary["mean"]])
    ax.errorbar(
        xs[with_interval],
        summary["mean"][with_interval],
        yerr=yerr[:, with_interval],
        fmt="o",
        color=ours_color,
        markersize=8,
        capsize=5,
        linewidth=1.8,
        zorder=3,
    )
    ax.plot(xs[~with_interval], summary["mean"][~with_interval], "o", color=ours_color, markersize=8, zorder=3)
    low, high = int(n.min()), int(n.max())
    seeds = f"{low}–{high} seeds" if low != high else f"{low} seed{'s' * (low != 1)}"
    mark = "mean and 95 % t-interval" if n.max() > 1 else "one seed: no interval"
    handles = [
        Line2D([], [], color=ours_color, marker="o", markersize=8, linewidth=1.8, label=f"ours: {mark} ({seeds})"),
        Line2D([], [], color=ours_color, marker="o", markersize=4, alpha=0.45, linewidth=0, label="ours: one seed"),
    ]
    ax.set_xticks(xs, [str(v) for v in order])
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    if paper:
        unknown = [k for k in paper if k not in position]
        if unknown:
            raise KeyError(f"plot_sweep: paper values for settings {unknown} that the rows lack (settings: {order})")
        plot_paper_values(paper_ax, paper, order, xlabel, "paper (its own reward model)")
        paper_ax.set_xlim(ax.get_xlim())
    fig.tight_layout()
    return fig


def plot_paper_values(ax, paper: Mapping[Any, float], order: Sequence[Any], xlabel: str, title: str) -> None:
    """The paper's value per setting on an axis from 0 (so its relative changes look as large as they are)."""
    keys = [k for k in order if k in paper]
    ax.plot(
        [order.index(k) for k in keys],
        [paper[k] for k in keys],
        linestyle="--",
        marker="D",
        color=PAPER_COLOR,
        markersize=7,
        linewidth=1,
    )
    ax.set_xticks(range(len(order)), [str(v) for v in order])
    ax.set_ylim(0, max(paper.values()) * 1.15)
    ax.set(title=title, xlabel=xlabel, ylabel="paper's value (axis from 0)")


def plot_paired_differences(
    intervals: Mapping[str, stats.Interval], title: str, xlabel: str, verdicts: Mapping[str, str] | None = None, ax=None
):
    """A forest plot: each comparison's paired difference with its 95 % interval, and the line at 0 that an
    interval must clear to say anything. Each row's label carries its numbers and, given verdicts
    ({label: stats.verdict(...)}), its verdict."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    use_style()
    labels = list(intervals)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(8, 0.8 * len(labels) + 1.6))
    colors = sns.color_palette(PALETTE)
    ticks = []
    for row, label in enumerate(labels):
        interval = intervals[label]
        color = colors[0] if interval.excludes_zero() else colors[7]  # blue: clears 0; grey: does not
        xerr = np.nan_to_num([[interval.mean - interval.low], [interval.high - interval.mean]])
        ax.errorbar([interval.mean], [row], xerr=xerr, fmt="o", color=color, capsize=5, markersize=7)
        verdict = f" · {verdicts[label]}" if verdicts and label in verdicts else ""
        ticks.append(f"{label}\n{interval} (n={interval.n}){verdict}")
    nulls = {intervals[label].null for label in labels}  # 0 for differences, 1 for ratios
    for null in nulls:
        ax.axvline(null, color="black", linewidth=1, linestyle=":")
    ax.set_yticks(range(len(labels)), ticks, fontsize=9)
    ax.set_ylim(len(labels) - 0.5, -0.5)  # first comparison on top, half a row of margin
    ax.set(title=title, xlabel=xlabel)
    fig.tight_layout()
    return fig


def plot_proxy_and_gold(over: pd.DataFrame, title: str):
    """Two panels over RAFT iterations: held-out proxy and gold reward (seeds thin, mean thick, 95 % t-band), and
    gold minus proxy (falling: the proxy's gains outrun the gold's). `over`: seed, iteration, proxy/gold_reward."""
    import matplotlib.pyplot as plt

    long = over.melt(
        id_vars=["seed", "iteration"], value_vars=["proxy_reward", "gold_reward"], var_name="label", value_name="reward"
    )
    long["label"] = long["label"].map(
        {"proxy_reward": "proxy (learned RM, optimised)", "gold_reward": "gold (hidden preference, never seen)"}
    )
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    plot_iteration_bands(long, "reward", title, "mean reward", ax=axes[0])
    gap = over.assign(label="gold − proxy", gap=over["gold_reward"] - over["proxy_reward"])
    plot_iteration_bands(
        gap, "gap", "gold minus proxy per iteration (falling: proxy gains outrun gold)", "gold − proxy", ax=axes[1]
    )
    fig.tight_layout()
    return fig


def plot_learning_rate_sweep(sweep: pd.DataFrame, title: str, max_perplexity_ratio: float | None = None):
    """A learning-rate sweep (`raftsuite.sweeps` rows, one seed per rate): one column per method, the validation
    reward on top and, where the rows have `perplexity_over_sft`, that ratio below on a log axis with the
    admissibility limit dashed. Rates on a log axis; a rate that failed the constraint (`admissible` False) is a
    hollow marker, the chosen rate a star, so the highest point is visibly not the choice when it was rejected."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    use_style()
    for column in ("method", "learning_rate", "validation_reward", "chosen"):
        if column not in sweep:
            raise KeyError(f"plot_learning_rate_sweep: no column {column!r} (columns: {', '.join(sweep)})")
    methods = list(dict.fromkeys(sweep["method"]))
    with_ratio = "perplexity_over_sft" in sweep
    rows = 2 if with_ratio else 1
    fig, axes = plt.subplots(rows, len(methods), figsize=(4.6 * len(methods), 3.2 * rows), squeeze=False, sharex="col")
    for column, method in enumerate(methods):
        group = sweep[sweep["method"] == method].sort_values("learning_rate")
        rate = group["learning_rate"].astype(float)
        admissible = group["admissible"].astype(bool) if "admissible" in group else pd.Series(True, index=group.index)
        chosen = group["chosen"].astype(bool)
        panels_ = [("validation_reward", "validation reward")]
        if with_ratio:
            panels_.append(("perplexity_over_sft", "validation perplexity / SFT's"))
        for row, (metric, label) in enumerate(panels_):
            ax = axes[row][column]
            ax.plot(rate, group[metric], color="0.6", linewidth=1, zorder=1)
            ax.scatter(rate[admissible], group[metric][admissible], s=36, color="C0", zorder=2)
            ax.scatter(
                rate[~admissible], group[metric][~admissible], s=36, facecolors="none", edgecolors="C3", zorder=2
            )
            ax.scatter(rate[chosen], group[metric][chosen], s=160, marker="*", color="C2", zorder=3)
            ax.set_xscale("log", base=2)
            ax.set_ylabel(label)
            if metric == "perplexity_over_sft":
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
                if max_perplexity_ratio is not None:
                    ax.axhline(max_perplexity_ratio, color="C3", linestyle="--", linewidth=1)
            if row == 0:
                ax.set_title(method.upper())
        axes[rows - 1][column].set_xlabel("learning rate (log scale)")
        for ax in axes[:, column]:
            ax.set_xticks(rate.tolist(), [f"{r:g}" for r in rate], rotation=45, ha="right")
            ax.xaxis.set_minor_locator(plt.NullLocator())
    handles = [
        Line2D([], [], marker="o", linestyle="", color="C0", label="admissible (one seed: no interval)"),
        Line2D([], [], marker="o", linestyle="", markerfacecolor="none", color="C3", label="rejected by the limit"),
        Line2D([], [], marker="*", linestyle="", markersize=12, color="C2", label="chosen"),
    ]
    if with_ratio and max_perplexity_ratio is not None:
        handles.append(Line2D([], [], linestyle="--", color="C3", label=f"limit: {max_perplexity_ratio:g} x SFT"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig
