"""What the loop needs from a kind of model: the `Modality` protocol, and the modality a config asks for.

The loop (`raftlib.loop`) owns prompts, selection, the run store, resume and the metrics rows; everything that
depends on what is generated (text or images) goes through the members below. Two modalities exist, as peers:
`raftlib.text.modality.TextModality` (a causal language model, `RAFTConfig`) and
`raftlib.diffusion.modality.ImageModality` (a diffusion model, `DiffusionConfig`). A third (audio, say) would
implement this protocol and add a branch to `modality_for`; the loop would not change.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from raftlib.batches import Batches
    from raftlib.data import PromptSplits
    from raftlib.finetune import FinetuneStats
    from raftlib.records import Prompt


class Modality(Protocol):
    """A kind of model RAFT can align, as the loop sees it. `policy` is whatever `load_policy` returns."""

    record: Any
    """The sample type: `record.from_row(row)` rebuilds a sample from its run-store row (resume)."""

    # -- the data and the policy ------------------------------------------------------------------------------

    def prepare(self, splits: PromptSplits) -> PromptSplits:
        """The run's prompts, ready to generate from (text: encoded once; those too long for the model dropped)."""

    def load_policy(self, checkpoint: Path | None) -> Any:
        """The base model (checkpoint None) or an iteration's checkpoint directory, ready to generate."""

    def save(self, policy: Any, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the policy as a loadable model directory; `state_dict` replaces its own (FSDP2's gathered one)."""

    def trained_module(self, policy: Any) -> torch.nn.Module:
        """The module the fine-tune trains and FSDP2 shards (the language model; a diffusion model's UNet)."""

    def finetune(
        self, policy: Any, kept: list, *, iteration: int, accelerator, progress: bool
    ) -> tuple[Any, FinetuneStats]:
        """Fine-tune on the kept samples (a fresh optimizer per iteration); the trained policy and its stats."""

    def refresh(self, policy: Any, saved: Path | None) -> None:
        """`policy` generates from now on; `saved` is the checkpoint it was just written to (an engine that holds
        its own copy of the weights reloads them)."""

    def close(self) -> None:
        """Free what generation holds (an inference engine) at the end of the run."""

    # -- sampling -----------------------------------------------------------------------------------------------

    def generate(
        self,
        policy: Any,
        prompts: Sequence[Prompt],
        *,
        stream: int,
        samples_per_prompt: int | None = None,
        candidates: bool = False,
        batches: Batches | None = None,
    ) -> list:
        """`samples_per_prompt` (default: the config's K) samples per prompt, in resumable batches.

        Draws depend only on (seed, stream, batch), so a batch drawn again after a crash is identical.
        `candidates`: this is an iteration's candidate pool, to which a modality may add candidates it did not
        draw (text: `selection.external_samples`, e.g. a teacher's), inside the batch of their prompt.
        """

    def check_generation(self, policy: Any, samples: Sequence) -> dict[str, Any]:
        """Checks of newly drawn samples against the policy (text: decoder vs policy log-probabilities), as
        metrics; raises when a check fails."""

    def reward_inputs(self, samples: Sequence) -> tuple[list, ...]:
        """The reward callable's positional arguments for these samples (text: prompts and completions)."""

    def generated_units(self, samples: Sequence) -> int:
        """What generation produced, for the throughput metric (tokens; images)."""

    # -- measures -----------------------------------------------------------------------------------------------

    @property
    def has_likelihood(self) -> bool:
        """Whether `reference_logprobs` exists: the KL ranking key (selection.kl_coef > 0) needs it."""

    def reference_logprobs(self, policy: Any, samples: Sequence) -> list[float]:
        """log pi_0 of each sample under the initial model (the KL key of the paper's Eq. 5 and the eval KL)."""

    def sample_settings(self) -> dict[str, Any]:
        """The sampling settings recorded beside every sample row."""

    def sample_metrics(self, samples: Sequence, prefix: str) -> dict[str, Any]:
        """Measures of a set of samples (diversity, length, entropy...), keys prefixed `prefix_`."""

    def eval_metrics(
        self, policy: Any, samples: Sequence, prompts: Sequence[Prompt], iteration: int
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The held-out evaluation's own measures (text: KL to pi_0, reference perplexity) and extra
        per-sample columns for eval_samples.parquet (one dict per sample; empty dicts when none)."""


def device_of(policy) -> Any:
    """Where a policy's weights are (a model's first parameter; a diffusion pipeline's UNet's)."""
    module = getattr(policy, "unet", policy)
    return next(module.parameters()).device


def modality_for(config, device) -> Modality:
    """The modality of a config: `DiffusionConfig` (YAML `modality: image`) -> images, else text."""
    if getattr(config, "modality", "text") == "image":
        from raftlib.diffusion.modality import ImageModality

        return ImageModality(config, device)
    from raftlib.text.modality import TextModality

    return TextModality(config, device)
