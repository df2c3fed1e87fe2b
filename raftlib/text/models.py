"""Loading and saving the policy: Hugging Face format, safetensors, full or LoRA (peft)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from raftlib.hub import ModelLoadError, check_local
from raftlib.text.config import ModelSection

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(section: ModelSection, path: str | None = None):
    """The policy's tokenizer. A tokenizer without a pad token pads with EOS.

    Padding with EOS is safe here because every mask and label is built from sequence lengths,
    never by comparing token ids with the pad id: the EOS that ends a completion stays a training
    target, so the model learns to stop (LMFlow's RAFT masked EOS away by setting pad = eos).
    """
    from transformers import AutoTokenizer

    source = path or section.path
    check_local(source, "model.path")
    tokenizer = AutoTokenizer.from_pretrained(
        source, trust_remote_code=section.trust_remote_code, revision=section.revision
    )
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelLoadError(f"tokenizer at {source!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_model_config(section: ModelSection):
    """The policy's config and generation config (for its context window and EOS ids), without its weights."""
    from transformers import AutoConfig, GenerationConfig

    check_local(section.path, "model.path")
    options = {"trust_remote_code": section.trust_remote_code, "revision": section.revision}
    config = AutoConfig.from_pretrained(section.path, **options)
    try:
        generation = GenerationConfig.from_pretrained(section.path, revision=section.revision)
    except OSError:  # no generation_config.json: the model config's own EOS
        generation = GenerationConfig.from_model_config(config)
    return config, generation


def load_base_model(section: ModelSection, device: torch.device | str = "cpu"):
    """The initial policy pi_0 exactly as `model.path` holds it (also the KL reference)."""
    from transformers import AutoModelForCausalLM

    check_local(section.path, "model.path")
    model = AutoModelForCausalLM.from_pretrained(
        section.path,
        dtype=_DTYPES[section.dtype],
        trust_remote_code=section.trust_remote_code,
        revision=section.revision,
        use_safetensors=None,  # prefer safetensors; a .bin-only dir still loads with weights_only
    )
    return model.to(device)


def load_policy(
    section: ModelSection, checkpoint: str | Path | None = None, device: torch.device | str = "cpu", seed: int = 0
):
    """The trainable policy: the base model, with a LoRA adapter when `model.lora` is set.

    `checkpoint` is an iteration's saved model (full weights, or an adapter dir for LoRA) to resume from.
    A fresh adapter's random init is seeded by `seed`, so a run killed before its first checkpoint
    resumes from the same adapter.
    """
    from transformers import AutoModelForCausalLM

    if section.lora is None:
        if checkpoint is None:
            return load_base_model(section, device)
        model = AutoModelForCausalLM.from_pretrained(
            str(checkpoint), dtype=_DTYPES[section.dtype], trust_remote_code=section.trust_remote_code
        )
        return model.to(device)

    from peft import LoraConfig, PeftModel, get_peft_model

    base = load_base_model(section, device)
    if checkpoint is not None:
        return PeftModel.from_pretrained(base, str(checkpoint), is_trainable=True).to(device)
    lora = LoraConfig(
        r=section.lora.r,
        lora_alpha=section.lora.alpha,
        lora_dropout=section.lora.dropout,
        target_modules=section.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(base, lora).to(device)


def save_model(model, tokenizer, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Hugging Face format with safetensors: the full model, or only the adapter for LoRA.

    `state_dict` holds the weights to write when the model's own are sharded (FSDP, `raftlib.sharding`);
    save_pretrained then takes the config, file layout and adapter filtering from the model and the values
    from the dict.
    """
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(directory)


def is_peft_model(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
