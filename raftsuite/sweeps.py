"""Learning-rate sweeps chosen on validation, extended until the choice is interior: one rule for every method.

    sweep = sweep_until_interior({"raft": [1e-4, 2e-4, 4e-4], "grpo": [2e-5, 5e-5]}, score)
    chosen_rates(sweep)                                   # {"raft": 2e-4, "grpo": 5e-5}

`score(method, learning_rate)` makes (or reads from its cache) one run and returns its row: at least
`validation_reward`, the score on validation prompts that no run trains on and no report shows, and optionally
`admissible` (a constraint the run must meet to be chosen at all, e.g. that it did not wreck the language model;
`raftsuite.hh_methods` uses validation perplexity). A grid whose best admissible value sits at one of its ends is
extended past that end (x 2 or / 2) and swept again, so no method is compared at a learning rate that is only the
largest (or smallest) one tried.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd

Score = Callable[[str, float], Mapping[str, Any]]


def learning_rate_sweep(grids: Mapping[str, Sequence[float]], score: Score) -> pd.DataFrame:
    """One row per (method, learning_rate) of each grid, with `chosen` and `interior` (`mark_chosen`)."""
    rows = []
    for method, rates in grids.items():
        if not rates:
            raise ValueError(f"learning_rate_sweep: no learning rates for {method}")
        for rate in sorted(float(r) for r in rates):
            rows.append({"method": method, "learning_rate": rate} | dict(score(method, rate)))
    return mark_chosen(pd.DataFrame(rows))


def mark_chosen(sweep: pd.DataFrame) -> pd.DataFrame:
    """Add `chosen` (per method, the highest validation reward among its `admissible` rows when that column is
    there, else among all; a tie keeps the lower rate; a method with no admissible row takes its lowest rate, so
    the grid extends downwards) and `interior` (the method's chosen rate lies strictly between the ends of its
    grid: a best admissible rate just below an inadmissible one is interior)."""
    sweep = sweep.sort_values(["method", "learning_rate"], kind="stable").reset_index(drop=True)
    admissible = sweep["admissible"].astype(bool) if "admissible" in sweep else pd.Series(True, index=sweep.index)
    # inadmissible rows rank below every admissible one; among none admissible, the lowest rate wins the tie
    ranked = sweep["validation_reward"].where(admissible, -float("inf"))
    best = set(ranked.groupby(sweep["method"], sort=False).idxmax().tolist())
    interior = {}
    for method, group in sweep.groupby("method", sort=False):
        rate = float(group.loc[group.index.isin(best), "learning_rate"].iloc[0])
        interior[method] = bool(group["learning_rate"].min() < rate < group["learning_rate"].max())
    return sweep.assign(chosen=sweep.index.isin(best), interior=sweep["method"].map(interior))


def chosen_rates(sweep: pd.DataFrame) -> dict[str, float]:
    """{method: the learning rate the sweep chose on validation}."""
    return {row.method: float(row.learning_rate) for row in sweep[sweep["chosen"]].itertuples()}


def extend_grid(sweep: pd.DataFrame, method: str, factor: float = 2.0) -> list[float] | None:
    """The method's grid with one more rate beyond the end its chosen rate sits on (x factor or / factor), or
    None when the chosen rate is interior, or the grid is one fixed rate (no choice to make)."""
    rows = sweep[sweep["method"] == method]
    rates = sorted(rows["learning_rate"].tolist())
    chosen = float(rows[rows["chosen"]]["learning_rate"].iloc[0])
    if len(rates) == 1 or rates[0] < chosen < rates[-1]:
        return None
    return [*rates, rates[-1] * factor] if chosen == rates[-1] else [rates[0] / factor, *rates]


def sweep_until_interior(grids: Mapping[str, Sequence[float]], score: Score, max_extensions: int = 3) -> pd.DataFrame:
    """`learning_rate_sweep`, extending each method's grid (`extend_grid`) until its chosen rate is interior or
    `max_extensions` rates were added; the returned rows say which methods stayed at an end (`interior`)."""
    grids = {method: list(rates) for method, rates in grids.items()}
    for _ in range(max_extensions):
        sweep = learning_rate_sweep(grids, score)
        extended = {m: extend_grid(sweep, m) for m in grids}
        if all(grid is None for grid in extended.values()):
            return sweep
        grids = {m: grid or grids[m] for m, grid in extended.items()}
    return learning_rate_sweep(grids, score)
