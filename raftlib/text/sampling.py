"""Sampling numerics and the one rule for where a completion ends, under every text decoder.

Pure functions of tensors (no model, no I/O): the logit filters (top-k, top-p) and the draw, the per-batch
seed streams, the two cache shims transformers 5.x needs, and the end-of-row rule. The eager decoder
(`raftlib.text.eager`), the static one (`raftlib.text.fastgen`) and the batch drawer all import this module.

The end-of-row rule: a row ends at the first step whose token is an EOS id ("eos"), or, before that, at the
first step after which the text of its last `stop_window` tokens holds a stop string ("stop"); otherwise it
runs to `max_new_tokens` ("length"). At one step an EOS wins over a stop string. `raftlib.text.generate`
applies it once to what any decoder drew.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import NamedTuple

import torch

from raftlib.records import FinishReason

# ----------------------------------------------------------------------------------------------
# Logit filters and the draw
# ----------------------------------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask logits outside the top-k tokens and outside the smallest set of mass >= top_p.

    logits: (B, V), already divided by the temperature. Masked entries become -inf; the most likely
    token always survives.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass *before* it already reaches top_p, so the set's mass is >= top_p.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw_step(logits: torch.Tensor, settings, uniforms: torch.Tensor) -> StepDraw:
    """One decode step for every row: (R, V) logits and (R,) uniforms in [0, 1) -> the drawn tokens, their
    log-probabilities and the entropy of the model's own distribution (temperature 1), and the draw's margin.

    The token is drawn from softmax(filter(logits / T)) (`settings`: a `Decoding`, or anything with temperature,
    top_k and top_p; T = 0 is greedy) by inverting its CDF at the row's uniform: one random number per row,
    where `torch.multinomial` would draw an exponential for every (row, token) (it was 40 % of a CPU decode
    step). Decoders differ only in where the uniforms come from (a seeded `torch.Generator` in the eager loop, a
    counter-based hash inside the compiled static step), so both draw exactly from the same distribution.
    """
    log_dist = torch.log_softmax(logits.float(), dim=-1)  # (R, V) the model's own distribution
    dist = log_dist.exp()
    entropy = -(dist * log_dist).sum(-1)  # (R,)
    if settings.temperature == 0.0:
        top_two = logits.float().topk(2, dim=-1).values  # (R, 2)
        token, margin = logits.argmax(dim=-1), top_two[:, 0] - top_two[:, 1]
    else:
        if settings.temperature == 1.0 and settings.top_k == 0 and settings.top_p >= 1.0:
            probs = dist  # sampling from the model's own distribution: no second softmax
        else:
            scaled = filter_logits(logits.float() / settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
            probs = torch.softmax(scaled, dim=-1)
        cdf = probs.cumsum(dim=-1)  # (R, V)
        target = (uniforms.float() * cdf[:, -1])[:, None]  # (R, 1), below the total mass
        # right=True: the first token whose cumulative mass exceeds the target (never a token of mass 0)
        token = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)  # (R,)
        upper = cdf.gather(-1, token[:, None]).squeeze(-1)
        lower = upper - probs.gather(-1, token[:, None]).squeeze(-1)
        margin = torch.minimum(target.squeeze(-1) - lower, upper - target.squeeze(-1))
    logprob = log_dist.gather(-1, token[:, None]).squeeze(-1)  # (R,)
    return StepDraw(token, logprob, entropy, margin)


class StepDraw(NamedTuple):
    """One decode step's draw for every row (R,) each."""

    token: torch.Tensor
    logprob: torch.Tensor
    """log p(token) under the model's own distribution (temperature 1)."""
    entropy: torch.Tensor
    """Entropy (nats) of the model's own next-token distribution."""
    margin: torch.Tensor
    """How close the draw came to another token: the top-two logit gap when greedy, else the distance from
    the target to the nearer edge of the drawn token's CDF bucket. A rounding difference between two decoders
    can change the token only where this is about as small as the rounding."""


# ----------------------------------------------------------------------------------------------
# Seed streams: one batch's draws never depend on another's
# ----------------------------------------------------------------------------------------------


def stream_seed(seed: int, *parts: int) -> int:
    """The seed of one stream (seed, iteration, batch, ...): one batch's draws never depend on another's."""
    value = seed
    for part in parts:
        value = (value * 1_000_003 + part) % (2**63 - 1)
    return value


def batch_generator(seed: int, *parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with `stream_seed(seed, *parts)`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(stream_seed(seed, *parts))
    return generator


# ----------------------------------------------------------------------------------------------
# Cache shims (transformers 5.x)
# ----------------------------------------------------------------------------------------------


def cache_argument(model) -> str:
    """transformers 5.2x renamed `past_key_values` to `cache`; use whichever this version takes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def returned_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


# ----------------------------------------------------------------------------------------------
# Where a completion ends
# ----------------------------------------------------------------------------------------------


def stop_window(stop_strings: Sequence[str]) -> int:
    """How many trailing tokens are decoded to look for a stop string (a stop string spans fewer tokens)."""
    return max((len(s) for s in stop_strings), default=0) + 8


def holds_stop(recent_ids: Sequence[int], stop_strings: Sequence[str], tokenizer) -> bool:
    """Whether the text of a row's most recent tokens (at most `stop_window` of them) holds a stop string."""
    tail = tokenizer.decode(list(recent_ids), skip_special_tokens=True)
    return any(stop in tail for stop in stop_strings)


def finish_rows(
    token_matrix: torch.Tensor,
    eos_ids: set[int] | frozenset[int],
    stop_strings: Sequence[str],
    tokenizer,
    lengths: Sequence[int] | None = None,
) -> tuple[list[FinishReason], list[int | None]]:
    """The end-of-row rule over decoded rows: (finish reason, index of the last kept token or None) per row.

    Applied once, after decoding, to what every decoder drew; `lengths` are the tokens drawn per row when rows
    differ (an engine that stops each row itself), else every row has all of the matrix's columns.
    """
    reasons: list[FinishReason] = []
    stop_at: list[int | None] = []
    window = stop_window(stop_strings)
    eos = torch.tensor(sorted(eos_ids))
    for index, full_row in enumerate(token_matrix):
        row = full_row if lengths is None else full_row[: lengths[index]]
        is_eos = torch.isin(row, eos).nonzero().flatten()
        first_eos = int(is_eos[0]) if len(is_eos) else None
        first_stop = None
        if stop_strings:
            ids = row.tolist()
            for step in range(len(ids) if first_eos is None else first_eos):
                if holds_stop(ids[max(0, step + 1 - window) : step + 1], stop_strings, tokenizer):
                    first_stop = step
                    break
        if first_stop is not None:
            reasons.append("stop")
            stop_at.append(first_stop)
        elif first_eos is not None:
            reasons.append("eos")
            stop_at.append(first_eos)
        else:
            reasons.append("length")
            stop_at.append(None if lengths is None else lengths[index] - 1)
    return reasons, stop_at


def left_pad(
    prompt_token_ids: Sequence[list[int]], width: int, pad_id: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, width) token ids and attention mask, left-padded so every prompt ends at the same column and
    decoding appends in lockstep."""
    input_ids = torch.full((len(prompt_token_ids), width), pad_id, dtype=torch.long)  # (P, L)
    attention = torch.zeros((len(prompt_token_ids), width), dtype=torch.long)  # (P, L)
    for row, ids in enumerate(prompt_token_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention[row, width - len(ids) :] = 1
    return input_ids.to(device), attention.to(device)


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """Cut the text right after the earliest stop string (the last token may run past it)."""
    ends = [text.find(stop) + len(stop) for stop in stop_strings if stop in text]
    return text[: min(ends)] if ends else text
