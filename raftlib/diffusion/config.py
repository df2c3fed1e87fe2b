"""Typed config of a diffusion RAFT run: the shared sections plus a pipeline and an image-generation section.

Defaults follow the paper's Stable Diffusion experiments (§5, LMFlow's RAFT-diffusion notebook): K = 10
images per prompt, LoRA, 50 sampling steps, guidance 7.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from raftlib.sections import (
    ConfigFile,
    DataSection,
    LoggingSection,
    LoopSection,
    LoraSection,
    RewardSection,
    SelectionSection,
    TrainingSection,
    require,
)

PipelineKind = Literal["auto", "stable_diffusion", "sdxl", "class_conditional"]


@dataclass(frozen=True)
class PipelineSection:
    path: str = ""
    """Local diffusers pipeline dir or hub id (required). A dir with unet/ and scheduler/ only is class-conditional."""
    kind: PipelineKind = "auto"
    """auto reads a local dir's model_index.json: StableDiffusion*/SDXL pipelines, or a label-conditioned UNet.
    A hub id has no local dir to read: name its kind (stable_diffusion for SD 1.x/2.x, sdxl)."""
    lora: LoraSection | None = None
    """LoRA on the UNet's attention projections; absent means full fine-tuning of the UNet."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype of the frozen parts (VAE, text encoders), and sampling runs under autocast to it; the
    trained UNet weights stay float32. auto = bfloat16 on a CUDA device that has it (float16 on one that does
    not), float32 on a CPU (where half precision is slower, not faster)."""
    revision: str | None = None
    """Hub revision (ignored for local dirs)."""

    def validate(self, key: str) -> None:
        require(bool(self.path), f"{key}.path", self.path, "is required (a local pipeline dir or hub id)")


@dataclass(frozen=True)
class ImageGenerationSection:
    samples_per_prompt: int = 10
    """K: images drawn per prompt (paper: 10)."""
    num_inference_steps: int = 50
    """Denoising steps per image."""
    guidance_scale: float = 7.5
    """Classifier-free guidance; 1.0 disables it (a class-conditional model needs a null class for > 1)."""
    scheduler: Literal["default", "ddim", "ddpm", "euler", "dpm"] = "default"
    """Sampler: the pipeline's own, or one of these built from its config."""
    eta: float = 0.0
    """DDIM eta (0 = deterministic given the initial noise)."""
    height: int | None = None
    """Output height in pixels; None = the model's native size. The paper adapts SD 1.5 to 256."""
    width: int | None = None
    """Output width in pixels; None = the model's native size."""
    prompts_per_batch: int = 4
    """Prompts per generation batch; each batch denoises prompts_per_batch * K images (rows) at once."""
    decode_batch_size: int = 8
    """Images per VAE decode call. SD 1.5's decoder holds ~0.2 GiB of activations per 512 px image in bf16
    (docs/diffusion_estimates.md): a batch of 100 rows is decoded in chunks of this many, not all at once."""
    class_column: str = "label"
    """Class-conditional models: the data column holding each prompt's class id."""

    def validate(self, key: str) -> None:
        require(self.samples_per_prompt >= 1, f"{key}.samples_per_prompt", self.samples_per_prompt, "must be >= 1")
        require(self.num_inference_steps >= 1, f"{key}.num_inference_steps", self.num_inference_steps, "must be >= 1")
        require(self.guidance_scale >= 0.0, f"{key}.guidance_scale", self.guidance_scale, "must be >= 0")
        require(self.eta >= 0.0, f"{key}.eta", self.eta, "must be >= 0")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None:
                require(value >= 8 and value % 8 == 0, f"{key}.{name}", value, "must be a multiple of 8, >= 8")
        require(self.prompts_per_batch >= 1, f"{key}.prompts_per_batch", self.prompts_per_batch, "must be >= 1")
        require(self.decode_batch_size >= 1, f"{key}.decode_batch_size", self.decode_batch_size, "must be >= 1")


@dataclass(frozen=True)
class DiffusionConfig(ConfigFile):
    modality: Literal["image"] = "image"
    """Marks the file as a diffusion run (`python -m raftlib run` reads it)."""
    model: PipelineSection = field(default_factory=PipelineSection)
    """The diffusion pipeline to align."""
    data: DataSection = field(default_factory=DataSection)
    """Where the prompts come from (extra columns reach the reward)."""
    generation: ImageGenerationSection = field(default_factory=ImageGenerationSection)
    """How the K images per prompt are drawn."""
    reward: RewardSection = field(default_factory=RewardSection)
    """How images are scored: callables (images, prompts, **columns) -> list[float | None]."""
    selection: SelectionSection = field(default_factory=SelectionSection)
    """Which images are kept (kl_coef must be 0: there is no sequence log-probability here)."""
    training: TrainingSection = field(default_factory=lambda: TrainingSection(learning_rate=1e-4, micro_batch_size=4))
    """The denoising fine-tune on the kept images."""
    loop: LoopSection = field(default_factory=lambda: LoopSection(prompts_per_iteration=10))
    """Iterations and their sizes."""
    logging: LoggingSection = field(default_factory=LoggingSection)
    """Metrics and progress output."""
    seed: int = 0
    """Seeds prompt order, every image's noise and the fine-tune."""
    output_dir: str = "runs/raft-diffusion"
    """The run directory."""

    def validate(self):
        super().validate()
        require(
            self.selection.kl_coef == 0.0,
            "selection.kl_coef",
            self.selection.kl_coef,
            "must be 0 for diffusion runs (no per-image log-probability is computed)",
        )
        require(
            self.selection.external_samples is None,
            "selection.external_samples",
            self.selection.external_samples,
            "is a language-model feature",
        )
        # What raftlib.diffusion.train.DenoisingLoss declares it cannot do (packing = chunks_logits = False), refused
        # here so a config fails when it is read, before a pipeline loads.
        for name in ("packing", "loss_chunk_tokens"):  # token-sequence options; images have neither
            value = getattr(self.training, name)
            require(not value, f"training.{name}", value, "is a language-model option (leave it off for images)")
        require(
            self.training.loss == "sft",
            "training.loss",
            self.training.loss,
            "image runs train with the denoising loss (raftlib.diffusion.train.DenoisingLoss); leave it at 'sft'",
        )
        return self
