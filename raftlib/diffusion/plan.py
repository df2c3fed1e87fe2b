"""The planner for diffusion runs: weights, training state, activations and FLOPs of the UNet, estimated.

What it covers: the UNet (trained, float32 weights), the VAE and the text encoder(s) (frozen, model.dtype),
read from each component's config.json and built on PyTorch's meta device (nothing is allocated or
downloaded). FLOPs of one UNet forward come from `torch.utils.flop_counter.FlopCounterMode` and the saved
activations from `torch.autograd.graph.saved_tensors_hooks`, both on meta tensors at the configured
resolution: counted, not guessed. Not covered: reward models (CLIP, aesthetic heads: loaded to score, then
freed), the VAE decode's activations, the text encoders' time. Generation memory leaves the inference
forward's transient activations out (not estimated); the fine-tune counts every activation saved for backward.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from raftlib.estimates import (
    ASSUMPTIONS,
    BYTES_PER_ELEMENT,
    FORWARD_MFU,
    RUNTIME_OVERHEAD_BYTES,
    TRAIN_MFU,
    USABLE_FRACTION,
    GiB,
    Hardware,
    Plan,
    StageEstimate,
    Term,
)
from raftlib.sections import ConfigError

# Stable Diffusion 1.5's component configs (stable-diffusion-v1-5/stable-diffusion-v1-5), for offline planning.
SD15 = {
    "unet": {"_class_name": "UNet2DConditionModel", "cross_attention_dim": 768, "sample_size": 64},  # rest: defaults
    "vae": {
        "_class_name": "AutoencoderKL",
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "latent_channels": 4,
        "sample_size": 512,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "text_encoder": {
        "_class_name": "CLIPTextModel",
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "vocab_size": 49408,
        "max_position_embeddings": 77,
    },
}
KNOWN_PIPELINES = {"stable-diffusion-v1-5/stable-diffusion-v1-5": SD15, "runwayml/stable-diffusion-v1-5": SD15}


def _component_configs(path: str, override: str | None) -> dict[str, dict]:
    root = Path(override or path).expanduser()
    if (root / "unet" / "config.json").is_file():
        found = {}
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            file = root / name / "config.json"
            if file.is_file():
                found[name] = json.loads(file.read_text())
        return found
    if path in KNOWN_PIPELINES:
        return KNOWN_PIPELINES[path]
    raise ConfigError(
        f"model.path = {path!r}: no unet/config.json there and not a known pipeline ({', '.join(KNOWN_PIPELINES)}); "
        "give a dir holding the pipeline's config files with --model-config DIR"
    )


def _build_on_meta(name: str, raw: dict) -> torch.nn.Module:
    import diffusers
    import transformers

    cls_name = raw.get("_class_name") or (raw.get("architectures") or ["CLIPTextModel"])[0]
    with torch.device("meta"):
        if hasattr(diffusers, cls_name):
            cls = getattr(diffusers, cls_name)
            return cls.from_config({k: v for k, v in raw.items() if not k.startswith("_")})
        config_cls = transformers.CLIPTextConfig
        cls = getattr(transformers, cls_name)
        values = {k: v for k, v in raw.items() if k not in ("architectures", "_class_name", "model_type")}
        return cls(config_cls(**values))


def _unet_forward_counts(
    unet: torch.nn.Module, batch: int, latent: tuple[int, int], channels: int, context: int | None
):
    """(FLOPs of one forward, bytes of activations saved for backward) at this batch and latent size, on meta."""
    from torch.utils.flop_counter import FlopCounterMode

    sample = torch.zeros(batch, channels, *latent, device="meta")
    timesteps = torch.zeros(batch, dtype=torch.long, device="meta")
    kwargs = (
        {"class_labels": torch.zeros(batch, dtype=torch.long, device="meta")}
        if context is None
        else {"encoder_hidden_states": torch.zeros(batch, 77, context, device="meta")}
    )
    if context is None and getattr(unet.config, "num_class_embeds", None) is None:
        kwargs = {}
    # Each saved storage once (ops save the same tensor, or views of it, many times); weights are not activations.
    weights = {p.untyped_storage()._cdata for p in unet.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    counter = FlopCounterMode(display=False)
    with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(sample, timesteps, **kwargs)
    return counter.get_total_flops(), sum(saved.values())


def plan_diffusion(config, hw: Hardware, sharding: str, *, model_config: str | None = None) -> Plan:
    raw = _component_configs(config.model.path, model_config)
    modules = {name: _build_on_meta(name, values) for name, values in raw.items()}
    unet = modules["unet"]
    n_unet = sum(p.numel() for p in unet.parameters())
    frozen = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items() if name != "unet"}
    models = {name: f"{n / 1e6:.1f} M parameters" for name, n in {"unet": n_unet, **frozen}.items()}
    g, t, lp = config.generation, config.training, config.loop
    # `auto` is bf16 on CUDA (raftlib.diffusion.pipelines), and the planner plans for GPUs
    P, fb = hw.gpus, BYTES_PER_ELEMENT["bfloat16" if config.model.dtype == "auto" else config.model.dtype]
    scale = 2 ** (len(raw["vae"]["block_out_channels"]) - 1) if "vae" in raw else 1
    size = unet.config.sample_size * scale
    height, width = g.height or size, g.width or size
    latent = (height // scale, width // scale)
    channels = unet.config.in_channels
    context = getattr(unet.config, "cross_attention_dim", None) if "text_encoder" in raw else None
    rows = g.prompts_per_batch * g.samples_per_prompt * (2 if g.guidance_scale > 1 else 1)  # CFG doubles the batch
    forward_flops, saved_per_image = _unet_forward_counts(unet, 1, latent, channels, context)
    bf16 = t.mixed_precision != "no"
    peak = hw.gpu_tflops * 1e12 if bf16 else hw.fp32_peak * 1e12
    overhead = Term("runtime", RUNTIME_OVERHEAD_BYTES, "CUDA context + allocator slack (assumed)")
    weights = (
        Term("UNet weights", n_unet * 4, f"N_unet x 4 B = {n_unet:,} x 4 (trained weights stay float32)"),
        Term(
            "frozen parts", sum(frozen.values()) * fb, f"VAE + text encoders x {fb} B = {sum(frozen.values()):,} x {fb}"
        ),
    )
    limit = hw.gpu_memory_gib * GiB * USABLE_FRACTION
    stages = []

    gen_memory = (
        *weights,
        Term(
            "latents",
            rows * channels * latent[0] * latent[1] * 4 * 3,
            f"rows x C x h x w x 4 B x 3 = {rows} x {channels} x {latent[0]} x {latent[1]} x 12",
        ),
        Term("UNet activations", 0, "not estimated: an inference forward frees each block's activations as it goes"),
        overhead,
    )
    images = lp.prompts_per_iteration * g.samples_per_prompt * (2 if g.guidance_scale > 1 else 1)
    gen_seconds = forward_flops * g.num_inference_steps * images / P / (peak * FORWARD_MFU)
    stages.append(
        StageEstimate(
            "generate",
            gen_memory,
            (
                Term(
                    "UNet",
                    gen_seconds,
                    f"FLOPs per image x steps x images / P / (peak x MFU) = {forward_flops:.3g} x "
                    f"{g.num_inference_steps} x {images} / {P}",
                ),
            ),
            fits=sum(x.value for x in gen_memory) <= limit,
            key="generation.prompts_per_batch",
        )
    )

    stages += _finetune_stages(config, hw, sharding, unet, n_unet, weights[1], forward_flops, saved_per_image, peak)
    covered = "diffusion: UNet FLOPs and saved activations counted on the meta device; rewards, VAE decode not covered"
    return Plan(hw, sharding, lp.iterations, tuple(stages), (), (*ASSUMPTIONS, covered), models)


def _finetune_stages(config, hw, sharding, unet, n_unet, frozen, forward_flops, saved_per_image, peak) -> list:
    """The UNet fine-tune under DDP and under FSDP (the one not chosen shown as an alternative)."""
    t, lp, P = config.training, config.loop, hw.gpus
    bf16 = t.mixed_precision != "no"
    limit = hw.gpu_memory_gib * GiB * USABLE_FRACTION
    overhead = Term("runtime", RUNTIME_OVERHEAD_BYTES, "CUDA context + allocator slack (assumed)")
    lora = config.model.lora
    trainable = n_unet if lora is None else _lora_params(unet, lora)
    kept = config.kept_per_iteration or lp.prompts_per_iteration
    train_flops = (3 if lora is None else 2) * forward_flops * kept * t.epochs  # forward + backward (2x; LoRA 1x)
    stages = []
    time_terms = (
        Term(
            "train",
            train_flops / (P * peak * TRAIN_MFU),
            f"{3 if lora is None else 2} x FLOPs x kept x epochs / (P x peak x MFU)",
        ),
    )
    act = Term(
        "activations",
        t.micro_batch_size * saved_per_image * (0.5 if bf16 else 1),
        f"micro_batch x saved per image = {t.micro_batch_size} x {saved_per_image / 2**20:.1f} MiB (float32, counted on meta"
        + (", halved for bf16)" if bf16 else ")"),
    )
    for strategy in ("ddp", "fsdp"):
        shard = P if strategy == "fsdp" else 1
        memory = (
            Term("UNet weights", (trainable * 4 + (n_unet - trainable) * 4) / shard, f"N_unet x 4 B / {shard}"),
            frozen,
            Term(
                "gradients + AdamW",
                3 * trainable * 4 / shard,
                f"3 x trainable x 4 B / {shard} = 3 x {trainable:,} x 4 / {shard}",
            ),
            act,
            overhead,
        )
        fits = sum(x.value for x in memory) <= limit
        stages.append(
            StageEstimate(
                f"fine-tune ({strategy.upper()})",
                memory,
                time_terms,
                fits=fits,
                key=None if fits else ("training.micro_batch_size" if act.value > limit / 3 else "model.lora"),
                alternative=strategy != sharding,
            )
        )
    return stages


def _lora_params(unet: torch.nn.Module, lora) -> int:
    from raftlib.diffusion.pipelines import DEFAULT_LORA_TARGETS

    targets = lora.target_modules or DEFAULT_LORA_TARGETS.get("stable_diffusion", [])
    return sum(
        lora.r * (m.in_features + m.out_features)
        for name, m in unet.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )
