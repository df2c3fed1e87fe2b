"""The efficiency comparison: RAFT against TRL's GRPO on the same HH setting, read from their held-out curves.

The runs themselves are `raftsuite.hh_methods` (one process each, so time and peak memory are their own); this
module reads their curves (held-out proxy reward against training seconds and completions drawn):

- **a common target neither method defines**: the reward both start from plus `TARGET_SHARE` of the smaller of the
  two methods' gains, per seed. The maximum of one method's curve would be that method's last point by
  construction (its time to target its whole budget); a share of the smaller gain is reached by both, neither at
  its own best. A method that never reaches it is *censored* (its time is its budget, a lower bound): counted and
  reported, never silently dropped.
- **the area under the reward curve**: the mean held-out reward over the time both methods trained (and over the
  completion budget), which uses the whole curve rather than one crossing.
- peak resident memory per method (and peak CUDA allocation on a GPU).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from raftsuite import stats
from raftsuite.report import Claim

TARGET_SHARE = 0.5
"""The common target: start + this share of the smaller of the two methods' best gains over the start."""

PAPER_TIME = {"RAFT K=8": 5.0, "fastest PPO": 8.7}
"""Wall-clock hours in the paper (LLaMA-7B, 8 x A40, lambda = 1): RAFT K = 8 about 5 h, the fastest PPO 8.7 h."""


def first_reaching(curve: pd.DataFrame, target: float) -> pd.Series | None:
    """The first point of a curve whose held-out reward is at least `target` (None if it never is)."""
    reached = curve[curve["eval_reward"] >= target]
    return None if reached.empty else reached.iloc[0]


def target_reward(curves: Mapping[str, pd.DataFrame], share: float = TARGET_SHARE) -> float:
    """start + share x (smaller best gain): a level both curves reach, at neither's own maximum."""
    start = float(np.mean([curve["eval_reward"].iloc[0] for curve in curves.values()]))
    gain = min(curve["eval_reward"].max() for curve in curves.values()) - start
    return start + share * gain


def mean_reward_over(curve: pd.DataFrame, x: str, horizon: float) -> float:
    """The area under the held-out reward curve over [0, horizon] of `x` (train_seconds or samples), divided by the
    horizon: the mean reward over that span (trapezoids; the curve held at its last value past its end)."""
    xs, ys = curve[x].to_numpy(dtype=float), curve["eval_reward"].to_numpy(dtype=float)
    if horizon <= 0:
        return float(ys[0])
    grid = np.append(xs[xs < horizon], horizon)
    values = np.interp(grid, xs, ys)
    return float(np.trapezoid(values, grid) / horizon)


def comparison(curves: Mapping[str, pd.DataFrame], peaks: Mapping[str, float]) -> tuple[float, pd.DataFrame]:
    """One seed: the common target and, per method, the time and completions it took to reach it (censored: its
    whole budget, flagged), its best reward, the mean reward over the common time and completion spans, and its
    peak memory."""
    target = target_reward(curves)
    common_seconds = min(curve["train_seconds"].iloc[-1] for curve in curves.values())
    common_samples = min(curve["samples"].iloc[-1] for curve in curves.values())
    rows = {}
    for name, curve in curves.items():
        hit = first_reaching(curve, target)
        rows[name] = {
            "start_reward": curve["eval_reward"].iloc[0],
            "best_reward": curve["eval_reward"].max(),
            "seconds_to_target": curve["train_seconds"].iloc[-1] if hit is None else hit["train_seconds"],
            "samples_to_target": int(curve["samples"].iloc[-1] if hit is None else hit["samples"]),
            "censored": hit is None,
            "mean_reward_over_time": mean_reward_over(curve, "train_seconds", common_seconds),
            "mean_reward_over_samples": mean_reward_over(curve, "samples", common_samples),
            "total_train_seconds": curve["train_seconds"].iloc[-1],
            "total_samples": int(curve["samples"].iloc[-1]),
            "peak_rss_mib": peaks[name],
        }
    return target, pd.DataFrame.from_dict(rows, orient="index")


def seed_row(seed: int, table: pd.DataFrame, target: float, raft: str, grpo: str) -> dict[str, float]:
    """One seed's RAFT / GRPO ratios (time and completions to the target, memory) and RAFT - GRPO areas."""
    r, g = table.loc[raft], table.loc[grpo]
    ratio = {}
    for name, column in (("time_ratio", "seconds_to_target"), ("samples_ratio", "samples_to_target")):
        ratio[name] = r[column] / g[column] if r[column] > 0 and g[column] > 0 else math.nan  # 0: reached at start
    return {
        "seed": seed,
        "target_reward": target,
        **ratio,
        "memory_ratio": r["peak_rss_mib"] / g["peak_rss_mib"],
        "raft_censored": bool(r["censored"]),
        "grpo_censored": bool(g["censored"]),
        "area_difference_time": r["mean_reward_over_time"] - g["mean_reward_over_time"],
        "area_difference_samples": r["mean_reward_over_samples"] - g["mean_reward_over_samples"],
        "raft_seconds_to_target": r["seconds_to_target"],
        "grpo_seconds_to_target": g["seconds_to_target"],
        "raft_peak_rss_mib": r["peak_rss_mib"],
        "grpo_peak_rss_mib": g["peak_rss_mib"],
    }


def claims(per_seed: pd.DataFrame) -> tuple[list[Claim], pd.DataFrame]:
    """The efficiency verdicts: ratios as geometric means with log-t intervals (below 1: RAFT cheaper), areas as
    t-intervals (above 0: RAFT higher); the time ratio is the primary verdict (the paper's RAFT K = 8 took about
    5 h against the fastest PPO's 8.7 h). Also returns them as a table with the censored seeds counted."""
    out, rows = [], []
    for column, label, kind in (
        ("time_ratio", "training time to the common target, RAFT / GRPO", "ratio"),
        ("samples_ratio", "completions to the common target, RAFT / GRPO", "ratio"),
        ("memory_ratio", "peak resident memory, RAFT / GRPO", "ratio"),
        ("area_difference_time", "mean held-out reward over the common training time, RAFT − GRPO", "difference"),
        ("area_difference_samples", "mean held-out reward over the completion budget, RAFT − GRPO", "difference"),
    ):
        values = per_seed[column].dropna()
        if values.empty:
            continue
        if kind == "ratio":
            interval = stats.ratio_ci(values, np.ones(len(values)))
            direction = "down"
        else:
            interval, direction = stats.mean_ci(values), "up"
        paper = "RAFT K=8 ~5 h vs fastest PPO 8.7 h (0.57x)" if column == "time_ratio" else "—"
        out.append(Claim("§4 efficiency", label, paper, interval, direction, primary=column == "time_ratio"))
        rows.append(
            {
                "measure": label,
                "ours": str(interval),
                "interval": interval.label,
                "seeds without a value": int(per_seed[column].isna().sum()),
                "RAFT censored": int(per_seed["raft_censored"].sum()),
                "GRPO censored": int(per_seed["grpo_censored"].sum()),
            }
        )
    return out, pd.DataFrame(rows)
