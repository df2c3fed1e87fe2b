"""The run in progress and its one stage primitive: what resume, sharding and markers need, in one place.

Every stage of an iteration (generate, score, select, fine-tune, evaluate) has the same shape, so it is
written once here:

    stage = run.stage(iteration, "score", parts=ScoreParts(names))
    if stage.done:                                   # its marker exists: the stage finished before a crash
        return stage.assemble(), stage.metrics       # its output comes back from the run directory
    stage.batches(count)                             # Batches: reuse saved parts, draw this process's share,
                                                     # save each new part before the next starts
    ...run the batches...
    result = stage.assemble()                        # after a barrier: every process's parts, in batch order
    return result, stage.finish(**metrics)           # timing; the main process writes the marker

A stage's output lives in the run directory as per-batch parts (`RUN/iter_t/<stage>/batch_*.parquet`,
written atomically by the process that drew them) and is reassembled from there, on every process, in batch
order: one assembly path whether the run has one process or many, resumed or not. The iteration's metrics
row is the union of its stages' markers (`Run.row`).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from raftlib.batches import Batches
from raftlib.bookkeeping import scores_from_rows, scores_to_rows
from raftlib.records import Scores
from raftlib.scoring import concatenate

if TYPE_CHECKING:
    from raftlib.data import PromptSplits
    from raftlib.modality import Modality
    from raftlib.rewards import WeightedReward
    from raftlib.store import RunStore

Part = TypeVar("Part")

STAGES = ("generate", "score", "select", "finetune", "eval")
"""An iteration's stages, in order; the metrics row is the union of their markers."""


# ----------------------------------------------------------------------------------------------
# How a stage's batches are stored
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleParts:
    """Batches of sample records (text samples or images), stored one row per sample."""

    record: Any
    """The sample type: `record.from_row(row)` rebuilds a sample."""

    def to_rows(self, part: list) -> list[dict[str, Any]]:
        return [sample.to_row() for sample in part]

    def from_rows(self, rows: list[dict[str, Any]]) -> list:
        return [self.record.from_row(row) for row in rows]

    def join(self, parts: Mapping[int, list]) -> list:
        return [sample for index in sorted(parts) for sample in parts[index]]


@dataclass(frozen=True)
class ScoreParts:
    """Batches of rewards (`Scores`), stored one row per sample."""

    names: list[str]
    """The reward's component names."""

    def to_rows(self, part: Scores) -> list[dict[str, Any]]:
        return scores_to_rows(part)

    def from_rows(self, rows: list[dict[str, Any]]) -> Scores:
        return scores_from_rows(rows, self.names)

    def join(self, parts: Mapping[int, Scores]) -> Scores:
        return concatenate(dict(parts), self.names)


# ----------------------------------------------------------------------------------------------
# The processes of a run
# ----------------------------------------------------------------------------------------------


class Processes:
    """The processes of one run under accelerate, and where they meet. With one process all of it is trivial.

    With several: generation, scoring and evaluation are sharded by batch (batch b goes to process b mod N, and
    its samples depend only on (seed, iteration, b), so the union equals a one-process run's); every process
    writes the parts it drew and reads everyone's back (the run directory must be one every process sees: one
    machine, or a shared file system); the main process alone selects and writes run-level files; the
    fine-tune is data-parallel through accelerate (DDP, or FSDP2 as its config file says; raftlib.sharding).
    """

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator
        self.count = accelerator.num_processes
        self.rank = accelerator.process_index
        self.is_main = accelerator.is_main_process

    def owns(self, index: int) -> bool:
        """Whether batch `index` is this process's to draw."""
        return index % self.count == self.rank

    def wait(self) -> None:
        import torch.distributed

        if self.count > 1 and torch.distributed.is_initialized():
            self.accelerator.wait_for_everyone()

    def close(self) -> None:
        """Meet, then end the process group while the interpreter is whole.

        Modules that went through FSDP2 sit in reference cycles holding gloo/NCCL work objects; if the process
        group is destroyed first and those are collected only at interpreter exit, the backend's threads are torn
        down with the interpreter and a finished worker aborts ("terminate called without an active exception",
        SIGABRT: seen once in CI after a LoRA run under FSDP had written everything). Collect them first.
        """
        gc.collect()
        self.wait()
        self.accelerator.end_training()


# ----------------------------------------------------------------------------------------------
# The run in progress, and one stage of it
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One run in progress, as every stage sees it."""

    config: Any
    """RAFTConfig or DiffusionConfig."""
    store: RunStore
    processes: Processes
    modality: Modality
    reward: WeightedReward
    splits: PromptSplits
    """The prompts: train (drawn from each iteration) and eval (held out)."""

    @property
    def is_main(self) -> bool:
        """The main process: the one that selects and writes run-level files (the others write their batches)."""
        return self.processes.is_main

    def stage(self, iteration: int, name: str, parts: SampleParts | ScoreParts | None = None) -> Stage:
        return Stage(self, iteration, name, parts)

    def save_checkpoint(self, iteration: int, policy):
        """Write iteration's checkpoint (the main process) and return the policy every process generates with next.

        FSDP left each process a shard: the whole weights are gathered to the main process once, the checkpoint
        written from them, and every process loads it, so the next policy is exactly what a resumed run would
        load and generation runs no collectives. Every process returns once the checkpoint is on disk.
        """
        from raftlib.sharding import full_state_dict, is_sharded

        directory, modality, store = self.store.checkpoint_dir(iteration), self.modality, self.store
        if is_sharded(self.processes.accelerator):
            weights = full_state_dict(modality.trained_module(policy))
            if self.is_main:
                store.save_model_dir(directory, lambda d: modality.save(policy, d, state_dict=weights))
            del weights, policy
            self.processes.wait()
            policy = modality.load_policy(directory)
        elif self.is_main:
            store.save_model_dir(directory, lambda d: modality.save(policy, d))
        self.processes.wait()
        return policy

    def row(self, iteration: int, **latest: Any) -> dict[str, Any]:
        """The iteration's metrics row: the union of its stages' markers, then `latest` (a stage not yet marked)."""
        row: dict[str, Any] = {"iteration": iteration}
        for name in STAGES:
            row |= (self.store.done(iteration, name) or {}).get("metrics", {})
        row |= latest
        times = [value for key, value in row.items() if key.startswith("time_") and key != "time_iteration_s"]
        row["time_iteration_s"] = sum(v for v in times if isinstance(v, (int, float)))
        return row


class Stage(Generic[Part]):
    """One stage of one iteration (see the module docstring)."""

    def __init__(self, run: Run, iteration: int, name: str, parts: SampleParts | ScoreParts | None) -> None:
        self.run, self.iteration, self.name, self.parts = run, iteration, name, parts
        self.marker = run.store.done(iteration, name)
        self.started = time.perf_counter()
        self.drawn: dict[int, Part] = {}
        """Parts this process drew in this call (not restored)."""

    @property
    def seconds(self) -> float:
        """Time since the stage started in this process."""
        return time.perf_counter() - self.started

    @property
    def done(self) -> bool:
        """The stage finished before: its marker exists."""
        return self.marker is not None

    @property
    def metrics(self) -> dict[str, Any]:
        """The metrics its marker recorded."""
        return (self.marker or {}).get("metrics", {})

    def saved(self) -> dict[int, Part]:
        """The parts in the run directory (any process's), by batch index."""
        rows = self.run.store.load_batches(self.iteration, self.name)
        return {index: self.parts.from_rows(part_rows) for index, part_rows in rows.items()}

    def batches(self, progress: bool | None = None) -> Batches[Part]:
        """How the stage's batches run: reuse the saved parts, draw only this process's, save each new one
        (before the next starts) and keep it in `drawn`."""
        store, parts = self.run.store, self.parts

        def on_batch(index: int, part: Part) -> None:
            store.save_batch(self.iteration, self.name, index, parts.to_rows(part))
            self.drawn[index] = part

        processes = self.run.processes
        return Batches(
            completed=self.saved(),
            on_batch=on_batch,
            owns=processes.owns if processes.count > 1 else None,
            progress=self.run.config.logging.progress_bars if progress is None else progress,
            description=f"{self.name} {self.iteration}",
        )

    def assemble(self):
        """Every process's parts, in batch order, on every process (read back from the run directory once
        every process has written its own)."""
        self.run.processes.wait()
        return self.parts.join(self.saved())

    def finish(self, write: Callable[[], None] | None = None, **metrics: Any) -> dict[str, Any]:
        """Time the stage and mark it done (the main process writes the marker, after `write`, which writes the
        stage's run-level output); the metrics it recorded."""
        metrics = metrics | {f"time_{self.name}_s": self.seconds}
        if self.run.is_main:
            if write is not None:
                write()
            self.run.store.mark_done(self.iteration, self.name, {"metrics": metrics})
        return metrics
