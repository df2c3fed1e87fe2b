"""How a run starts: its directory opened and locked, its config checked against what it holds, and the run in
progress (`raftlib.stage.Run`) assembled: accelerator, processes, modality, prompts, reward.

Kept out of `raftlib.loop` so the loop reads as the algorithm; nothing here decides what RAFT does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raftlib.bookkeeping import config_diff, setup_logging
from raftlib.config import load_config
from raftlib.data import load_prompts
from raftlib.modality import modality_for
from raftlib.plan import Hardware, check_fits
from raftlib.rewards import WeightedReward, build_reward
from raftlib.sharding import build_accelerator, is_sharded, process_state
from raftlib.stage import Processes, Run
from raftlib.store import RunDirError, RunStore

logger = logging.getLogger("raftlib")


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    metrics: list[dict[str, Any]]
    """metrics.jsonl as a list (row 0 is the initial model's evaluation)."""
    final_dir: Path


def holds_same_run(store: RunStore, config) -> bool:
    """Whether `store` already holds a run of this config (then it is resumed, not restarted).

    A run directory holding a different config raises RunDirError naming the keys that differ: a run is
    never continued under settings it did not start with.
    """
    if not store.has_run():
        return False
    saved = load_config(store.config_path)
    if saved != config:
        changed = config_diff(saved.to_dict(), config.to_dict())
        raise RunDirError(
            f"{store.root} holds a run with a different config ({', '.join(changed)}); "
            "use another output_dir, or resume it with `python -m raftlib resume`"
        )
    return True


@contextmanager
def open_run(run_dir: str | Path, config=None) -> Iterator[tuple[Any, RunStore]]:
    """The run directory, locked by the main process while the run writes it, and the run's config.

    With `config` (a new run, or the same run again) the directory's config must be this one or absent; without
    (resume) the directory's config is the run's.
    """
    store = RunStore(run_dir)
    if config is None:
        if not store.has_run():
            raise RunDirError(f"{run_dir} has no config.yaml: it is not a raftlib run directory")
        config = load_config(store.config_path)
    setup_logging(config.logging.level)
    # Under `accelerate launch`, one of several processes; the first call starts the process group.
    main_process = process_state(config.loop.process_group_timeout_minutes).is_main_process
    if main_process:
        store.lock()
    try:
        if main_process and not store.has_run():
            store.write_config(config.to_yaml())
        elif main_process and holds_same_run(store, config):
            logger.info("%s already holds this run: resuming it", store.root)
        process_state().wait_for_everyone()
        yield config, store
    finally:
        if main_process:
            store.unlock()


def start_run(config, store: RunStore, reward: WeightedReward | None) -> Run:
    """The accelerator, processes, modality, prompts and reward of a run; logs what the run will do."""
    # The fine-tune's precision and sharding (DDP or FSDP2, as the accelerate config file says).
    accelerator = build_accelerator(
        config.training,
        timeout_minutes=config.loop.process_group_timeout_minutes,
        log_with="tensorboard" if config.logging.tensorboard else None,
        project_dir=str(store.root),
    )
    processes = Processes(accelerator)
    if accelerator.device.type == "cuda":  # refuse what clearly cannot fit before loading anything
        check_fits(config, Hardware.detect(processes.count))
    if not processes.is_main:
        logger.setLevel(logging.WARNING)  # one process reports; the others only warn
    if config.logging.tensorboard:
        accelerator.init_trackers("tensorboard")
    logger.info("derived sizes: %s", config.derived())
    if processes.count > 1:
        logger.info(
            "%d processes: generation, scoring and evaluation sharded by batch; each optimizer step's micro-batches "
            "dealt out over them (global batch = micro_batch_size x %d x gradient_accumulation_steps)",
            *(processes.count, processes.count),
        )
    if is_sharded(accelerator):
        logger.info(
            "sharded fine-tune (FSDP2): parameters, gradients and optimizer state split over %d processes; after "
            "each stage the main process gathers the full weights and writes the checkpoint every process reloads",
            processes.count,
        )
    # What is generated and trained (text or images) is the modality's business; the loop is the same.
    modality = modality_for(config, accelerator.device)
    splits = modality.prepare(load_prompts(config.data, config.seed))
    return Run(config, store, processes, modality, reward or build_reward(config.reward), splits)
