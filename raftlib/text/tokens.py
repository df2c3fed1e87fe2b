"""Token-level numerics of a causal language model, pure and unit-tested: the batches (padded or packed), the
completion loss (whole or chunked over the vocabulary) and the log-probabilities the KL key, RAFT++ and the
reference perplexity need. The losses (`raftlib.text.losses`) and the fine-tune (`raftlib.text.finetune`) build
on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

IGNORE_INDEX = -100
"""Label of positions that carry no loss (prompt tokens and padding)."""

Example = tuple[list[int], list[int]]
"""(prompt_token_ids, completion_token_ids): exactly the tokens the model saw and sampled."""


# ----------------------------------------------------------------------------------------------
# Batches (pure)
# ----------------------------------------------------------------------------------------------


def completion_labels(prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[int]:
    """Labels for prompt + completion: prompt positions masked, completion tokens (EOS included) kept."""
    return [IGNORE_INDEX] * len(prompt_ids) + list(completion_ids)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels. Masks come from lengths, never from the pad id."""
    width = max(len(p) + len(c) for p, c in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    attention = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, (prompt, completion) in enumerate(examples):
        sequence = list(prompt) + list(completion)
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention[row, : len(sequence)] = 1
        labels[row, : len(sequence)] = torch.tensor(completion_labels(prompt, completion))
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def collate_packed(examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    """The micro-batch as one padding-free row: samples end to end, position ids restarting at each.

    With no attention mask and restarting positions, transformers builds a block-diagonal causal mask
    (`masking_utils.find_packed_sequence_indices`), so each sample attends only to itself: the same
    loss as the padded batch, with no compute spent on padding.
    """
    sequences = [list(p) + list(c) for p, c in examples]
    input_ids = torch.tensor([t for seq in sequences for t in seq], dtype=torch.long)[None]  # (1, N)
    positions = torch.tensor([i for seq in sequences for i in range(len(seq))], dtype=torch.long)[None]  # (1, N)
    labels = torch.tensor([t for p, c in examples for t in completion_labels(p, c)], dtype=torch.long)[None]
    return {"input_ids": input_ids, "position_ids": positions, "labels": labels}


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log p(label) and a mask of positions with a label.

    logits: (B, T, V) predicting the next token; labels: (B, T). Returns (B, T-1) each.
    """
    shifted_labels = labels[:, 1:]  # (B, T-1)
    mask = shifted_labels != IGNORE_INDEX
    safe = shifted_labels.clamp(min=0)
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, safe[..., None]).squeeze(-1)
    return logp * mask, mask


def completion_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over completion tokens of the batch (token-level mean; `SFTLoss` sums instead)."""
    logp, mask = token_logprobs(logits, labels)
    return -logp.sum() / mask.sum().clamp(min=1)


def chunked_completion_nll(
    hidden: torch.Tensor, labels: torch.Tensor, output_head: torch.nn.Module, chunk_tokens: int
) -> torch.Tensor:
    """The summed cross-entropy of the completion tokens from the last hidden states, never holding more than
    `chunk_tokens` rows of logits.

    hidden: (B, T, D) after the final norm; labels: (B, T). Logits are computed only where a completion
    token is predicted, `chunk_tokens` positions at a time, and each chunk is recomputed in the backward
    pass instead of kept: with a 152k vocabulary, float32 logits of 16k tokens would take 10 GB.
    """
    from torch.utils.checkpoint import checkpoint

    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    picked_hidden = hidden[:, :-1][mask]  # (N, D)
    picked_targets = targets[mask]  # (N,)

    def chunk_nll(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = output_head(h).float()  # (C, V)
        return torch.nn.functional.cross_entropy(logits, t, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, picked_targets.shape[0], chunk_tokens):
        stop = start + chunk_tokens
        total = total + checkpoint(
            chunk_nll, picked_hidden[start:stop], picked_targets[start:stop], use_reentrant=False
        )
    return total


def chunked_token_logprobs(
    hidden: torch.Tensor, labels: torch.Tensor, output_head: torch.nn.Module, chunk_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs` from the last hidden states, never holding more than `chunk_tokens` rows of logits (each
    chunk recomputed in the backward pass): (B, T-1) log p(label), zero where there is no label, and the mask."""
    from torch.utils.checkpoint import checkpoint

    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked_hidden, picked_targets = hidden[:, :-1][mask], targets[mask]

    def chunk_logp(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(output_head(h).float(), dim=-1).gather(-1, t[:, None]).squeeze(-1)

    parts = [
        checkpoint(
            chunk_logp, picked_hidden[s : s + chunk_tokens], picked_targets[s : s + chunk_tokens], use_reentrant=False
        )
        for s in range(0, picked_targets.shape[0], chunk_tokens)
    ]
    logp = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device)
    logp[mask] = torch.cat(parts) if parts else logp.new_zeros(0)
    return logp, mask


def output_head(model) -> torch.nn.Module:
    """The output projection (lm_head) of a causal LM, through a peft wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(base).__name__} has no output embeddings: training.loss_chunk_tokens needs one")
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(base.config, name, None) not in (None, 1, 1.0):
            raise ValueError(
                f"{type(base).__name__} transforms its logits ({name} = {getattr(base.config, name)}), which the "
                "chunked loss would skip; set training.loss_chunk_tokens = 0"
            )
    return head


@torch.no_grad()
def completion_token_logprobs(
    model, examples: Sequence[Example], pad_id: int, *, batch_size: int = 16, chunk_tokens: int = 0
) -> list[list[float]]:
    """log p(token | prefix) of every completion token of each example, in eval mode (no dropout).

    RAFT++ takes these once per stage from the sampling policy, before its first update: they are pi_old.
    `chunk_tokens` > 0 computes them from the hidden states that many positions at a time (`training.
    loss_chunk_tokens`): float32 logits of 16 rows x 3,072 tokens over a 152k vocabulary would be 30 GB.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[list[float]] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate(chunk, pad_id)
            inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
            if chunk_tokens:
                forward = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
                logp, mask = chunked_token_logprobs(
                    forward.hidden_states[-1], batch["labels"].to(device), output_head(model), chunk_tokens
                )
            else:
                logp, mask = token_logprobs(model(**inputs, use_cache=False).logits, batch["labels"].to(device))
            out.extend(row[m].cpu().tolist() for row, m in zip(logp, mask, strict=True))
    finally:
        model.train(was_training)
    return out


def collate_with_old(items: Sequence[tuple[list[int], list[int], list[float]]], pad_id: int) -> dict[str, torch.Tensor]:
    """`collate` plus old_logprobs (B, T-1), aligned with the shifted labels that `token_logprobs` scores."""
    batch = collate([(p, c) for p, c, _ in items], pad_id)
    old = torch.zeros((len(items), batch["input_ids"].shape[1] - 1), dtype=torch.float32)  # (B, T-1)
    for row, (prompt, completion, logprobs) in enumerate(items):
        if len(logprobs) != len(completion):
            raise ValueError(f"{len(logprobs)} old log-probabilities for a completion of {len(completion)} tokens")
        start = len(prompt) - 1  # the position whose next token is the completion's first
        old[row, start : start + len(completion)] = torch.tensor(logprobs)
    batch["old_logprobs"] = old
    return batch


@torch.no_grad()
def completion_logprobs(
    model, examples: Sequence[Example], pad_id: int, *, batch_size: int = 16
) -> tuple[list[float], list[int]]:
    """Sum of log p(completion | prompt) per example, and its token count (teacher forcing)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: list[float] = []
    counts: list[int] = []
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_id)
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            logp, mask = token_logprobs(logits, batch["labels"].to(device))
            sums.extend(logp.sum(-1).cpu().tolist())
            counts.extend(mask.sum(-1).cpu().tolist())
    finally:
        model.train(was_training)
    return sums, counts


def reference_perplexity(model, text_format, prompts, column: str, *, append_eos: bool = False) -> float:
    """Perplexity of reference responses (`prompt.columns[column]`) given their prompts; NaN if none.

    Prompts are encoded as the run encodes them (`text_format`: a `raftlib.text.prompts.TextFormat`).
    `append_eos` also scores the EOS that ends a complete response; the loop's `eval_reference_ppl` scores the
    response text alone (every notebook reads that one).
    """
    from raftlib.metrics import perplexity

    examples = reference_examples(text_format, prompts, column, append_eos=append_eos)
    if not examples:
        return math.nan
    sums, counts = completion_logprobs(model, examples, text_format.pad_id)
    return perplexity(-sum(sums), sum(counts))


def reference_examples(
    text_format, prompts, column: str, *, append_eos: bool = False
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids) of every prompt with a non-empty `column`: what `reference_perplexity` scores,
    and what an SFT on those references must train on for the two to measure the same thing. The reference is
    encoded exactly as written (a leading space is part of the continuation)."""
    usable = [p for p in prompts if isinstance(p.columns.get(column), str) and p.columns[column]]
    eos = [text_format.eos_id] if append_eos else []
    return [
        (ids, text_format.tokenizer(p.columns[column], add_special_tokens=False)["input_ids"] + eos)
        for p, ids in zip(usable, text_format.encode(usable), strict=True)
    ]
