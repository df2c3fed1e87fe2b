"""Which config a file is: `modality: image` makes it a DiffusionConfig, anything else a RAFTConfig.

This module sits above both kinds: the shared sections and the YAML reading are `raftlib.sections`, the
language-model config is `raftlib.text.config`, the image config `raftlib.diffusion.config`; neither imports
this module. Every config name is importable from here.
"""

from __future__ import annotations

from pathlib import Path

from raftlib.diffusion.config import DiffusionConfig, ImageGenerationSection, PipelineSection
from raftlib.sections import (
    ConfigError,
    ConfigFile,
    DataSection,
    LoggingSection,
    LoopSection,
    LoraSection,
    RewardComponentSection,
    RewardSection,
    SelectionSection,
    TrainingSection,
    parse_override,
    read_yaml,
)
from raftlib.text.config import GenerationSection, ModelSection, RAFTConfig

__all__ = [
    "ConfigError",
    "ConfigFile",
    "DataSection",
    "DiffusionConfig",
    "GenerationSection",
    "ImageGenerationSection",
    "LoggingSection",
    "LoopSection",
    "LoraSection",
    "ModelSection",
    "PipelineSection",
    "RAFTConfig",
    "RewardComponentSection",
    "RewardSection",
    "SelectionSection",
    "TrainingSection",
    "load_config",
    "parse_override",
]


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RAFTConfig | DiffusionConfig:
    """A config file of either kind: `modality: image` makes it a DiffusionConfig, else a RAFTConfig."""
    raw, _ = read_yaml(Path(path))
    if raw.get("modality") == "image":
        return DiffusionConfig.from_yaml(path, overrides)
    return RAFTConfig.from_yaml(path, overrides)
