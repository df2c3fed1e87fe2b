"""The reasoning notebook's comparisons, claims, tables and figure, from its per-iteration and per-problem rows.

Every comparison is paired by seed (the same seed: the same base evaluation draws, the same prompt order) with a
Student-t interval over seeds, shown beside the crossed seeds x problems interval from the per-problem rows (every
seed scores the same held-out problems). One claim is primary (docs/statistics.md): RAFT++ above RAFT at the
end, the paper's 56.1 against 52.3; the rest are exploratory.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from raftsuite import plots, stats
from raftsuite.reasoning import PAPER
from raftsuite.report import Claim

MEASURES = ("pass_at_1", "pass_at_n", "entropy", "unparsable", "kept")


def at_iterations(frame: pd.DataFrame, first: int, last: int, metric: str) -> pd.DataFrame:
    """{method: per-seed mean of `metric` over iterations first..last} as a seeds x methods frame."""
    window = frame[(frame["iteration"] >= first) & (frame["iteration"] <= last)]
    return window.pivot_table(index="seed", columns="method", values=metric, aggfunc="mean")


def _crossed(problems: pd.DataFrame, ours: str, baseline: str, metric: str, first: int, last: int):
    """The seeds x problems interval of ours - baseline (`baseline` "base": iteration 0 of `ours`' runs)."""
    window = problems[(problems["iteration"] >= first) & (problems["iteration"] <= last)]
    mine = window[window["method"] == ours].groupby(["seed", "problem"])[metric].mean()
    if baseline == "base":
        theirs = (
            problems[(problems["method"] == ours) & (problems["iteration"] == 0)]
            .groupby(["seed", "problem"])[metric]
            .mean()
        )
    else:
        theirs = window[window["method"] == baseline].groupby(["seed", "problem"])[metric].mean()
    wide = pd.DataFrame({"ours": mine, "baseline": theirs}).dropna().reset_index().rename(columns={"problem": "prompt"})
    return stats.crossed_paired_difference(wide, "ours", "baseline") if not wide.empty else None


def comparison(
    frame: pd.DataFrame, problems: pd.DataFrame, ours: str, baseline: str, metric: str, first: int, last: int
) -> dict:
    """ours - baseline of `metric` averaged over iterations first..last, seed by seed (baseline "base": the base
    model, iteration 0 of the same seed): the t-interval over seeds and the crossed seeds x problems interval."""
    window = at_iterations(frame, first, last, metric)
    before = at_iterations(frame, 0, 0, metric)[ours] if baseline == "base" else window[baseline]
    interval = stats.paired_difference(window[ours], before)
    crossed = _crossed(problems, ours, baseline, metric, first, last) if metric in problems else None
    when = f"iteration {last}" if first == last else f"iterations {first}-{last}"
    return {
        "comparison": f"{ours} - {baseline}",
        "metric": metric,
        "when": when,
        "t_interval": str(interval),
        "n_seeds": interval.n,
        "crossed_interval": "—" if crossed is None else str(crossed),
        "detectable_at_80pct_power": stats.detectable_effect(interval),
        "t": interval,
    }


PAPER_PAIRS = {
    ("RAFT++", "RAFT"): ("up", True),
    ("GRPO", "RAFT"): ("up", False),
    ("GRPO", "RAFT++"): ("up", False),
    ("RAFT", "base"): ("up", False),
    ("RAFT++", "base"): ("up", False),
    ("GRPO", "base"): ("up", False),
}
"""(ours, baseline): the paper's direction at the end (v2: base 23.6, RAFT 52.3, RAFT++ 56.1, GRPO 56.3) and whether
the claim is primary."""


def final_comparisons(frame: pd.DataFrame, problems: pd.DataFrame, methods: Sequence[str]) -> pd.DataFrame:
    """Every paper pair and RAFT against its random control, on pass@1 at the last iteration."""
    last = int(frame["iteration"].max())
    pairs = [*PAPER_PAIRS, ("RAFT", "random")]
    rows = [
        comparison(frame, problems, a, b, "pass_at_1", last, last)
        for a, b in pairs
        if a in methods and (b == "base" or b in methods)
    ]
    return pd.DataFrame(rows)


def pattern_comparisons(frame: pd.DataFrame, problems: pd.DataFrame, method: str, early: int) -> pd.DataFrame | None:
    """The paper's entropy story for `method` against GRPO, as three paired changes: ahead early (mean pass@1 over
    the evaluated iterations 1..early), entropy below GRPO's at the end, and its lead shrinking from early to the
    end (the early difference minus the final one > 0: GRPO catches up). With `loop.eval_every` an early window
    may hold no evaluation: it then ends at the first evaluated iteration. None when the only evaluated iteration
    after the base is the last one (no "early" to compare with: a run too short for the story)."""
    last = int(frame["iteration"].max())
    evaluated = sorted(int(i) for i in set(frame["iteration"]) if i > 0)
    early = max([i for i in evaluated if i <= early] or evaluated[:1])
    if early >= last:
        return None
    lead = comparison(frame, problems, method, "GRPO", "pass_at_1", 1, early)
    entropy = comparison(frame, problems, method, "GRPO", "entropy", last, last)
    early_gap = at_iterations(frame, 1, early, "pass_at_1")
    final_gap = at_iterations(frame, last, last, "pass_at_1")
    shrink = stats.paired_difference(early_gap[method] - early_gap["GRPO"], final_gap[method] - final_gap["GRPO"])
    shrinking = {
        "comparison": f"({method} - GRPO) early minus at the end",
        "metric": "pass_at_1",
        "when": f"iterations 1-{early} vs {last}",
        "t_interval": str(shrink),
        "n_seeds": shrink.n,
        "crossed_interval": "—",
        "detectable_at_80pct_power": stats.detectable_effect(shrink),
        "t": shrink,
    }
    frame = pd.DataFrame([lead, entropy, shrinking])
    frame["paper_direction"] = ["up", "down", "up"]
    frame["verdict"] = [stats.verdict(row.t, row.paper_direction) for row in frame.itertuples()]
    return frame


def pattern_verdict(pattern: pd.DataFrame) -> str:
    """'appears' when all three parts reproduce, 'does not appear' when any is opposite, else 'not resolved'."""
    verdicts = set(pattern["verdict"])
    if verdicts == {stats.REPRODUCES}:
        return "appears"
    return "does not appear" if stats.OPPOSITE in verdicts else stats.NOT_RESOLVED


def claims(final: pd.DataFrame, patterns: dict[str, pd.DataFrame]) -> list[Claim]:
    """Every verdict: the paper's final ordering (primary: RAFT++ above RAFT), RAFT above random (the suite's
    control, not in the paper), and each part of the entropy story."""
    out = []
    for row in final.itertuples():
        ours, baseline = row.comparison.split(" - ")
        direction, primary = PAPER_PAIRS.get((ours, baseline), ("up", False))
        paper_values = {"base": PAPER["rows"]["base"], **PAPER["rows"]}
        paper = (
            f"{ours} {paper_values[ours]} vs {baseline} {paper_values[baseline]}" if baseline in paper_values else "—"
        )
        out.append(
            Claim(
                "Reasoning: RAFT++ table",
                f"{ours} above {baseline}, held-out pass@1 ({row.when})",
                paper,
                row.t,
                direction,
                primary=primary,
            )
        )
    texts = {"up": "above", "down": "below"}
    for pattern in patterns.values():
        for row in pattern.itertuples():
            out.append(
                Claim(
                    "Reasoning: entropy",
                    f"{row.comparison} {texts[row.paper_direction]} 0, {row.metric} ({row.when})",
                    "described, no number",
                    row.t,
                    row.paper_direction,
                )
            )
    return out


def paper_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table (v2, percent) beside ours (pass@1 in percent at the last iteration: mean [95 % t-interval
    over seeds]); the base row is iteration 0."""
    last = int(frame["iteration"].max())
    rows = [{"row": name, "paper v2 (%)": value} for name, value in PAPER["rows"].items()]
    table = pd.DataFrame(rows).set_index("row")
    ours = {}
    base = frame[frame["iteration"] == 0].groupby("seed")["pass_at_1"].first()
    ours["base"] = stats.mean_ci(100 * base)
    for method, group in frame[frame["iteration"] == last].groupby("method"):
        ours[method] = stats.mean_ci(100 * group["pass_at_1"])
    table[f"ours (%), iteration {last}"] = [
        stats.format_interval(ours[r].mean, ours[r].low, ours[r].high, 1) if r in ours else "—" for r in table.index
    ]
    table["seeds"] = [ours[r].n if r in ours else None for r in table.index]
    return table.astype({"seeds": "Int64"})


PANELS = (
    ("pass_at_1", "held-out pass@1"),
    ("pass_at_n", "held-out pass@n"),
    ("entropy", "policy entropy (nats/token)"),
    ("kept", "kept samples per iteration"),
)


def plot_curves(frame: pd.DataFrame, n: int):
    """Four panels over iterations (thin: one seed; thick: the mean over seeds with its 95 % t-interval band)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.4))
    for ax, (column, title) in zip(axes.ravel(), PANELS, strict=True):
        data = frame.dropna(subset=[column])
        title = title.replace("pass@n", f"pass@{n}")
        plots.plot_iteration_bands(data, column, title, title, hue="method", xlabel="iteration", ax=ax)
    fig.tight_layout()
    return fig
