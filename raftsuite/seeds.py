"""Run one experiment per seed, resumably: a seed whose result file exists is read back, not recomputed."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

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

    cache_dir: where each seed's rows go (CACHE_DIR/seed_<n>.json, written atomically once fn returns); on a
    rerun, a seed with a file is read back instead of run, so a kill between seeds loses at most the seed
    that was running. Name the setting in the directory (`work_dir / "K8"`): the key is the seed alone.
    params: what the rows depend on besides the seed (the setting, the profile's sizes). Stored with the rows;
    a file made with other params is an error, not a silent stale result.
    """
    frames = []
    for seed in seeds:
        path = None if cache_dir is None else Path(cache_dir) / f"seed_{seed}.json"
        if path is not None and path.is_file():
            saved = json.loads(path.read_text())
            if params is not None and saved.get("params") != json.loads(json.dumps(params)):
                raise ValueError(
                    f"{path} holds seed {seed} computed with params {saved.get('params')}, not {dict(params)}: "
                    "delete it to recompute, or use another cache_dir"
                )
            logger.info("seed %s: read back from %s", seed, path)
            rows = saved["rows"]
        else:
            # Through JSON even without a cache, so a fresh run and a resumed one give identical frames.
            rows = json.loads(json.dumps(_records(fn(seed)), default=_plain))
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".json.tmp")
                tmp.write_text(json.dumps({"seed": seed, "params": params, "rows": rows}, indent=1))
                os.replace(tmp, path)  # all or nothing: a kill mid-write leaves no half result to read back
        frame = pd.DataFrame(rows)
        frame["seed"] = seed
        frames.append(frame[["seed", *(c for c in frame if c != "seed")]])
    if not frames:
        raise ValueError("for_each_seed: no seeds")
    return pd.concat(frames, ignore_index=True)


def _records(result: Rows) -> list[dict[str, Any]]:
    if isinstance(result, pd.DataFrame):
        return json.loads(result.to_json(orient="records"))
    if isinstance(result, Mapping):
        return [dict(result)]
    if isinstance(result, list) and all(isinstance(r, Mapping) for r in result):
        return [dict(r) for r in result]
    raise TypeError(
        f"for_each_seed: fn returned {type(result).__name__}; return a dict, a list of dicts or a DataFrame"
    )


def _plain(value: Any) -> Any:
    """numpy scalars (what pandas and torch hand back) as Python numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"for_each_seed: cannot store {type(value).__name__} {value!r} as JSON")
