"""Memory and time planner: the peak memory per process and the time per iteration of each RAFT stage, estimated.

    python -m raftlib plan CONFIG.yaml [--gpus N] [--gpu-memory GiB] [--gpu-tflops T] [--gpu-bandwidth GBps]

Reads the model's config.json only (no weights): a local model dir, `--model-config PATH`, or a small table
of known shapes for the hub ids of the `paper` profile (`KNOWN_SHAPES`). Parameter counts are exact (the
model is built on PyTorch's meta device, which allocates nothing); everything else is arithmetic on the
config, written out term by term so a reader can check it (docs/scale.md has the formulas). These are
ESTIMATES: activations, efficiency and overheads are modelled, not measured, and each assumption is named
in `ASSUMPTIONS`. `check_fits` refuses only what clearly cannot fit (estimate > CLEARLY x the memory).

This module is the dispatch: `plan` hands a config to its modality's planner (raftlib.text.plan for language
models, raftlib.diffusion.plan for images), both built on the primitives of raftlib.estimates, which it
re-exports for callers.
"""

from __future__ import annotations

import logging
import os
from typing import Literal

from raftlib.diffusion.plan import plan_diffusion
from raftlib.estimates import (
    ASSUMPTIONS,
    CLEARLY,
    KNOWN_SHAPES,
    PRESETS,
    RUNTIME_OVERHEAD_BYTES,
    TRAIN_MFU,
    GiB,
    Hardware,
    Plan,
    StageEstimate,
    Term,
)
from raftlib.sections import ConfigError
from raftlib.text.plan import plan_text

__all__ = [
    "ASSUMPTIONS",
    "CLEARLY",
    "KNOWN_SHAPES",
    "PRESETS",
    "RUNTIME_OVERHEAD_BYTES",
    "TRAIN_MFU",
    "GiB",
    "Hardware",
    "Plan",
    "StageEstimate",
    "Term",
    "check_fits",
    "plan",
]

logger = logging.getLogger(__name__)


def _sharding_from_environment() -> Literal["ddp", "fsdp"]:
    return "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" else "ddp"


def plan(
    config,
    hardware: Hardware,
    *,
    sharding: Literal["auto", "ddp", "fsdp"] = "auto",
    model_config: str | None = None,
    reward_config: str | None = None,
    prompt_tokens: int | None = None,
) -> Plan:
    """Estimate every stage of one iteration of `config` (a RAFTConfig or a DiffusionConfig) on `hardware`.

    `sharding`: the fine-tune's strategy (auto: FSDP when launched with accelerate's FSDP plugin, else DDP);
    the other one is shown as an alternative row. `model_config` / `reward_config` override where the
    policy's / reward model's config.json is read; `prompt_tokens` overrides the assumed prompt length.
    """
    chosen = _sharding_from_environment() if sharding == "auto" else sharding
    if getattr(config, "modality", "text") == "image":
        return plan_diffusion(config, hardware, chosen, model_config=model_config)
    return plan_text(config, hardware, chosen, model_config, reward_config, prompt_tokens)


def check_fits(config, hardware: Hardware, **kwargs) -> None:
    """Raise ConfigError naming the setting to change when a stage clearly cannot fit (estimate > CLEARLY x memory).

    A config the planner cannot read (a model type transformers does not know, a hub id without a known shape)
    is not refused: the check is skipped with a warning, since only a clear estimate may stop a run.
    """
    try:
        estimate = plan(config, hardware, **kwargs)
    except Exception as exc:  # the planner's limits must not stop a run that may well fit
        logger.warning("memory planner skipped: %s", exc)
        return
    memory = hardware.gpu_memory_gib * GiB
    for stage in estimate.chosen:
        if stage.memory_bytes > CLEARLY * memory:
            raise ConfigError(
                f"{stage.key}: the {stage.stage} stage needs about {stage.memory_bytes / GiB:.1f} GiB per process "
                f"(estimate), more than the {hardware.gpu_memory_gib:.1f} GiB of each GPU "
                f"({hardware.gpus} x {hardware.name}); change {stage.key}. "
                "See `python -m raftlib plan CONFIG` for the terms."
            )
