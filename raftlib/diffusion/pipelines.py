"""Load a diffusion model and draw K images per prompt, each from its own recorded seed.

Three kinds, one interface (`LoadedPipeline`):

- `stable_diffusion`: diffusers' StableDiffusionPipeline (SD 1.x / 2.x), from a local dir or a hub id;
- `sdxl`: StableDiffusionXLPipeline (two text encoders, size-and-crop conditioning);
- `class_conditional`: a pixel-space UNet2DModel conditioned on a class id (`unet/` + `scheduler/`),
  sampled by the short loop below (diffusers ships no pipeline for it); the class `num_class_embeds - 1`
  is the null class for classifier-free guidance.

Every image's initial noise (and any sampler noise) comes from its own `torch.Generator` seeded with
`image_seed(seed, stream, prompt_id, sample_index)`, recorded in the image's row: an image does not
depend on which batch it was drawn in, and any kept image can be regenerated from its row alone.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raftlib.batches import Batches, flatten, run_batches
from raftlib.diffusion.config import ImageGenerationSection, PipelineSection
from raftlib.records import Prompt

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_LORA_TARGETS = {
    "stable_diffusion": ["to_q", "to_k", "to_v", "to_out.0"],  # the attention projections (LMFlow, diffusers)
    "sdxl": ["to_q", "to_k", "to_v", "to_out.0"],
    "class_conditional": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],  # a tiny UNet needs its convs too
}


class PipelineError(ValueError):
    """A pipeline dir is missing, of an unsupported kind, or asked for what it cannot do."""


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ImageSample:
    """One image drawn for one prompt. Stored in Parquet as PNG bytes with its seed."""

    prompt_id: int
    sample_index: int
    prompt: str
    seed: int
    """The seed of this image's generator: regenerate it with the same model and settings."""
    image: np.ndarray = field(repr=False)
    """(H, W, C) uint8, C = 1 (grey) or 3 (RGB)."""
    class_label: int | None = None
    """The class id a class-conditional model was given (None for text-conditioned pipelines)."""
    source: str = "policy"

    @property
    def pil(self):
        from PIL import Image

        return Image.fromarray(self.image[..., 0] if self.image.shape[-1] == 1 else self.image)

    def to_row(self) -> dict[str, Any]:
        buffer = io.BytesIO()
        self.pil.save(buffer, format="PNG")
        row = asdict(self)
        del row["image"]
        return row | {"image_png": buffer.getvalue(), "height": self.image.shape[0], "width": self.image.shape[1]}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ImageSample:
        from PIL import Image

        image = np.asarray(Image.open(io.BytesIO(row["image_png"])))
        if image.ndim == 2:
            image = image[..., None]
        label = row.get("class_label")
        return cls(
            prompt_id=int(row["prompt_id"]),
            sample_index=int(row["sample_index"]),
            prompt=row["prompt"],
            seed=int(row["seed"]),
            image=image,
            class_label=None if label is None else int(label),
            source=row.get("source", "policy"),
        )


def image_seed(seed: int, stream: int, prompt_id: int, sample_index: int) -> int:
    """A 63-bit seed from (run seed, stream = iteration or eval, prompt, sample): independent of batching."""
    state = np.random.SeedSequence([seed, stream, prompt_id, sample_index]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


def to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """(H, W, C) uint8 images -> (N, C, H, W) float in [-1, 1]."""
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return stacked / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


@dataclass
class LoadedPipeline:
    """A diffusion model ready to sample and train: the trainable denoiser plus what conditions it."""

    kind: str
    unet: torch.nn.Module
    """The denoiser RAFT fine-tunes (with a LoRA adapter when model.lora is set)."""
    scheduler: Any
    """The sampler's scheduler."""
    pipeline: Any = None
    """The diffusers pipeline (None for class-conditional models)."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    """The frozen parts' dtype; sampling runs under autocast to it when it is not float32."""

    def autocast(self):
        """Sampling precision: the float32 UNet meets the half-precision text embeddings and VAE under autocast."""
        enabled = self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype if enabled else torch.bfloat16, enabled=enabled)

    @property
    def native_size(self) -> int:
        """Pixels per side the model was built for."""
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        if self.pipeline is not None:
            return int(size * self.pipeline.vae_scale_factor)
        return int(size)

    @property
    def null_class(self) -> int | None:
        count = getattr(self.unet.config, "num_class_embeds", None)
        return None if count is None else count - 1


def detect_kind(path: str) -> str:
    """The pipeline kind of a local dir from its model_index.json (or its unet/ + scheduler/ layout)."""
    root = Path(path)
    index = root / "model_index.json"
    if index.is_file():
        name = json.loads(index.read_text()).get("_class_name", "")
        if "XL" in name:
            return "sdxl"
        if name.startswith("StableDiffusion"):
            return "stable_diffusion"
        raise PipelineError(f"{index}: pipeline class {name!r} is not supported (StableDiffusion*, SDXL)")
    if (root / "unet" / "config.json").is_file() and (root / "scheduler").is_dir():
        return "class_conditional"
    if root.exists():
        raise PipelineError(f"{path}: neither a diffusers pipeline (model_index.json) nor a unet/ + scheduler/ dir")
    raise PipelineError(
        f"model.kind = 'auto' needs a local dir to inspect; {path!r} is not one (a hub id?): set model.kind "
        "(stable_diffusion for SD 1.x/2.x, sdxl, class_conditional)"
    )


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """model.dtype as a torch dtype; auto = bfloat16 on CUDA (float16 where bf16 is missing), float32 on CPU."""
    if name != "auto":
        return _DTYPES[name]
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_pipeline(section: PipelineSection, device: torch.device | str = "cpu", path: str | None = None):
    """Load `path` (default `model.path`) as the section's kind; frozen parts in `model.dtype`."""
    from raftlib.hub import check_local

    source = path or section.path
    check_local(source, "model.path", PipelineError)
    kind = section.kind if section.kind != "auto" else detect_kind(source)
    device = torch.device(device)
    dtype = resolve_dtype(section.dtype, device)
    if kind == "class_conditional":
        from diffusers import DDIMScheduler, UNet2DModel

        unet = UNet2DModel.from_pretrained(source, subfolder="unet", use_safetensors=True)
        if getattr(unet.config, "num_class_embeds", None) is None:
            raise PipelineError(f"{source}/unet has no class embedding (num_class_embeds): not class-conditional")
        scheduler = DDIMScheduler.from_pretrained(source, subfolder="scheduler")
        return LoadedPipeline(kind, unet.to(device), scheduler, None, device, dtype)

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    extra = {"safety_checker": None, "requires_safety_checker": False} if kind == "stable_diffusion" else {}
    if dtype != torch.float32:
        # The trained weights stay float32, read as float32 from the file (a bf16 copy cast back up would
        # start the fine-tune from rounded weights); autocast runs them in `dtype`.
        extra["unet"] = UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", dtype=torch.float32, use_safetensors=True, revision=section.revision
        )
    pipeline = cls.from_pretrained(source, dtype=dtype, use_safetensors=True, revision=section.revision, **extra)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    for frozen in (pipeline.vae, pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)):
        if frozen is not None:
            frozen.requires_grad_(False)
    return LoadedPipeline(kind, pipeline.unet, pipeline.scheduler, pipeline, device, dtype)


def sampling_scheduler(loaded: LoadedPipeline, name: str):
    if name == "default":
        return loaded.scheduler
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler}
    cls = classes.get(name, DPMSolverMultistepScheduler)
    return cls.from_config(loaded.scheduler.config)


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def class_labels_of(prompts: Sequence[Prompt], column: str) -> list[int]:
    labels = []
    for prompt in prompts:
        value = prompt.columns.get(column)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise PipelineError(
                f"prompt {prompt.prompt_id}: a class-conditional model needs an integer class id in column "
                f"{column!r} (generation.class_column), got {value!r}"
            )
        labels.append(value)
    return labels


@torch.no_grad()
def sample_class_conditional(
    loaded: LoadedPipeline,
    labels: Sequence[int],
    generators: list[torch.Generator],
    settings: ImageGenerationSection,
) -> torch.Tensor:
    """DDIM/DDPM sampling of a class-conditional UNet; returns (N, C, H, W) in [-1, 1]."""
    unet = loaded.unet
    size_h = settings.height or loaded.native_size
    size_w = settings.width or loaded.native_size
    scheduler = sampling_scheduler(loaded, settings.scheduler)
    scheduler.set_timesteps(settings.num_inference_steps)
    channels = unet.config.in_channels
    noise = [torch.randn((channels, size_h, size_w), generator=g) for g in generators]
    sample = torch.stack(noise).to(loaded.device) * scheduler.init_noise_sigma
    class_labels = torch.tensor(list(labels), device=loaded.device)
    guided = settings.guidance_scale != 1.0
    if guided and loaded.null_class is None:
        raise PipelineError("guidance_scale != 1 needs a null class in the UNet's class embedding")
    null = torch.full_like(class_labels, loaded.null_class) if guided else None
    step_kwargs = {"eta": settings.eta} if "eta" in _parameters(scheduler.step) else {}
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        if guided:
            both = unet(torch.cat([model_input, model_input]), t, class_labels=torch.cat([class_labels, null])).sample
            conditional, unconditional = both.chunk(2)
            prediction = unconditional + settings.guidance_scale * (conditional - unconditional)
        else:
            prediction = unet(model_input, t, class_labels=class_labels).sample
        sample = scheduler.step(prediction, t, sample, generator=generators, **step_kwargs).prev_sample
    return sample.clamp(-1, 1)


def _parameters(fn: Callable) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)


@torch.no_grad()
def sample_pipeline(
    loaded: LoadedPipeline, texts: Sequence[str], generators: list[torch.Generator], settings: ImageGenerationSection
) -> np.ndarray:
    """Stable Diffusion / SDXL: one image per text, each from its own generator; (N, H, W, 3) uint8.

    The pipeline denoises all N latents at once and stops there (output_type="latent"); the VAE then decodes
    them `settings.decode_batch_size` at a time, so the decoder's full-resolution activations are held for
    a few images, not N.
    """
    pipeline = loaded.pipeline
    original = pipeline.scheduler
    pipeline.scheduler = sampling_scheduler(loaded, settings.scheduler)
    try:
        kwargs = {"eta": settings.eta} if "eta" in _parameters(pipeline.scheduler.step) else {}
        with loaded.autocast():
            latents = pipeline(
                prompt=list(texts),
                num_inference_steps=settings.num_inference_steps,
                guidance_scale=settings.guidance_scale,
                height=settings.height,
                width=settings.width,
                generator=generators,
                output_type="latent",
                **kwargs,
            ).images
    finally:
        pipeline.scheduler = original
    chunks = [
        decode_latents(pipeline, latents[start : start + settings.decode_batch_size])
        for start in range(0, len(latents), settings.decode_batch_size)
    ]
    return (np.clip(np.concatenate(chunks), 0, 1) * 255).round().astype(np.uint8)


@torch.no_grad()
def decode_latents(pipeline, latents: torch.Tensor) -> np.ndarray:
    """What StableDiffusion(XL)Pipeline does after its last step, for one chunk: unscale (SDXL: de-normalise
    with the VAE's latents mean/std when it has them), decode, map to [0, 1]; (n, H, W, 3) float32.

    Decoded in the VAE's own dtype; an fp16 VAE marked force_upcast (SDXL's overflows in fp16) runs in fp32
    for the call, as the pipeline does.
    """
    vae = pipeline.vae
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        latents = latents.to(vae.device, vae.dtype)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
            std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(torch.float16)
    if getattr(pipeline, "watermark", None) is not None:  # SDXL with invisible-watermark installed
        image = pipeline.watermark.apply_watermark(image)
    return pipeline.image_processor.postprocess(image.float(), output_type="np")


def generate_images(
    loaded: LoadedPipeline,
    prompts: Sequence[Prompt],
    settings: ImageGenerationSection,
    *,
    seed: int,
    stream: int,
    samples_per_prompt: int | None = None,
    batches: Batches[list[ImageSample]] | None = None,
) -> list[ImageSample]:
    """K images per prompt in batches of `prompts_per_batch` prompts, resumable and shardable (`raftlib.batches`).

    Each image has its own seed (`image_seed(seed, stream, prompt_id, j)`), so a batch drawn again equals the
    one that was lost, whatever the batch size.
    """
    k = samples_per_prompt or settings.samples_per_prompt
    labels = class_labels_of(prompts, settings.class_column) if loaded.kind == "class_conditional" else None

    def draw(index: int, chunk: Sequence[Prompt]) -> list[ImageSample]:
        batch = [(p, j) for p in chunk for j in range(k)]
        seeds = [image_seed(seed, stream, p.prompt_id, j) for p, j in batch]
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        if labels is not None:
            first = index * settings.prompts_per_batch
            batch_labels = [labels[first + i // k] for i in range(len(batch))]
            images = to_uint8(sample_class_conditional(loaded, batch_labels, generators, settings))
        else:
            batch_labels = [None] * len(batch)
            images = sample_pipeline(loaded, [p.text for p, _ in batch], generators, settings)
        return [
            ImageSample(p.prompt_id, j, p.text, s, image, label)
            for (p, j), s, image, label in zip(batch, seeds, images, batch_labels, strict=True)
        ]

    was_training = loaded.unet.training
    loaded.unet.eval()
    try:
        return flatten(run_batches(prompts, settings.prompts_per_batch, draw, batches, unit="prompt"))
    finally:
        loaded.unet.train(was_training)
