"""Tiny diffusion pipelines and CLIP models built in code, for tests and examples (no download).

Shapes follow diffusers' own fast tests: a 2-block UNet, a 2-block VAE, 2-layer CLIP text encoders
and a character-level CLIP tokenizer written from scratch, so every code path of Stable Diffusion
1.x/2.x and SDXL runs in seconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path


def build_clip_tokenizer(directory: Path, *, model_max_length: int = 77):
    """A character-level CLIP BPE tokenizer (every byte a token, no merges), saved to `directory`."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    characters = _byte_characters()
    vocab = {token: i for i, token in enumerate(characters + [c + "</w>" for c in characters])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=model_max_length
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def _byte_characters() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2's table, which CLIP shares)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _clip_text_config(vocab_size: int, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        projection_dim=projection_dim,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        norm_num_groups=32,
        sample_size=32,
    )


def build_stable_diffusion(directory: Path, *, seed: int = 0) -> Path:
    """A tiny Stable Diffusion 1.x-shaped pipeline (32 px images, 16 px latents), saved with safetensors."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(directory / "tokenizer")
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    pipeline = StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_clip_text_config(len(tokenizer))),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory


def build_sdxl(directory: Path, *, seed: int = 0) -> Path:
    """A tiny SDXL-shaped pipeline: two text encoders, text_time added conditioning."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(directory / "tokenizer")
    tokenizer_2 = build_clip_tokenizer(directory / "tokenizer_2")
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + the 32-dim pooled text embedding
        cross_attention_dim=64,
        norm_num_groups=32,
    )
    pipeline = StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_clip_text_config(len(tokenizer))),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(len(tokenizer_2))),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            timestep_spacing="leading",
            steps_offset=1,
        ),
    )
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory


def build_class_conditional(directory: Path, *, num_classes: int = 10, size: int = 8, seed: int = 0) -> Path:
    """A tiny label-conditioned pixel-space UNet (unet/ + scheduler/), the layout of the suite's digit model.

    Class `num_classes` is the null class used for classifier-free guidance.
    """
    import torch
    from diffusers import DDIMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=size,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=num_classes + 1,
        attention_head_dim=8,
    )
    unet.save_pretrained(directory / "unet", safe_serialization=True)
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", steps_offset=1).save_pretrained(
        directory / "scheduler"
    )
    return directory


def build_clip(
    directory: Path, *, seed: int = 0, image_size: int = 32, patch_size: int = 8, projection_dim: int = 32
) -> Path:
    """A tiny random CLIPModel with its processor (tokenizer + image processor): CLIP score's code path.

    `projection_dim` is the embedding size the rewards see (CLIP ViT-L/14: 768, what LAION's heads take).
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(directory)
    text = _clip_text_config(len(tokenizer), projection_dim).to_dict()
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=projection_dim,
    )
    config = CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=projection_dim)
    CLIPModel(config).save_pretrained(directory, safe_serialization=True)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=image_size),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(directory)
    return directory
