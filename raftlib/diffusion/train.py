"""Fine-tune the denoiser on the kept images: the standard denoising loss, LoRA or full, through accelerate.

    x0 = the kept image (or its VAE latent); t ~ U{0..T-1}; eps ~ N(0, I); x_t = sqrt(a_t) x0 + sqrt(1-a_t) eps
    loss = || unet(x_t, t, condition) - target ||^2,   target = eps (or v for v-prediction models)

The optimizer, schedule and epoch order are the language-model path's (`raftlib.finetune.train_stage`).
Checkpoints are what diffusers and peft load: a full pipeline dir (`from_pretrained`), LoRA weights
for `pipeline.load_lora_weights`, or a peft adapter dir for a class-conditional UNet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from raftlib.diffusion.config import PipelineSection
from raftlib.diffusion.pipelines import DEFAULT_LORA_TARGETS, ImageSample, LoadedPipeline, load_pipeline, to_tensor
from raftlib.finetune import train_stage
from raftlib.sections import LoraSection, TrainingSection

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
"""diffusers' LoRA file name (`load_lora_weights` finds it)."""
ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""peft's adapter file name (class-conditional UNets)."""


# ----------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------


def lora_config(kind: str, section: LoraSection):
    from peft import LoraConfig

    return LoraConfig(
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        init_lora_weights="gaussian",
        target_modules=section.target_modules or DEFAULT_LORA_TARGETS[kind],
    )


def add_lora(loaded: LoadedPipeline, section: LoraSection, seed: int = 0) -> None:
    """Freeze the UNet and add trainable LoRA matrices (diffusers' add_adapter, or peft for a plain UNet).

    The random init is seeded: a run killed before its first checkpoint resumes from the same adapter.
    """
    loaded.unet.requires_grad_(False)
    config = lora_config(loaded.kind, section)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hasattr(loaded.unet, "add_adapter"):
            loaded.unet.add_adapter(config)
        else:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, loaded.unet)
    for name, parameter in loaded.unet.named_parameters():
        parameter.requires_grad_("lora_" in name)
    loaded.unet.to(loaded.device)


def lora_state_dict(
    unet: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    adapter = get_peft_model_state_dict(unet, state_dict=state_dict)
    return {k: v.detach().cpu().contiguous() for k, v in adapter.items()}


def _plain_unet(unet: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An unsharded UNet of the same class and config holding `state_dict` (the gathered FSDP weights)."""
    from raftlib.sharding import plain_class

    with torch.device("meta"):
        plain = plain_class(unet).from_config(unet.config)
    plain.load_state_dict(state_dict, assign=True)  # the gathered CPU tensors become the weights, no copy
    return plain


def save_policy(
    loaded: LoadedPipeline, lora: LoraSection | None, directory: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """Full: the whole pipeline dir. LoRA: diffusers' LoRA file (SD/SDXL) or a peft adapter dir.

    `state_dict` holds the UNet's weights when its own are sharded (FSDP, `raftlib.sharding`).
    """
    directory.mkdir(parents=True, exist_ok=True)
    if state_dict is not None and lora is None:
        # diffusers' save_pretrained reads the module's own (sharded) weights: write an unsharded copy instead.
        sharded = loaded.unet
        plain = _plain_unet(sharded, state_dict)
        try:
            loaded.unet = plain
            if loaded.pipeline is not None:
                loaded.pipeline.unet = plain
            save_policy(loaded, None, directory)
        finally:
            loaded.unet = sharded
            if loaded.pipeline is not None:
                loaded.pipeline.unet = sharded
        return
    if lora is None:
        if loaded.pipeline is not None:
            loaded.pipeline.save_pretrained(directory, safe_serialization=True)
        else:
            loaded.unet.save_pretrained(directory / "unet", safe_serialization=True)
            loaded.scheduler.save_pretrained(directory / "scheduler")
        return
    weights = lora_state_dict(loaded.unet, state_dict)
    if loaded.pipeline is not None:
        from diffusers.utils import convert_state_dict_to_diffusers

        type(loaded.pipeline).save_lora_weights(
            directory, unet_lora_layers=convert_state_dict_to_diffusers(weights), safe_serialization=True
        )
    else:
        from safetensors.torch import save_file

        save_file(weights, directory / ADAPTER_WEIGHTS)
        lora_config(loaded.kind, lora).save_pretrained(directory)


def load_policy(section: PipelineSection, checkpoint: Path | None, device, seed: int = 0) -> LoadedPipeline:
    """The trainable model: the base pipeline (or a full checkpoint), plus LoRA (resumed from a checkpoint)."""
    if section.lora is None:
        return load_pipeline(section, device, str(checkpoint) if checkpoint else None)
    loaded = load_pipeline(section, device)
    add_lora(loaded, section.lora, seed)
    if checkpoint is not None:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        if loaded.pipeline is not None:
            from diffusers.utils import convert_unet_state_dict_to_peft

            raw = load_file(Path(checkpoint) / LORA_WEIGHTS)
            weights = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in raw.items()})
        else:
            weights = load_file(Path(checkpoint) / ADAPTER_WEIGHTS)
        result = set_peft_model_state_dict(loaded.unet, weights)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"{checkpoint}: LoRA weights that fit no module: {unexpected[:5]}")
    return loaded


# ----------------------------------------------------------------------------------------------
# The denoising loss
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingImage:
    """A kept image as the loss needs it, encoded once per stage (not once per epoch)."""

    prompt: str
    class_label: int | None
    mean: torch.Tensor
    """(C, h, w): the pixels in [-1, 1], or the scaled mean of the VAE's latent distribution."""
    std: torch.Tensor | None
    """(C, h, w): the scaled std of the VAE's latent distribution; None for a pixel-space model."""
    size: tuple[int, int]
    """(height, width) of the image in pixels (SDXL's size conditioning)."""


@torch.no_grad()
def encode_kept(loaded: LoadedPipeline, kept: list[ImageSample], batch_size: int = 8) -> list[TrainingImage]:
    """Pixels, or the VAE latent distribution of each kept image: the frozen VAE runs once per image per stage."""
    encoded: list[TrainingImage] = []
    for start in range(0, len(kept), batch_size):
        chunk = kept[start : start + batch_size]
        pixels = to_tensor([s.image for s in chunk]).to(loaded.device)
        size = (pixels.shape[-2], pixels.shape[-1])
        if loaded.pipeline is None:
            means, stds = pixels, [None] * len(chunk)
        else:
            vae = loaded.pipeline.vae
            latent = vae.encode(pixels.to(vae.dtype)).latent_dist
            scale = vae.config.scaling_factor
            means, stds = latent.mean.float() * scale, latent.std.float() * scale
        encoded += [
            TrainingImage(s.prompt, s.class_label, mean, std, size)
            for s, mean, std in zip(chunk, means, stds, strict=True)
        ]
    return encoded


def collate_images(images: list[TrainingImage]) -> dict[str, Any]:
    return {
        "mean": torch.stack([i.mean for i in images]),
        "std": None if images[0].std is None else torch.stack([i.std for i in images]),
        "size": images[0].size,
        "prompts": [i.prompt for i in images],
        "class_labels": [i.class_label for i in images],
    }


def _training_scheduler(loaded: LoadedPipeline):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(loaded.scheduler.config)


@torch.no_grad()
def _condition(loaded: LoadedPipeline, batch: dict[str, Any], size: tuple[int, int]) -> dict[str, Any]:
    """What the UNet is conditioned on besides x_t and t: class ids, or text embeddings (+ SDXL's extras)."""
    device = loaded.device
    if loaded.kind == "class_conditional":
        return {"class_labels": torch.tensor(batch["class_labels"], device=device)}
    pipeline = loaded.pipeline
    if loaded.kind == "sdxl":
        embeds, _, pooled, _ = pipeline.encode_prompt(
            batch["prompts"], device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        projection = pipeline.text_encoder_2.config.projection_dim
        time_ids = pipeline._get_add_time_ids(size, (0, 0), size, embeds.dtype, text_encoder_projection_dim=projection)
        time_ids = time_ids.to(device).repeat(len(batch["prompts"]), 1)
        return {
            "encoder_hidden_states": embeds.float(),
            "added_cond_kwargs": {"text_embeds": pooled.float(), "time_ids": time_ids.float()},
        }
    embeds, _ = pipeline.encode_prompt(batch["prompts"], device, 1, False)
    return {"encoder_hidden_states": embeds.float()}


def denoising_loss(loaded: LoadedPipeline, scheduler, unet, batch: dict[str, Any]) -> torch.Tensor:
    """The standard diffusion training loss on one micro-batch, summed over its images (each image's squared error
    averaged over its elements)."""
    latents = batch["mean"].to(loaded.device)
    if batch["std"] is not None:  # a fresh draw from the VAE's latent distribution at every step
        latents = latents + batch["std"].to(loaded.device) * torch.randn_like(latents)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    prediction = unet(noisy, timesteps, **_condition(loaded, batch, batch["size"])).sample
    per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)  # (B,)
    return per_image.sum()


class DenoisingLoss:
    """`raftlib.finetune.Loss` for a diffusion model: the denoising loss, one unit per image."""

    packing = False  # images are not token sequences: nothing to pack, no vocabulary logits to chunk
    chunks_logits = False

    def __init__(self, loaded: LoadedPipeline) -> None:
        self.loaded, self.scheduler = loaded, _training_scheduler(loaded)

    def prepare(self, model, kept: list[ImageSample]) -> list[TrainingImage]:
        return encode_kept(self.loaded, kept)  # latents (or pixels) once per stage

    collate = staticmethod(collate_images)

    @staticmethod
    def units(batch: dict[str, Any]) -> int:
        return int(batch["mean"].shape[0])

    def __call__(self, model, batch: dict[str, Any]) -> torch.Tensor:
        return denoising_loss(self.loaded, self.scheduler, model, batch)


def finetune_images(
    loaded: LoadedPipeline,
    kept: list[ImageSample],
    section: TrainingSection,
    *,
    seed: int,
    iteration: int,
    accelerator=None,
    progress: bool = True,
):
    """One RAFT fine-tune stage of the UNet on the kept images; returns (loaded, FinetuneStats)."""
    # diffusers models recompute each block's activations in the backward pass when asked (training.
    # gradient_checkpointing); switched off again after the stage so sampling runs at full speed.
    checkpointing = section.gradient_checkpointing and getattr(loaded.unet, "_supports_gradient_checkpointing", False)
    if checkpointing:
        loaded.unet.enable_gradient_checkpointing()
    try:
        unet, stats = train_stage(
            loaded.unet,
            kept,
            DenoisingLoss(loaded),
            section,
            seed=seed,
            iteration=iteration,
            accelerator=accelerator,
            progress=progress,
        )
    finally:
        if checkpointing:
            loaded.unet.disable_gradient_checkpointing()
    loaded.unet = unet
    if loaded.pipeline is not None:
        loaded.pipeline.unet = unet
    return loaded, stats
