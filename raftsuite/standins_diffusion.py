"""Local stand-ins for the diffusion notebooks' hub downloads, built in code (seconds on a CPU, no network).

    python -m raftsuite.standins_diffusion runs/standins/diffusion

writes, under that dir, what the `dryrun` profile names in place of the `paper` profile's hub ids:

- `stable-diffusion-v1-5/`: a diffusers StableDiffusionPipeline dir laid out as stable-diffusion-v1-5/
  stable-diffusion-v1-5: model_index.json naming unet, vae (4 blocks: 8x downsampling, scaling factor 0.18215),
  text_encoder + tokenizer (CLIP), scheduler (PNDM with skip_prk_steps, as the real scheduler_config.json),
  feature_extractor (CLIPImageProcessor at 224 px) and a safety_checker, which the suite loads as None, as a
  real SD 1.5 dir must be loaded to keep rejected images unblanked. Tiny widths; native size 64 px.
- `clip-vit-large-patch14/`: a CLIPModel + CLIPProcessor laid out as openai/clip-vit-large-patch14: 224 px
  inputs in 14 px patches (257 tokens) and 768-dim projections, with 2 layers of width 32.
- `laion/standin_vit_l_14_linear.pth`: an aesthetic head in the exact format of LAION's
  `sa_0_4_vit_l_14_linear.pth` (a torch.save'd OrderedDict state dict of nn.Linear(768, 1), float32), with its
  SHA-256 in `standin_vit_l_14_linear.pth.sha256`, which `load_aesthetic_head` checks.

The build is idempotent and safe to start twice at once: a finished dir (its STANDINS.json) is kept, and the
build happens under a lock into a temporary dir that is renamed into place.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

from raftlib.diffusion.fetch_laion import sha256_of
from raftlib.diffusion.testing import _clip_text_config, build_clip, build_clip_tokenizer

VERSION = 1
"""Bumped when what is built changes, so an old build is rebuilt."""
SD_DIR, CLIP_DIR, HEAD = "stable-diffusion-v1-5", "clip-vit-large-patch14", "laion/standin_vit_l_14_linear.pth"
MODEL_INDEX_V1_5 = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
"""stable-diffusion-v1-5/stable-diffusion-v1-5's model_index.json."""
CLIP_PROJECTION = 768
"""CLIP ViT-L/14's embedding size: what LAION's ViT-L/14 head takes."""


def build_stable_diffusion_v1_5(directory: Path, *, seed: int = 0) -> Path:
    """A tiny pipeline with SD 1.5's components, scheduler and model_index.json layout (safety checker included)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextModel, CLIPVisionConfig

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:  # the pipeline saves its own copy under tokenizer/
        tokenizer = build_clip_tokenizer(Path(scratch))
    text_config = _clip_text_config(len(tokenizer))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_config.hidden_size,
        attention_head_dim=8,
        norm_num_groups=32,
    )  # fmt: skip  (SD 1.5: cross-attention in the high-resolution blocks, a plain block at the bottom)
    vae = AutoencoderKL(
        block_out_channels=[8, 16, 16, 16],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    )  # fmt: skip  (SD 1.5: 4 blocks, so 8x spatial compression, and the same scaling factor)
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )  # fmt: skip  (SD 1.5's scheduler_config.json)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=224,
        patch_size=14,
        projection_dim=32,
    )
    safety = StableDiffusionSafetyChecker(
        CLIPConfig(text_config=text_config.to_dict(), vision_config=vision.to_dict(), projection_dim=32)
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=safety,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 224}, crop_size=224),
        requires_safety_checker=True,
    )
    pipeline.save_pretrained(directory, safe_serialization=True)
    # The hub's model_index.json was written by diffusers 0.6.0: no image_encoder or requires_safety_checker
    # entries, and the feature extractor named as transformers' CLIPImageProcessor.
    (directory / "model_index.json").write_text(json.dumps(MODEL_INDEX_V1_5, indent=2) + "\n")
    return directory


def _as_clip_vit_l_14_layout(directory: Path) -> None:
    """openai/clip-vit-large-patch14 keeps the image processor in preprocessor_config.json and has no
    processor_config.json (it predates it): CLIPProcessor.from_pretrained must load that layout."""
    processor = json.loads((directory / "processor_config.json").read_text())
    (directory / "preprocessor_config.json").write_text(json.dumps(processor["image_processor"], indent=2) + "\n")
    (directory / "processor_config.json").unlink()


def build_laion_head(path: Path, *, dim: int = CLIP_PROJECTION, seed: int = 0) -> Path:
    """An aesthetic head saved as LAION saved theirs: torch.save of nn.Linear(dim, 1).state_dict(), plus its SHA-256."""
    import torch

    torch.manual_seed(seed)
    state = OrderedDict(torch.nn.Linear(dim, 1).state_dict())  # what LAION's file unpickles to
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    path.with_name(path.name + ".sha256").write_text(f"{sha256_of(path)}  {path.name}\n")
    return path


def build(directory: str | Path) -> Path:
    """Build every stand-in under `directory` unless a finished build of this VERSION is there; returns it."""
    directory = Path(directory)
    record = directory / "STANDINS.json"
    if _finished(record):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits here, then finds the first one's build
        if _finished(record):
            return directory
        staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
        try:
            build_stable_diffusion_v1_5(staging / SD_DIR)
            build_clip(staging / CLIP_DIR, image_size=224, patch_size=14, projection_dim=CLIP_PROJECTION)
            _as_clip_vit_l_14_layout(staging / CLIP_DIR)
            build_laion_head(staging / HEAD)
            (staging / "STANDINS.json").write_text(
                json.dumps(
                    {
                        "version": VERSION,
                        "stands_in_for": {
                            SD_DIR: "stable-diffusion-v1-5/stable-diffusion-v1-5",
                            CLIP_DIR: "openai/clip-vit-large-patch14",
                            HEAD: "LAION-AI/aesthetic-predictor sa_0_4_vit_l_14_linear.pth",
                        },
                        "built_by": "python -m raftsuite.standins_diffusion",
                    },
                    indent=2,
                )
                + "\n"
            )
            if directory.exists():
                shutil.rmtree(directory)  # an older VERSION or a half-copied dir
            staging.rename(directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def _finished(record: Path) -> bool:
    return record.is_file() and json.loads(record.read_text()).get("version") == VERSION


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raftsuite.standins_diffusion", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("directory", nargs="?", default="runs/standins/diffusion")
    args = parser.parse_args(argv)
    print(build(args.directory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
