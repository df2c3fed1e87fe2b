"""Prompt sources (JSONL, Parquet, CSV, a Hugging Face dataset), the eval split, per-iteration prompts.

Errors name the file and line (JSONL), or the file and row (Parquet, CSV, datasets).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raftlib.records import Prompt
from raftlib.sections import DataSection

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Prompt data is unreadable or malformed; the message names the file and line or row."""


@dataclass(frozen=True)
class PromptSplits:
    train: list[Prompt]
    eval: list[Prompt]
    dropped: int = 0
    """Prompts left out when the data was prepared (too long for the model's context; see the log)."""


def read_rows(source: str, split: str = "train") -> tuple[list[dict[str, Any]], str]:
    """All rows of a prompt source, and the unit that locates a row in errors ("line" or "row")."""
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".parquet", ".csv") and not path.is_file():
        raise DataError(f"data.prompts: file not found: {source}")
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path), "line"
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist(), "row"
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc
    if suffix == ".csv":
        import pandas as pd

        try:
            frame = pd.read_csv(
                path, encoding="utf-8", keep_default_na=False, dtype=str
            )  # CSV has no types: "007" stays "007"
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
        return frame.to_dict(orient="records"), "row"
    # Anything else is a Hugging Face dataset: a local dataset dir, or a hub name (network).
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as exc:
        raise DataError(f"data.prompts: cannot load dataset {source!r} split {split!r}: {exc}") from exc
    return dataset.to_list(), "row"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{number}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append({"__line__": number, **row})
    return rows


def rows_to_prompts(rows: Sequence[dict[str, Any]], column: str, source: str, unit: str) -> list[Prompt]:
    """Rows -> Prompts; every other column rides along for the reward."""
    prompts = []
    for index, row in enumerate(rows):
        where = f"{source}:{row['__line__']}" if "__line__" in row else f"{source} {unit} {index}"
        if column not in row:
            known = ", ".join(sorted(k for k in row if k != "__line__"))
            raise DataError(f"{where}: no column {column!r} (data.prompt_column); columns are: {known}")
        text = row[column]
        if not isinstance(text, str):
            raise DataError(f"{where}: {column!r} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise DataError(f"{where}: empty prompt in column {column!r}")
        columns = {k: v for k, v in row.items() if k not in (column, "__line__")}
        prompts.append(Prompt(prompt_id=index, text=text, columns=columns))
    return prompts


def load_prompts(section: DataSection, seed: int = 0) -> PromptSplits:
    """Read prompts and hold out `eval_prompts` of them (after a shuffle seeded by `seed`), or, with
    `data.eval_file`, train on every prompt and evaluate on every row of that file."""
    rows, unit = read_rows(section.prompts, section.split)
    prompts = rows_to_prompts(rows, section.prompt_column, section.prompts, unit)
    if section.eval_file:
        eval_rows, eval_unit = read_rows(section.eval_file, section.split)
        held_out = rows_to_prompts(eval_rows, section.prompt_column, section.eval_file, eval_unit)
        logger.info(
            "prompts: %d train from %s, %d held out from %s",
            len(prompts),
            section.prompts,
            len(held_out),
            section.eval_file,
        )
        return PromptSplits(train=prompts, eval=held_out)
    if section.eval_prompts >= len(prompts):
        raise DataError(
            f"data.eval_prompts = {section.eval_prompts} leaves no training prompt out of {len(prompts)} in {section.prompts}"
        )
    order = np.random.default_rng([seed, 7]).permutation(len(prompts))
    eval_ids = set(order[: section.eval_prompts].tolist())
    train = [p for p in prompts if p.prompt_id not in eval_ids]
    held_out = [p for p in prompts if p.prompt_id in eval_ids]
    logger.info("prompts: %d train, %d held out for eval, from %s", len(train), len(held_out), section.prompts)
    return PromptSplits(train=train, eval=held_out)


def prompts_for_iteration(train: Sequence[Prompt], iteration: int, count: int, seed: int) -> list[Prompt]:
    """The b prompts of iteration t (1-based): consecutive slices of seeded per-pass shuffles.

    Every prompt is used once per pass over the data before any repeats; a pass boundary inside an
    iteration wraps into the next shuffle. Depends only on (seed, iteration), so resume is exact.
    """
    size = len(train)
    start = (iteration - 1) * count
    orders: dict[int, np.ndarray] = {}
    chosen = []
    for position in range(start, start + count):
        data_pass, offset = divmod(position, size)
        if data_pass not in orders:
            orders[data_pass] = np.random.default_rng([seed, 11, data_pass]).permutation(size)
        chosen.append(train[int(orders[data_pass][offset])])
    return chosen


def columns_by_prompt(prompts: Sequence[Prompt]) -> dict[int, dict[str, Any]]:
    return {p.prompt_id: p.columns for p in prompts}


def load_external_samples(path: str) -> dict[int, list[str]]:
    """Extra candidates from a .jsonl/.parquet/.csv with `prompt_id` and `completion` columns.

    `prompt_id` refers to the row index of the prompt in `data.prompts`; the candidates join that
    prompt's pool whenever it is sampled (the paper's off-policy distillation, Table 8).
    """
    rows, unit = read_rows(path)
    pool: dict[int, list[str]] = {}
    for index, row in enumerate(rows):
        where = f"{path}:{row['__line__']}" if "__line__" in row else f"{path} {unit} {index}"
        prompt_id, completion = row.get("prompt_id"), row.get("completion")
        if isinstance(prompt_id, bool) or not isinstance(prompt_id, int):
            raise DataError(f"{where}: selection.external_samples rows need an integer prompt_id")
        if not isinstance(completion, str):
            raise DataError(f"{where}: selection.external_samples rows need a string completion")
        pool.setdefault(prompt_id, []).append(completion)
    return pool
