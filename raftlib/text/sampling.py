"""Sampling numerics and the one rule for where a completion ends, under every text decoder.

Pure functions of tensors (no model, no I/O): the logit filters (top-k, top-p) and the draw, the per-batch
seed streams, the two cache shims transformers 5.x needs, and the end-of-row rule. The eager decoder
(`raftlib.text.generate`) and the static one (`raftlib.text.fastgen`) both import this module and neither
imports the other.

The end-of-row rule: a row ends at the first step whose token is an EOS id ("eos"), or, before that, at the
first step after which the text of its last `stop_window` tokens holds a stop string ("stop"); otherwise it
runs to `max_new_tokens` ("length"). At one step an EOS wins over a stop string.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

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


def sample_next_token(
    logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. temperature 0 is greedy."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    filtered = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    probs = torch.softmax(filtered, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
    token_matrix: torch.Tensor, eos_ids: set[int], stop_strings: Sequence[str], tokenizer
) -> tuple[list[FinishReason], list[int | None]]:
    """The end-of-row rule over decoded rows: (finish reason, index of the last kept token or None) per row.

    The eager decoder applies the same rule step by step (to stop early); the static one applies it here,
    after decoding.
    """
    reasons: list[FinishReason] = []
    stop_at: list[int | None] = []
    window = stop_window(stop_strings)
    eos = torch.tensor(sorted(eos_ids))
    for row in token_matrix:
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
            stop_at.append(None)
    return reasons, stop_at


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """Cut the text right after the earliest stop string (the last token may run past it)."""
    ends = [text.find(stop) + len(stop) for stop in stop_strings if stop in text]
    return text[: min(ends)] if ends else text
