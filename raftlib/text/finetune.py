"""Fine-tune a language model on the kept set: completion-only cross-entropy (or RAFT++), full or LoRA.

`finetune` builds the loss `training.loss` names (`raftlib.text.losses`) and runs it through the shared stage
loop of `raftlib.finetune`. The token numerics it uses live in `raftlib.text.tokens` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Sequence

from raftlib.finetune import train_stage
from raftlib.sections import TrainingSection
from raftlib.text.losses import build_loss
from raftlib.text.tokens import (  # noqa: F401  (re-exported: the names this module always offered)
    IGNORE_INDEX,
    Example,
    chunked_completion_nll,
    collate,
    collate_packed,
    collate_with_old,
    completion_labels,
    completion_logprobs,
    completion_loss,
    completion_token_logprobs,
    output_head,
    reference_perplexity,
    token_logprobs,
)

# ----------------------------------------------------------------------------------------------
# The fine-tune
# ----------------------------------------------------------------------------------------------


def finetune(
    model,
    examples: Sequence[Example],
    section: TrainingSection,
    *,
    pad_id: int,
    seed: int,
    iteration: int,
    accelerator=None,
    progress: bool = True,
):
    """One stage on `examples` with the loss `section.loss` names (`raftlib.text.losses`); (model, FinetuneStats).

    The returned model is unwrapped (no DDP wrapper; under FSDP2 its weights stay sharded, see
    `raftlib.sharding.full_state_dict`); with LoRA only adapter weights train. Precision is
    `section.mixed_precision`, with or without a passed accelerator (`raftlib.sharding.stage_accelerator`).
    `section.packing`, `section.loss_chunk_tokens` and `section.gradient_checkpointing` choose how each
    micro-batch is laid out and how its loss is computed; the loss itself is the same.
    """
    loss = build_loss(section, pad_id)
    checkpointing = section.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        return train_stage(
            model,
            list(examples),
            loss,
            section,
            seed=seed,
            iteration=iteration,
            accelerator=accelerator,
            progress=progress,
        )
    finally:
        if checkpointing:
            model.gradient_checkpointing_disable()
