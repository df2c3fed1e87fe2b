"""Run one experiment per seed, resumably: a seed whose result file exists is read back, not recomputed."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from raftsuite.cache import as_json, cached

logger = logging.getLogger(__name__)

Rows = Mapping[str, Any] | list[Mapping[str, Any]] | pd.DataFrame


def for_each_seed(
    seeds: Iterable[int],
    fn: Callable[[int], Rows],
    cache_dir: str | Path | None = None,
    params: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Call fn(seed) for each seed and stack what it returns (a row, a list of rows or a DataFrame) into one
    DataFrame with a `seed` column, in the order of `seeds`.

    cache_dir: where each seed's rows go (CACHE_DIR/seed_<n>.json, through `raftsuite.cache`); on a rerun, a seed
    whose file was made with the same `params` is read back instead of run, so a kill between seeds loses at
    most the seed that was running, and a seed made with other params is recomputed. params: what the rows
    depend on besides the seed (the setting, the profile's sizes, the models).
    """
    frames = []
    for seed in seeds:

        def compute(seed: int = seed) -> list[dict[str, Any]]:
            return _records(fn(seed))

        if cache_dir is None:
            rows = as_json(compute())  # through JSON even without a cache: fresh and resumed frames are identical
        else:
            rows = cached(Path(cache_dir) / f"seed_{seed}.json", {"seed": seed, **(params or {})}, compute)
        frame = pd.DataFrame(rows)
        frame["seed"] = seed
        frames.append(frame[["seed", *(c for c in frame if c != "seed")]])
    if not frames:
        raise ValueError("for_each_seed: no seeds")
    return pd.concat(frames, ignore_index=True)


def _records(result: Rows) -> list[dict[str, Any]]:
    if isinstance(result, pd.DataFrame):
        return as_json(result.to_dict(orient="records"))
    if isinstance(result, Mapping):
        return [dict(result)]
    if isinstance(result, list) and all(isinstance(r, Mapping) for r in result):
        return [dict(r) for r in result]
    raise TypeError(
        f"for_each_seed: fn returned {type(result).__name__}; return a dict, a list of dicts or a DataFrame"
    )
