"""One fine-tune stage for any model: a fresh optimizer and schedule, seeded epoch orders, through accelerate.

No transformers.Trainer: a plain loop over epochs and micro-batches. Each RAFT iteration is a fresh
SFT stage (new optimizer, new schedule), as in the paper. The data order of an iteration comes from a
permutation seeded by (seed, iteration, epoch), so re-running a stage after a crash reproduces it. What is
trained on and how its loss is computed is the caller's: the completion loss of `raftlib.text.finetune`, the
denoising loss of `raftlib.diffusion.train`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from raftlib.sections import TrainingSection

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneStats:
    optimizer_steps: int
    micro_batches: int
    trained_tokens: int
    """Units trained on: completion tokens for a language model, images for a diffusion model."""
    first_epoch_loss: float
    last_epoch_loss: float
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.trained_tokens / self.seconds if self.seconds > 0 else math.nan


def epoch_order(count: int, seed: int, iteration: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation seeded by (seed, iteration, epoch)."""
    rng = np.random.default_rng([seed, iteration, epoch])
    return rng.permutation(count).tolist()


def _schedule(name: str, total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if name == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # cosine

    return factor


def train_stage(
    model,
    items: list,
    collate_fn: Callable[[list], dict],
    loss_of: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]],
    section: TrainingSection,
    *,
    seed: int,
    iteration: int,
    accelerator=None,
    progress: bool = True,
):
    """One RAFT fine-tune stage for any model: a fresh AdamW and schedule, seeded epoch orders.

    `loss_of(model, batch)` returns the micro-batch loss and how many units (tokens, images) it trained
    on. Shared by the language-model and the diffusion paths. Returns (unwrapped model, FinetuneStats).
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from raftlib.sharding import stage_accelerator

    if not items:
        raise ValueError("nothing to fine-tune on: the kept set is empty")
    # One way to get the stage's Accelerator, so training.mixed_precision holds for every caller.
    accelerator = stage_accelerator(section, accelerator)
    torch.manual_seed(seed * 1_000_003 + iteration)  # dropout masks and noise are part of the reproducible stage
    started = time.perf_counter()

    fused = accelerator.device.type == "cuda"  # one kernel per step for all tensors on a GPU
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=section.learning_rate, weight_decay=section.weight_decay, fused=fused,
    )  # fmt: skip
    model, optimizer = accelerator.prepare(model, optimizer)
    # After prepare: FSDP2 replaces each parameter by a sharded one, so the list is taken from the prepared model.
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loader_for(epoch: int):
        order = epoch_order(len(items), seed, iteration, epoch)
        loader = DataLoader(
            [items[i] for i in order], batch_size=section.micro_batch_size, shuffle=False, collate_fn=collate_fn
        )
        return accelerator.prepare(loader)

    steps_per_epoch = math.ceil(len(loader_for(0)) / section.gradient_accumulation_steps)
    total_steps = steps_per_epoch * section.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(section.lr_scheduler, total_steps, int(section.warmup_ratio * total_steps))
    )

    model.train()
    optimizer_steps = micro_batches = trained_units = 0
    epoch_losses: list[float] = []
    bar = tqdm(total=total_steps, desc="fine-tune", unit="step", disable=None if progress else True, leave=False)
    for epoch in range(section.epochs):
        losses = []
        for batch in loader_for(epoch):
            with accelerator.accumulate(model):
                # The whole loss under the run's autocast, not only the model's forward: a loss that calls
                # the output head itself (the chunked cross-entropy) would otherwise multiply in float32.
                with accelerator.autocast():
                    loss, units = loss_of(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if section.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(trainable, section.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer_steps += 1
                    bar.update(1)
                optimizer.zero_grad(set_to_none=True)
            micro_batches += 1
            trained_units += units
            losses.append(float(loss.detach()))
        if accelerator.num_processes > 1:  # the mean over every process's micro-batches
            totals = torch.tensor([sum(losses), len(losses)], dtype=torch.float64, device=accelerator.device)
            loss_sum, loss_count = accelerator.reduce(totals, "sum").tolist()
            epoch_losses.append(loss_sum / loss_count)
        else:
            epoch_losses.append(float(np.mean(losses)))
    bar.close()
    if accelerator.num_processes > 1:
        counts = torch.tensor([trained_units, micro_batches], device=accelerator.device)
        trained_units, micro_batches = (int(v) for v in accelerator.reduce(counts, "sum").tolist())

    # Under FSDP the unwrapped model still holds sharded weights: the loop gathers them (raftlib.sharding).
    model = accelerator.unwrap_model(model)
    accelerator.free_memory()  # drop the accelerator's references to this stage's optimizer state
    model.eval()
    stats = FinetuneStats(
        optimizer_steps=optimizer_steps,
        micro_batches=micro_batches,
        trained_tokens=trained_units,
        first_epoch_loss=epoch_losses[0],
        last_epoch_loss=epoch_losses[-1],
        seconds=time.perf_counter() - started,
    )
    return model, stats
