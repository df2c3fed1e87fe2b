"""The image modality: what `raftlib.loop` calls to generate, fine-tune and evaluate a diffusion model.

It implements `raftlib.modality.Modality`; `raftlib.text.modality.TextModality` is its language-model peer.
A diffusion model has no sample likelihood here, so the KL ranking key does not apply (`has_likelihood`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raftlib.batches import Batches
from raftlib.diffusion.config import DiffusionConfig
from raftlib.diffusion.metrics import within_prompt_diversity
from raftlib.diffusion.pipelines import ImageSample, LoadedPipeline, generate_images
from raftlib.diffusion.train import finetune_images, load_policy, save_policy
from raftlib.records import Prompt
from raftlib.sections import ConfigError


class ImageModality:
    """A diffusion model: K images per prompt with recorded seeds, denoising-loss fine-tune, diversity."""

    record = ImageSample

    def __init__(self, config: DiffusionConfig, device) -> None:
        self.config = config
        self.device = device

    @staticmethod
    def prepare(splits):
        """Prompts need no encoding here: every one is usable."""
        return splits

    def refresh(self, policy: LoadedPipeline, saved: Path | None) -> None:
        """The pipeline generates from the trained UNet directly: nothing to refresh."""

    def close(self) -> None:
        """Nothing held beyond the policy."""

    @staticmethod
    def check_generation(policy, samples) -> dict[str, Any]:
        """Images carry no likelihood to check against the policy."""
        return {}

    def load_policy(self, checkpoint: Path | None) -> LoadedPipeline:
        return load_policy(self.config.model, checkpoint, self.device, seed=self.config.seed)

    def save(self, policy: LoadedPipeline, directory: Path, state_dict=None) -> None:
        save_policy(policy, self.config.model.lora, directory, state_dict)

    @staticmethod
    def trained_module(policy: LoadedPipeline):
        """The module the fine-tune trains (and FSDP shards): the UNet."""
        return policy.unet

    def generate(
        self,
        policy: LoadedPipeline,
        prompts: Sequence[Prompt],
        *,
        stream: int,
        samples_per_prompt: int | None = None,
        candidates: bool = False,
        batches: Batches | None = None,
    ) -> list[ImageSample]:
        """K images per prompt, one recorded seed each (`candidates` adds nothing: no external images)."""
        return generate_images(
            policy,
            prompts,
            self.config.generation,
            seed=self.config.seed,
            stream=stream,
            samples_per_prompt=samples_per_prompt,
            batches=batches,
        )

    @staticmethod
    def reward_inputs(samples: list[ImageSample]) -> tuple[list, list[str]]:
        """The reward callable's positional arguments: (PIL images, prompts)."""
        return [s.pil for s in samples], [s.prompt for s in samples]

    @staticmethod
    def generated_units(samples: list[ImageSample]) -> int:
        return len(samples)

    has_likelihood = False

    def reference_logprobs(self, policy, samples):
        raise ConfigError("selection.kl_coef > 0 needs sample log-likelihoods, which a diffusion model has not here")

    def finetune(self, policy, kept, *, iteration, accelerator, progress):
        return finetune_images(
            policy,
            kept,
            self.config.training,
            seed=self.config.seed,
            iteration=iteration,
            accelerator=accelerator,
            progress=progress,
        )

    def sample_settings(self) -> dict[str, Any]:
        g = self.config.generation
        return {
            "num_inference_steps": g.num_inference_steps,
            "guidance_scale": g.guidance_scale,
            "scheduler": g.scheduler,
            "eta": g.eta,
        }

    @staticmethod
    def sample_metrics(samples: list[ImageSample], prefix: str) -> dict[str, Any]:
        images = [s.image for s in samples]
        return {
            f"{prefix}_diversity": within_prompt_diversity(images, [s.prompt for s in samples]),
            f"{prefix}_mean_intensity": float(np.mean([i.mean() / 255.0 for i in images])) if images else float("nan"),
        }

    def eval_metrics(self, policy, samples, prompts, iteration) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return {}, [{} for _ in samples]
