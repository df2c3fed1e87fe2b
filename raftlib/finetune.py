"""One fine-tune stage for any model: a fresh optimizer and schedule, seeded epoch orders, through accelerate.

No transformers.Trainer: a plain loop over epochs and optimizer steps. Each RAFT iteration is a fresh SFT stage
(new optimizer, new schedule), as in the paper. The data order of an iteration comes from a permutation seeded
by (seed, iteration, epoch), so re-running a stage after a crash reproduces it. What is trained on and how its
loss is computed is a `Loss` (`raftlib.text.losses`: cross-entropy, RAFT++, or one you write; the denoising
loss of `raftlib.diffusion.train`).

The gradient of an optimizer step is normalised by the step's units (completion tokens, images), counted over
every micro-batch, accumulation step and process of the step: each micro-batch's loss is a sum over its units,
scaled by processes / units-in-the-step before its backward pass (DDP and FSDP average gradients over
processes). So packing, micro-batch size, accumulation and process count give the same step, up to the order
of float sums (`tests/test_finetune.py`), and a long completion weighs as much per token as a short one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from raftlib.sections import TrainingSection

logger = logging.getLogger(__name__)


class Loss(Protocol):
    """What a fine-tune stage trains with: how the kept set is prepared and batched, and each batch's loss.

    Built by `raftlib.text.losses.build_loss` (text) from `training.loss`: a name in `LOSSES` or a
    `module:name` you wrote, called as `factory(training_section, pad_id)`.
    """

    packing: bool
    """Whether the loss trains on padding-free packed micro-batches (`training.packing`)."""
    chunks_logits: bool
    """Whether the loss computes its logits in chunks of `training.loss_chunk_tokens` rows. Either flag left out
    of a loss counts as False, and `build_loss` refuses a config that asks for it."""

    def prepare(self, model: torch.nn.Module, items: Sequence[Any]) -> Sequence[Any]:
        """The items the stage trains on, computed once before the first update (RAFT++: pi_old per token)."""

    def collate(self, items: Sequence[Any]) -> dict[str, Any]:
        """One micro-batch of items as model inputs (tensors on the CPU; the stage moves them)."""

    def units(self, batch: dict[str, Any]) -> int:
        """What the batch's loss sums over (completion tokens; images): the step's normaliser counts these."""

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's loss, summed (not averaged) over its units."""


@dataclass(frozen=True)
class FinetuneStats:
    optimizer_steps: int
    micro_batches: int
    trained_tokens: int
    """Units trained on: completion tokens for a language model, images for a diffusion model."""
    first_epoch_loss: float
    """Loss per unit over the first epoch (all processes)."""
    last_epoch_loss: float
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.trained_tokens / self.seconds if self.seconds > 0 else math.nan


def epoch_order(count: int, seed: int, iteration: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation seeded by (seed, iteration, epoch)."""
    rng = np.random.default_rng([seed, iteration, epoch])
    return rng.permutation(count).tolist()


def step_plan(count: int, section: TrainingSection, processes: int) -> list[list[list[int]]]:
    """Positions (in the epoch's order) of every micro-batch of every optimizer step, per process.

    The epoch's items are cut into micro-batches of `micro_batch_size`; an optimizer step takes the next
    `processes x gradient_accumulation_steps` of them, dealt out in turn (micro-batch j of the step to process
    j mod processes). Returns steps -> processes -> the micro-batch indices each process runs (a process left
    without one in the last step runs a zero-weighted copy, so the collectives stay in step).
    """
    micro = math.ceil(count / section.micro_batch_size)
    per_step = processes * section.gradient_accumulation_steps
    steps = []
    for first in range(0, micro, per_step):
        batches = list(range(first, min(first + per_step, micro)))
        steps.append([batches[rank::processes] for rank in range(processes)])
    return steps


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


def _on(device, batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _summed(accelerator, *values: float) -> list[float]:
    """`values` summed over every process (one all-reduce)."""
    totals = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, "sum")
    return totals.tolist()


def warn_low_precision_masters(model, learning_rate: float) -> list[str]:
    """Warn when trainable weights are not float32: AdamW then updates the rounded weights themselves.

    bf16 keeps 8 significant bits, so a weight w moves only when its update exceeds half its spacing, between
    |w| x 2^-9 and |w| x 2^-8; an AdamW update is about the learning rate, so at lr 1e-6 only weights with |w|
    below 2.6e-4 to 5.1e-4 can change at all (a few percent of a trained model's). float32 master weights under bf16 autocast
    (`training.mixed_precision: bf16`, `model.dtype: float32`) keep every update; LoRA adapters are float32 in
    peft whatever the base's dtype. Returns the dtypes it warned about (empty: all float32)."""
    low = sorted(
        {str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)}
    )
    if low:
        logger.warning(
            "fine-tuning weights held in %s (pure low-precision AdamW): with 8 significant bits an update of about "
            "lr = %g moves only weights with |w| below %.2g to %.2g; load model.dtype: float32 and set "
            "training.mixed_precision: bf16 (float32 master weights under bf16 autocast) unless this is intended",
            ", ".join(low),
            learning_rate,
            learning_rate * 2**8,
            learning_rate * 2**9,
        )
    return low


def train_stage(
    model,
    items: list,
    loss: Loss,
    section: TrainingSection,
    *,
    seed: int,
    iteration: int,
    accelerator=None,
    progress: bool = True,
):
    """One RAFT fine-tune stage for any model: a fresh AdamW and schedule, seeded epoch orders, token-normalised
    steps (see the module docstring). Returns (unwrapped model, FinetuneStats)."""
    from tqdm.auto import tqdm

    from raftlib.sharding import stage_accelerator

    if not items:
        raise ValueError("nothing to fine-tune on: the kept set is empty")
    # One way to get the stage's Accelerator, so training.mixed_precision holds for every caller.
    accelerator = stage_accelerator(section, accelerator)
    torch.manual_seed(seed * 1_000_003 + iteration)  # dropout masks and noise are part of the reproducible stage
    started = time.perf_counter()
    items = list(loss.prepare(model, items))  # from the policy that drew them, before any update

    warn_low_precision_masters(model, section.learning_rate)
    fused = accelerator.device.type == "cuda"  # one kernel per step for all tensors on a GPU
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=section.learning_rate,
        weight_decay=section.weight_decay,
        fused=fused,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    # After prepare: FSDP2 replaces each parameter by a sharded one, so the list is taken from the prepared model.
    trainable = [p for p in model.parameters() if p.requires_grad]
    processes, rank = accelerator.num_processes, accelerator.process_index
    plan = step_plan(len(items), section, processes)
    total_steps = len(plan) * section.epochs
    warmup = int(section.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(section.lr_scheduler, total_steps, warmup))

    model.train()
    optimizer_steps = trained_units = 0
    epoch_losses: list[float] = []
    bar = tqdm(total=total_steps, desc="fine-tune", unit="step", disable=None if progress else True, leave=False)
    for epoch in range(section.epochs):
        order = epoch_order(len(items), seed, iteration, epoch)
        size = section.micro_batch_size
        micro = [[items[i] for i in order[start : start + size]] for start in range(0, len(order), size)]
        loss_sum = units_sum = ran = 0.0  # this process's, for the epoch's loss per unit
        for step in plan:
            # A process with no micro-batch left in the last step runs a zero-weighted copy of one, so every
            # process takes part in the gradient reduction and adds exactly nothing.
            mine, weight = (step[rank], 1.0) if step[rank] else ([step[0][0]], 0.0)
            batches = [loss.collate(micro[j]) for j in mine]
            counts = [loss.units(batch) for batch in batches]
            (step_units,) = _summed(accelerator, weight * sum(counts))
            scale = weight * processes / step_units  # DDP and FSDP average over processes: per unit of the step
            for position, batch in enumerate(batches):
                synced = position == len(batches) - 1  # gradients are reduced once per optimizer step
                with contextlib.nullcontext() if synced else accelerator.no_sync(model):
                    # The whole loss under the run's autocast, not only the model's forward: a loss that calls
                    # the output head itself (the chunked cross-entropy) would otherwise multiply in float32.
                    with accelerator.autocast():
                        summed = loss(model, _on(accelerator.device, batch))
                    accelerator.backward(summed * scale)
                loss_sum += weight * float(summed.detach())
            units_sum += weight * sum(counts)
            ran += weight * len(batches)
            trained_units += int(step_units)
            if section.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable, section.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            optimizer_steps += 1
            bar.update(1)
        loss_sum, units_sum, ran = _summed(accelerator, loss_sum, units_sum, ran)
        epoch_losses.append(loss_sum / max(units_sum, 1.0))
    bar.close()

    # Under FSDP the unwrapped model still holds sharded weights: the loop gathers them (raftlib.sharding).
    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    del optimizer, scheduler, trainable
    accelerator.free_memory()  # drop the accelerator's references to this stage's optimizer state, then its cache
    model.eval()
    stats = FinetuneStats(
        optimizer_steps=optimizer_steps,
        micro_batches=int(ran) * section.epochs,
        trained_tokens=trained_units,
        first_epoch_loss=epoch_losses[0],
        last_epoch_loss=epoch_losses[-1],
        seconds=time.perf_counter() - started,
    )
    return model, stats
