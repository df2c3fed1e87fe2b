"""RAFT for diffusion models: the same loop, selection, run store and metrics as the language-model path.

    DiffusionConfig (YAML with `modality: image`) -> raftlib.run(config)

`pipelines` loads Stable Diffusion 1.x/2.x, SDXL and label-conditioned UNets and draws K images per
prompt with a recorded seed per image; `rewards` holds the image rewards (CLIP score, LAION aesthetic
head, JPEG compressibility, classifier probability); `train` the denoising loss, LoRA and saving;
`modality` is what the loop calls.
"""

from raftlib.diffusion.config import DiffusionConfig

__all__ = ["DiffusionConfig"]
