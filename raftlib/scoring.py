"""The scoring stage: a weighted reward over samples, in resumable, shardable batches (`raftlib.batches`).

The reward is loaded (`setup()`) only when some batch is left to score and freed (`teardown()`) afterwards,
so a resumed run whose scores are all on disk never loads the reward model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from raftlib.batches import Batches, run_batches
from raftlib.records import Sample, Scores
from raftlib.rewards import RewardError, WeightedReward


def text_inputs(batch: Sequence[Sample]) -> tuple[list[str], list[str]]:
    """A text reward's positional arguments: (prompts, completions)."""
    return [s.prompt for s in batch], [s.completion for s in batch]


def score_samples(
    reward: WeightedReward,
    samples: Sequence[Any],
    columns_by_prompt: dict[int, dict[str, Any]],
    *,
    inputs: Callable[[Sequence[Any]], tuple[list[Any], ...]] = text_inputs,
    batch_size: int = 64,
    batches: Batches[Scores] | None = None,
) -> Scores:
    """Score samples in batches of `batch_size`; `batches` says which are done, where new ones go, which are ours.

    `inputs(batch)` gives the reward's positional arguments (text: prompts and completions; images: the images
    and prompts). Data columns reach the reward as keyword lists aligned with the batch. With `batches.indices`
    (one process's shard) the result holds only those batches.
    """
    batches = batches or Batches(description="score")
    column_names = sorted({name for cols in columns_by_prompt.values() for name in cols})

    def draw(index: int, batch: Sequence[Any]) -> Scores:
        columns = {name: [columns_by_prompt.get(s.prompt_id, {}).get(name) for s in batch] for name in column_names}
        try:
            return reward.score(*inputs(batch), **columns)
        except RewardError as exc:
            start = index * batch_size
            saved = index if batches.on_batch is not None else sum(1 for i in batches.completed if i < index)
            raise type(exc)(
                f"{exc} -- while scoring batch {index} (samples {start}..{start + len(batch) - 1}, "
                f"prompt ids {sorted({s.prompt_id for s in batch})[:8]}); "
                f"{saved} earlier batches are saved: fix the reward and resume"
            ) from exc

    pending = batches.pending(-(-len(samples) // batch_size))
    if pending:
        reward.setup()
    try:
        parts = run_batches(samples, batch_size, draw, batches, unit="sample")
    finally:
        if pending:
            reward.teardown()
    return concatenate(parts, reward.names)


def concatenate(parts: dict[int, Scores], names: Sequence[str]) -> Scores:
    """Batch scores in batch order as one Scores."""
    ordered = [parts[index] for index in sorted(parts)]
    return Scores(
        reward=[value for part in ordered for value in part.reward],
        components={name: [value for part in ordered for value in part.components[name]] for name in names},
    )
