"""Typed records passed between the stages: prompts -> samples -> scored samples -> selection.

Records are plain frozen dataclasses so a notebook can build, inspect and hand them to any stage.
Each has a column form (`to_row`) for the run directory's Parquet files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

FinishReason = Literal["eos", "stop", "length"]


@dataclass(frozen=True)
class Prompt:
    prompt_id: int
    """Row index of the prompt in its source (stable across runs and resumes)."""
    text: str
    """The prompt as written in the data (before any chat template)."""
    columns: dict[str, Any] = field(default_factory=dict)
    """The row's other columns (answer, reference, ...); they reach the reward as keyword lists."""


@dataclass(frozen=True)
class Sample:
    """One completion drawn from the policy (or supplied externally) for one prompt."""

    prompt_id: int
    sample_index: int
    """0..K-1 for the policy's samples; K.. for external ones."""
    prompt: str
    completion: str
    prompt_token_ids: list[int]
    """The exact tokens the model saw (chat template applied, truncated), without padding."""
    completion_token_ids: list[int]
    """The sampled tokens, EOS included when the model stopped by itself: fine-tuning learns to stop."""
    logprob: float
    """Sum of log pi_theta(token) over the completion, at temperature 1 (the model's own distribution)."""
    finish_reason: FinishReason
    source: str = "policy"
    """"policy" or the name of an external pool."""
    entropy: float | None = None
    """Sum over the completion of the entropy (nats) of the model's own next-token distribution (temperature 1)
    at each sampled position; None where the backend does not record it (static, vLLM, external)."""
    token_logprobs: list[float] | None = None
    """log pi(token) of each completion token as the decoder computed it (temperature 1; they sum to `logprob`);
    the check against the trainer's own log-probabilities reads them. None for external candidates."""

    @property
    def completion_token_count(self) -> int:
        return len(self.completion_token_ids)

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["prompt_token_count"] = len(self.prompt_token_ids)
        row["completion_token_count"] = len(self.completion_token_ids)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Sample:
        return cls(
            prompt_id=int(row["prompt_id"]),
            sample_index=int(row["sample_index"]),
            prompt=row["prompt"],
            completion=row["completion"],
            prompt_token_ids=[int(t) for t in row["prompt_token_ids"]],
            completion_token_ids=[int(t) for t in row["completion_token_ids"]],
            logprob=float(row["logprob"]),
            finish_reason=row["finish_reason"],
            source=row.get("source", "policy"),
            entropy=None if row.get("entropy") is None else float(row["entropy"]),
            token_logprobs=None if row.get("token_logprobs") is None else [float(v) for v in row["token_logprobs"]],
        )


@dataclass(frozen=True)
class Scores:
    """Rewards for a list of samples, aligned by position. None = could not score."""

    reward: list[float | None]
    """The (weighted) total; None when any weighted component is None."""
    components: dict[str, list[float | None]]
    """Each component's raw value, by component name."""

    def __len__(self) -> int:
        return len(self.reward)

    def __post_init__(self) -> None:
        for name, values in self.components.items():
            if len(values) != len(self.reward):
                raise ValueError(f"component {name!r} has {len(values)} values for {len(self.reward)} samples")


@dataclass(frozen=True)
class Selection:
    """What the select stage decided, aligned with the samples it was given."""

    kept: np.ndarray
    """(N,) bool: kept for fine-tuning."""
    ranking_key: np.ndarray
    """(N,) float: the value ranked (reward, or r - beta*log(pi/pi0)); NaN where not rankable."""
    invalid_count: int
    """Samples whose reward (or key) was None, NaN or inf: never kept, always counted."""
    prompts_without_valid_sample: int
    """Prompts whose every sample was invalid, so nothing was kept for them."""

    @property
    def kept_count(self) -> int:
        return int(self.kept.sum())
