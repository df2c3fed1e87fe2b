"""The fine-tune stage's Accelerator, built in one place, and the sharded (FSDP2) path's full-weights gather.

Every fine-tune (the loop's, a direct `finetune()` call, text or diffusion) gets its Accelerator from
`stage_accelerator`, so `training.mixed_precision` and `training.gradient_accumulation_steps` reach all of
them the same way. Under accelerate's FSDP plugin (`examples/accelerate/fsdp.yaml`, `fsdp_version: 2`) the
fine-tune shards parameters, gradients and AdamW state across processes (`torch.distributed.fsdp.fully_shard`);
RAFT then needs the whole policy again to generate, so `full_state_dict` gathers it to the main process
(torch.distributed.checkpoint, full state dict, offloaded to CPU) and the loop writes the iteration's
checkpoint from it once and reloads it on every process.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch

from raftlib.sections import ConfigError, TrainingSection

logger = logging.getLogger(__name__)


def process_state(timeout_minutes: float | None = None):
    """accelerate's view of this process (it starts the process group on first use).

    ACCELERATE_USE_CPU=true, as Accelerator reads it, runs several processes on CPUs (gloo). The timeout is
    how long a collective waits for the slowest process: the others wait while the main process selects and
    evaluates, so it must exceed the longest main-only stage (`loop.process_group_timeout_minutes`).
    It applies only when this call starts the process group.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    kwargs = {"timeout": timedelta(minutes=timeout_minutes)} if timeout_minutes else {}
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"), **kwargs)


def build_accelerator(section: TrainingSection, *, timeout_minutes: float | None = None, **kwargs):
    """An Accelerator for fine-tuning as `section` says (precision), sharded if the launcher asked.

    Extra keyword arguments (log_with, project_dir) go to Accelerator. An accelerate state left in this
    process by an earlier stage with another precision is replaced: accelerate keeps one process-wide state
    and would otherwise refuse the new precision (the suite's SFT and its RAFT run share a kernel).
    """
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

    state = AcceleratorState._shared_state
    if state.get("_mixed_precision") not in (None, section.mixed_precision):
        AcceleratorState._reset_state(reset_partial_state=False)  # the process group stays
    process_state(timeout_minutes)
    handlers = [InitProcessGroupKwargs(timeout=timedelta(minutes=timeout_minutes))] if timeout_minutes else []
    accelerator = Accelerator(
        # raftlib accumulates itself (raftlib.finetune: each step normalised by its tokens); accelerate's own
        # accumulation would divide every micro-batch's loss by the step count on top
        gradient_accumulation_steps=1,
        mixed_precision=section.mixed_precision,
        kwargs_handlers=handlers,
        **kwargs,
    )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and (
        accelerator.distributed_type == DistributedType.MULTI_CPU
    ):
        # accelerate 1.15 applies its FSDP plugin only to accelerator devices and silently falls back to
        # plain data parallelism on CPU processes. FSDP2 itself runs on gloo, so take accelerate's own FSDP2
        # path there too: the CPU tests then exercise exactly what a GPU run does (fully_shard per layer).
        # accelerate copies PartialState's fields into AcceleratorState on every AcceleratorState(): set both.
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* settings
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
    check_supported(accelerator)
    return accelerator


def check_supported(accelerator) -> None:
    """Refuse the distributed engines raftlib cannot run RAFT on, naming what to use instead."""
    kind = accelerator.distributed_type.name
    if kind == "FSDP" and not is_sharded(accelerator):
        raise ConfigError(
            "accelerate's FSDP plugin with fsdp_version 1 is not supported: set fsdp_version: 2 in the accelerate "
            "config file (examples/accelerate/fsdp.yaml); raftlib gathers FSDP2 (fully_shard) weights between stages"
        )
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise ConfigError(
            f"accelerate's {kind} is not supported: RAFT generates with the whole model between fine-tunes, and "
            "raftlib gathers sharded weights for FSDP2 only (DeepSpeed could not be tested here). Use FSDP "
            "(examples/accelerate/fsdp.yaml) to shard a model that does not fit one GPU, or DDP "
            "(examples/accelerate/ddp.yaml) when it fits."
        )


def stage_accelerator(section: TrainingSection, accelerator=None):
    """The Accelerator a fine-tune stage runs under: the one passed in (checked against `section`), or a new one."""
    if accelerator is None:
        return build_accelerator(section)
    if accelerator.mixed_precision != section.mixed_precision:
        raise ConfigError(
            f"training.mixed_precision = {section.mixed_precision!r}, but the accelerator passed to the fine-tune "
            f"runs {accelerator.mixed_precision!r}: build it with raftlib.sharding.build_accelerator(section)"
        )
    if accelerator.gradient_accumulation_steps != 1:
        raise ConfigError(
            f"the accelerator passed to the fine-tune accumulates {accelerator.gradient_accumulation_steps} "
            "micro-batches itself; raftlib accumulates (training.gradient_accumulation_steps): build it with "
            "raftlib.sharding.build_accelerator(section)"
        )
    check_supported(accelerator)
    return accelerator


def is_sharded(accelerator) -> bool:
    """True when the fine-tune shards the model (accelerate's FSDP2): its weights must be gathered afterwards."""
    return accelerator.distributed_type.name == "FSDP" and bool(getattr(accelerator, "is_fsdp2", False))


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of an FSDP2-sharded module, on the main process's CPU; {} on the others.

    A collective: every process must call it. Parameters are all-gathered one at a time and moved to CPU
    (`cpu_offload=True`), so no GPU ever holds the whole model twice.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def plain_class(module: torch.nn.Module) -> type:
    """The module's own class under FSDP2's dynamic `FSDP<Name>` subclass (fully_shard swaps __class__)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))
