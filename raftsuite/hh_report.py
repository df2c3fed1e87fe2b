"""The hh_rlhf notebook's comparisons and claims, from its per-seed Table 3 rows and per-prompt rows.

Each comparison is a paired difference over seeds (Student-t), shown beside the crossed seeds x prompts interval
from the per-prompt rows (every seed scores the same held-out prompts); the verdicts (`report.Claim`) follow from
the t-interval. One claim per paper table is primary (docs/statistics.md); the rest are exploratory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from raftsuite import stats
from raftsuite.report import Claim

PAPER_TABLE3 = {
    "sft": {"proxy_reward": 0.772, "perplexity": 3.781, "msttr_100": 0.597, "distinct_2": 0.250, "length_words": 145.4},
    "raft": {
        "proxy_reward": 2.294,
        "perplexity": 4.031,
        "msttr_100": 0.611,
        "distinct_2": 0.258,
        "length_words": 156.2,
    },
    "ppo": {"proxy_reward": 2.077},
}
"""Table 3 of Dong et al. 2023 (LLaMA-7B-SFT, RAFT-K32 at lambda 1, PPO beta 0.1): docs/paper.md."""

RATIO_METRICS = ("perplexity",)
"""Metrics compared SFT -> RAFT as a ratio (geometric mean, log-t) rather than a difference."""


def paired_rows(
    per_seed: pd.DataFrame, per_prompt: pd.DataFrame, raft: str, baselines: Mapping[str, str], metrics: Sequence[str]
) -> pd.DataFrame:
    """RAFT minus each baseline per metric: the t-interval over seeds and the crossed seeds x prompts interval
    (per-prompt metrics only), with n and the effect the seeds could detect at 80 % power."""
    by_seed = per_seed.set_index(["method", "seed"])
    rows = []
    for name, baseline in baselines.items():
        for metric in metrics:
            seeds = stats.paired_difference(by_seed.loc[raft][metric], by_seed.loc[baseline][metric])
            crossed = stats.crossed_between(per_prompt, raft, baseline, metric)
            rows.append(
                {
                    "comparison": name,
                    "metric": metric,
                    "t_interval": str(seeds),
                    "n_seeds": seeds.n,
                    "crossed_interval": "—" if crossed is None else str(crossed),
                    "detectable_at_80pct_power": stats.detectable_effect(seeds),
                    "t": seeds,
                }
            )
    return pd.DataFrame(rows)


def table3_claims(paired: pd.DataFrame, directions: pd.DataFrame, hh_data: bool) -> list[Claim]:
    """Every verdict of the notebook. Primary (docs/statistics.md): RAFT above GRPO on the reward that is not
    optimised (tiny: the hidden gold preference; HH-RLHF: the proxy, the only one there), the analogue of the
    paper's RAFT-K32 over PPO (2.294 against 2.077)."""
    primary_metric = "proxy_reward" if hh_data else "gold_reward"
    claims = []
    for row in paired.itertuples():
        paper = f"RAFT {PAPER_TABLE3['raft']['proxy_reward']} vs PPO {PAPER_TABLE3['ppo']['proxy_reward']}"
        if row.metric == "gold_reward":  # the paper has no hidden gold: its only reward is its reward model's
            paper += " (its reward model's; no gold)"
        paper = paper if "GRPO" in row.comparison else "—"
        primary = "GRPO" in row.comparison and row.metric == primary_metric
        claims.append(
            Claim("Table 3", f"{row.comparison}, {row.metric.replace('_', ' ')}", paper, row.t, "up", primary=primary)
        )
    for row in directions.itertuples():
        paper = f"SFT {row.paper_sft} -> RAFT {row.paper_raft}"
        name = row.metric.replace("_", " ") + (" (ratio RAFT / SFT)" if row.metric in RATIO_METRICS else "")
        claims.append(Claim("Table 3", f"SFT -> RAFT, {name}", paper, row.t, row.paper_direction))
    return claims


def sft_to_raft(per_seed: pd.DataFrame, raft: str, sft: str, metrics: Sequence[str]) -> pd.DataFrame:
    """RAFT minus SFT per metric over seeds, beside the paper's SFT -> RAFT-K32 change and its direction.
    Perplexity is compared as a ratio (RAFT / SFT, the t-interval of the log ratio): it is multiplicative, and one
    seed whose text degenerates would otherwise set the whole interval."""
    by_seed = per_seed.set_index(["method", "seed"])
    rows = []
    for metric in metrics:
        compare = stats.ratio_ci if metric in RATIO_METRICS else stats.paired_difference
        interval = compare(by_seed.loc[raft][metric], by_seed.loc[sft][metric])
        before, after = PAPER_TABLE3["sft"][metric], PAPER_TABLE3["raft"][metric]
        direction = stats.paper_direction(before, after)
        rows.append(
            {
                "metric": metric,
                "paper_sft": before,
                "paper_raft": after,
                "paper_direction": direction,
                "ours": str(interval) + (" (RAFT / SFT)" if metric in RATIO_METRICS else " (RAFT − SFT)"),
                "n_seeds": interval.n,
                "verdict": stats.verdict(interval, direction),
                "t": interval,
            }
        )
    return pd.DataFrame(rows)


def visible(frame: pd.DataFrame) -> pd.DataFrame:
    """A comparison table without its interval objects (column `t`; for display and CSV)."""
    return frame.drop(columns=["t"])


def fluency_check(per_seed: pd.DataFrame, sft: str, trained: Sequence[str]) -> str:
    """Markdown to read before any reward number: per trained method, its held-out perplexity as a multiple of
    the SFT model's (geometric mean over seeds with its 95 % log-t interval), its distinct-2 and, where recorded,
    its gold reward beside the SFT model's. A policy whose text collapsed can win the proxy by hacking it."""
    by_seed = per_seed.set_index(["method", "seed"])
    paper = PAPER_TABLE3["raft"]["perplexity"] / PAPER_TABLE3["sft"]["perplexity"]
    sft_rows = by_seed.loc[sft]
    has_gold = "gold_reward" in by_seed and bool(by_seed["gold_reward"].notna().any())  # tiny only
    lines = [
        f"**Fluency check**, held-out perplexity over the SFT model's as a geometric mean [95 % t-interval of the "
        f"log ratio, n = {sft_rows.shape[0]} seeds] (the paper's RAFT ends at {paper:.2f} x; SFT here: distinct-2 "
        f"{sft_rows['distinct_2'].mean():.2f}"
        + (f", gold {sft_rows['gold_reward'].mean():+.3f}" if has_gold else "")
        + "):"
    ]
    for method in trained:
        rows = by_seed.loc[method]
        ratio = stats.ratio_ci(rows["perplexity"], sft_rows["perplexity"])
        line = f"- {method}: perplexity x {ratio} of SFT's, distinct-2 {rows['distinct_2'].mean():.2f}"
        if has_gold:
            line += f", gold {rows['gold_reward'].mean():+.3f}"
        lines.append(line)
    return "\n".join(lines)
