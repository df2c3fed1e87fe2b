"""Fine-tune losses on the kept set, as pure functions of per-token log-probabilities.

`training.loss: sft` is RAFT's cross-entropy (`raftlib.finetune.completion_loss`). `training.loss: raftpp`
is RAFT++ (Xiong et al. 2025, arXiv 2504.11343): the same kept samples, but each token's log-likelihood
gradient is weighted by its importance ratio to the policy that sampled it, clipped as in PPO:

    r_t = pi_theta(y_t | x, y_<t) / pi_old(y_t | x, y_<t)
    loss = token-mean over kept tokens of  -min(r_t * A, clip(r_t, 1 - eps_low, 1 + eps_high) * A)

with A = 1 for every kept sample (RAFT++ keeps RAFT's rejection sampling: a kept sample is a positive
example, a rejected one is absent). pi_old is fixed for the whole stage, so as the stage's mini-batches
move the policy the ratio drifts from 1 and the clip stops a token from being pushed further once it has
gained more than eps_high of probability. At r_t = 1 the gradient equals SFT's (d r/d theta = d log p/d theta
there). The mean is over every completion token of the micro-batch (verl's `token-mean`, as in the
authors' RLHFlow/Minimal-RL `policy_loss=plusplus`). A separate clip-higher bound (eps_high > eps_low,
e.g. 0.28 vs 0.2, DAPO's choice) lets rare tokens grow more before they are clipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClippedLoss:
    """The RAFT++ loss of one micro-batch and what it clipped (for logging)."""

    loss: torch.Tensor
    """Scalar: token-mean of -min(r*A, clip(r)*A) over masked tokens; differentiable in `logprobs`."""
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
    """PPO's clipped surrogate, token-mean, with A = 1 unless `advantages` are given.

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
    loss = (per_token * mask).sum() / count
    with torch.no_grad():
        clip_fraction = float(((clipped > unclipped) & mask).sum() / count)
        approx_kl = float((-log_ratio * mask).sum() / count)
    return ClippedLoss(loss=loss, clip_fraction=clip_fraction, approx_kl=approx_kl)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row's distribution softmax(logits): (..., V) -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
