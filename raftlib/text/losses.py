"""The fine-tune losses of a language model, as registered parts: `training.loss` names one of `LOSSES` or a
`module:name` you wrote (a factory called as `factory(training_section, pad_id)` that returns a `Loss`,
`raftlib.finetune.Loss`). Every loss returns a sum over completion tokens; the stage divides each optimizer
step by its token count (`raftlib.finetune`).

    sft     RAFT's cross-entropy on the kept completions (Dong et al. 2023): padded or packed micro-batches,
            whole or chunked logits (`training.packing`, `training.loss_chunk_tokens`).
    raftpp  RAFT++ (Xiong et al. 2025, arXiv 2504.11343): the same kept samples, each token's log-likelihood
            gradient weighted by its importance ratio to the policy that sampled it, clipped as in PPO:

                r_t = pi_theta(y_t | x, y_<t) / pi_old(y_t | x, y_<t)
                loss = sum over kept tokens of  -min(r_t * A, clip(r_t, 1 - eps_low, 1 + eps_high) * A)

            with A = 1 for every kept sample (a kept sample is a positive example, a rejected one is absent).
            pi_old is fixed for the whole stage (`prepare`, before the first update), so as the stage's steps
            move the policy the ratio drifts from 1 and the clip stops a token from being pushed further once it
            has gained more than eps_high of probability. At r_t = 1 the gradient equals SFT's. A separate
            clip-higher bound (eps_high > eps_low, e.g. 0.28 vs 0.2, DAPO's choice) lets rare tokens grow more.

What a loss cannot do it declares (`packing`, `chunks_logits`); `build_loss` refuses a config that asks for it.
A loss you write (ten lines; `training.loss: my_losses:TokenWeightedSFT`):

    from raftlib.text.tokens import collate, token_logprobs

    class TokenWeightedSFT:
        packing = False                                   # it reads an attention mask, so no packed rows
        def __init__(self, training, pad_id): self.pad_id = pad_id
        def prepare(self, model, examples): return examples
        def collate(self, examples): return collate(examples, self.pad_id)
        def units(self, batch): return int((batch["labels"] != -100).sum())
        def __call__(self, model, batch):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logp, mask = token_logprobs(logits, batch["labels"])      # (B, T-1) each
            return -(logp * (1.0 + 0.5 * logp.exp().detach())).sum()  # your per-token weighting
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from raftlib.sections import ConfigError, TrainingSection


@dataclass(frozen=True)
class ClippedLoss:
    """The RAFT++ loss of one micro-batch and what it clipped (for logging)."""

    loss: torch.Tensor
    """Scalar: sum of -min(r*A, clip(r)*A) over masked tokens; differentiable in `logprobs`."""
    clip_fraction: float
    """Share of masked tokens whose clipped term was the active (smaller) one, so their gradient is zero."""
    approx_kl: float
    """Token-mean of log pi_old - log pi_theta: how far the stage has moved from the sampling policy."""


def clipped_ratio_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    advantages: torch.Tensor | None = None,
) -> ClippedLoss:
    """PPO's clipped surrogate summed over masked tokens, with A = 1 unless `advantages` are given.

    logprobs: (B, T) log pi_theta of the sampled tokens (with grad); old_logprobs: (B, T) log pi_old of the
    same tokens (no grad); mask: (B, T) bool, True at completion tokens; advantages: (B, T) or (B, 1).
    `clip_high` None means symmetric clipping (clip_high = clip_low).
    """
    if clip_low < 0 or (clip_high is not None and clip_high < 0):
        raise ValueError(f"clip ranges must be >= 0, got {clip_low} and {clip_high}")
    clip_high = clip_low if clip_high is None else clip_high
    mask = mask.bool()
    advantages = torch.ones_like(logprobs) if advantages is None else advantages.to(logprobs.dtype)
    log_ratio = logprobs - old_logprobs.detach()
    # Outside the mask the log-probabilities may be anything (padding); zero them so exp() stays finite.
    log_ratio = torch.where(mask, log_ratio, torch.zeros_like(log_ratio))
    ratio = torch.exp(log_ratio)  # (B, T)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)  # = -min(r*A, clip(r)*A)
    count = mask.sum().clamp(min=1)
    loss = (per_token * mask).sum()
    with torch.no_grad():
        clip_fraction = float(((clipped > unclipped) & mask).sum() / count)
        approx_kl = float((-log_ratio * mask).sum() / count)
    return ClippedLoss(loss=loss, clip_fraction=clip_fraction, approx_kl=approx_kl)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row's distribution softmax(logits): (..., V) -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ----------------------------------------------------------------------------------------------
# The registered losses
# ----------------------------------------------------------------------------------------------


class SFTLoss:
    """Cross-entropy on the kept completions (prompt tokens masked), summed over completion tokens."""

    packing = True
    chunks_logits = True

    def __init__(self, training: TrainingSection, pad_id: int) -> None:
        self.training, self.pad_id = training, pad_id

    def prepare(self, model, examples: Sequence) -> Sequence:
        self.head = None
        if self.training.loss_chunk_tokens:
            from raftlib.text.tokens import output_head

            self.head = output_head(model)
        return examples

    def collate(self, examples: Sequence) -> dict[str, torch.Tensor]:
        from raftlib.text.tokens import collate, collate_packed

        return collate_packed(examples) if self.training.packing else collate(examples, self.pad_id)

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        from raftlib.text.tokens import IGNORE_INDEX

        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from raftlib.text.tokens import chunked_completion_nll, token_logprobs

        labels = batch["labels"]
        # Packed rows carry position ids and no mask (block-diagonal attention); padded rows a mask.
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        if self.head is None:
            logp, _ = token_logprobs(model(**inputs, use_cache=False).logits, labels)
            return -logp.sum()
        # hidden states from the forward (through any DDP wrapper), logits chunk by chunk
        out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
        return chunked_completion_nll(out.hidden_states[-1], labels, self.head, self.training.loss_chunk_tokens)


class RaftPPLoss:
    """RAFT++ (module docstring): the clipped ratio to pi_old, which `prepare` takes once per stage."""

    packing = False  # pi_old is aligned with padded rows' positions
    chunks_logits = True

    def __init__(self, training: TrainingSection, pad_id: int) -> None:
        self.training, self.pad_id = training, pad_id

    def prepare(self, model, examples: Sequence) -> list:
        from raftlib.text.tokens import completion_token_logprobs

        # pi_old: the policy that generated the kept samples is the one entering this stage; take its
        # per-token log-probabilities now, once, before any update moves it.
        # In the precision pi_theta is trained in (training.mixed_precision's autocast, as the stage's loss runs; a
        # sharded stage's bf16 compute too): pi_old in float32 beside a bf16 pi_theta makes the ratio of weights
        # that have not moved differ from 1.
        chunk = self.training.loss_chunk_tokens
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.training.mixed_precision)
        device = next(model.parameters()).device.type
        with torch.autocast(device, dtype=half or torch.bfloat16, enabled=half is not None):
            old = completion_token_logprobs(
                model, list(examples), self.pad_id, batch_size=self.training.micro_batch_size, chunk_tokens=chunk
            )
        self.head = None
        if chunk:
            from raftlib.text.tokens import output_head

            self.head = output_head(model)
        return [(prompt, completion, lp) for (prompt, completion), lp in zip(examples, old, strict=True)]

    def collate(self, items: Sequence) -> dict[str, torch.Tensor]:
        from raftlib.text.tokens import collate_with_old

        return collate_with_old(items, self.pad_id)

    units = staticmethod(SFTLoss.units)

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from raftlib.text.tokens import chunked_token_logprobs, token_logprobs

        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        if self.head is None:
            logp, mask = token_logprobs(model(**inputs).logits, batch["labels"])  # (B, T-1) each
        else:  # logits a chunk of positions at a time (training.loss_chunk_tokens), recomputed in the backward
            out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
            logp, mask = chunked_token_logprobs(
                out.hidden_states[-1], batch["labels"], self.head, self.training.loss_chunk_tokens
            )
        clip = (self.training.clip_range, self.training.clip_range_high)
        return clipped_ratio_loss(logp, batch["old_logprobs"], mask, clip_low=clip[0], clip_high=clip[1]).loss


LOSSES: dict[str, Callable[[TrainingSection, int], Any]] = {"sft": SFTLoss, "raftpp": RaftPPLoss}
"""`training.loss` names: a factory `(training_section, pad_id) -> Loss`. Add an entry, or name `module:name`."""


def build_loss(training: TrainingSection, pad_id: int):
    """The `Loss` `training.loss` names, checked against what the config asks of it (packing, chunking)."""
    name = training.loss
    if name in LOSSES:
        factory = LOSSES[name]
    elif ":" in name:
        from raftlib.rewards import RewardError, import_object

        try:
            factory = import_object(name, what="training.loss")
        except RewardError as error:
            raise ConfigError(str(error)) from None
    else:
        raise ConfigError(
            f"training.loss = {name!r}: not a built-in loss ({', '.join(sorted(LOSSES))}) nor a module:name path"
        )
    loss = factory(training, pad_id)
    for method in ("prepare", "collate", "units", "__call__"):
        if not callable(getattr(loss, method, None)):
            raise ConfigError(f"training.loss = {name!r}: the loss has no {method}() (raftlib.finetune.Loss)")
    if training.packing and not getattr(loss, "packing", False):
        raise ConfigError(f"training.packing = true: loss {name!r} cannot train on packed micro-batches")
    if training.loss_chunk_tokens and not getattr(loss, "chunks_logits", False):
        raise ConfigError(
            f"training.loss_chunk_tokens = {training.loss_chunk_tokens}: loss {name!r} does not chunk its logits (set 0)"
        )
    return loss
