"""The one resumable, shardable batch loop under every stage that works in batches.

Generation (eager, static, vLLM, images) and scoring all do the same thing: split the work into batches of a
fixed size, skip the batches another process owns, take the batches a crashed run already finished from the run
directory, draw the rest, hand each new batch to the run store before going on, and keep a progress bar. Only
the draw differs, so each of them is a `draw(index, batch)` function run by `run_batches`; a new backend writes
its draw and gets resume and sharding right by construction.

A batch's result may depend only on its index and contents (the decoders seed each batch from
(seed, stream, index)), so a batch drawn again after a crash equals the one that was lost.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class Batches(Generic[Result]):
    """How a stage runs its batches: what is already done, where new ones go, which are this process's.

    The default runs every batch, persists nothing and shows a bar: what a direct call from a notebook wants.
    """

    completed: Mapping[int, Result] = field(default_factory=dict)
    """Batches restored from the run directory, by index: reused, never drawn again."""
    on_batch: Callable[[int, Result], None] | None = None
    """Called with (index, result) after each newly drawn batch, before the next one starts (the store saves it)."""
    owns: Callable[[int], bool] | None = None
    """Whether batch `index` is this process's to draw (batch b belongs to process b mod N); None: every batch.
    Batches another process owns are absent from the result."""
    progress: bool = True
    """A tqdm bar (terminal and Jupyter; off when stderr is not a terminal)."""
    description: str = ""
    """The bar's label."""

    def mine(self, index: int) -> bool:
        return self.owns is None or self.owns(index)

    def pending(self, batch_count: int) -> list[int]:
        """The indices this process still has to draw."""
        return [i for i in range(batch_count) if self.mine(i) and i not in self.completed]


def split(items: Sequence[Item], batch_size: int) -> list[Sequence[Item]]:
    """Consecutive batches of `batch_size` items (the last may be shorter)."""
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size}: must be >= 1")
    return [items[start : start + batch_size] for start in range(0, len(items), batch_size)]


def run_batches(
    items: Sequence[Item],
    batch_size: int,
    draw: Callable[[int, Sequence[Item]], Result],
    batches: Batches[Result] | None = None,
    *,
    unit: str = "item",
) -> dict[int, Result]:
    """`draw(index, batch)` for every batch this process owns and has not finished; results by index, in order.

    Batches another process owns are absent from the result; completed ones come back as they were saved.
    """
    from tqdm.auto import tqdm

    batches = batches or Batches()
    parts = split(items, batch_size)
    results: dict[int, Result] = {}
    # disable=None: bars in terminals and Jupyter, none when stderr is a log file (CI, make > log)
    bar = tqdm(
        total=len(items),
        desc=batches.description or None,
        unit=unit,
        disable=None if batches.progress else True,
        leave=False,
    )
    try:
        for index, batch in enumerate(parts):
            if batches.mine(index):
                if index in batches.completed:
                    results[index] = batches.completed[index]
                else:
                    results[index] = draw(index, batch)
                    if batches.on_batch is not None:
                        batches.on_batch(index, results[index])
            bar.update(len(batch))
    finally:
        bar.close()
    return results


def flatten(results: Mapping[int, Sequence[Any]]) -> list[Any]:
    """The items of list-valued batch results, in batch order."""
    return [item for index in sorted(results) for item in results[index]]
