"""The `static` decoder: a static KV cache of one shape per run, one prefill per prompt, a compiled decode step.

The eager decoder (`raftlib.text.eager`) uses transformers' dynamic cache, which grows by one column per step
and so cannot be captured as a CUDA graph. Here the cache is a `transformers.StaticCache` allocated once per
run for the most rows a decode call draws (prompts per batch x K) and the longest prompt of the run plus
`max_new_tokens`; every call is padded to that one shape (left-padded prompts, dummy rows when a batch has
fewer), so the decode step (model forward + sampling) compiles once per run (later decoders of a process with the
same settings and shape reuse its graph: `_shared_compiled_step`), and
`torch.compile(mode="reduce-overhead")` captures it as a CUDA graph on a GPU. The model is an argument of the
compiled step, not a constant in it, so a refreshed policy (another module object of the same architecture,
e.g. the checkpoint every process reloads after a sharded fine-tune) reuses the compiled graph. The engines
are PyTorch's and transformers'; nothing here re-implements a model.

Sampling is Gumbel-max with counter-based noise: the uniform draw for (row, step, token) is a hash of
the row's seed, the step and the token id, computed inside the compiled step (no (rows x vocab)
random tensor in memory). Row seeds come from the batch's seeded `torch.Generator`, so a batch
regenerated after a crash is identical, as with the eager backend. The two backends draw different
(equally distributed) samples from the same seed; a run's backend is part of its config.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from raftlib.text.decoding import Decoded, DecoderSpec, Decoding
from raftlib.text.prompts import GenerationError
from raftlib.text.sampling import cache_argument, draw_step, left_pad, returned_cache

logger = logging.getLogger(__name__)

_MASK32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------
# Sampling numerics (pure)
# ----------------------------------------------------------------------------------------------


def hashed_uniform(row_seeds: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """(R,) int64 seeds, 0-d step -> (R,) uniforms in (0, 1), a pure function of (seed, step).

    A 32-bit integer hash in the shape of Chris Wellons' lowbias32 (xor-shift, multiply, xor-shift,
    multiply, xor-shift) of seed ^ step-constant. Every constant is under 2**31, so each product of a 32-bit
    value and a constant stays under 2**63 (exact in int64 on any device) and Triton, which indexes in int32,
    can fuse it (a constant over 2**31 made Inductor's kernel fail to compile). One number per row and step:
    `raftlib.text.sampling.draw_step` inverts the CDF at it.
    """
    x = ((row_seeds ^ ((step * 0x165667B1) & _MASK32)) * 0x27D4EB2F + 0x3C6EF372) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x6B43A9B5) & _MASK32
    x = x ^ (x >> 16)
    return ((x >> 8).to(torch.float32) + 0.5) / float(1 << 24)  # 24 bits: exact in float32, never 0 or 1


# ----------------------------------------------------------------------------------------------
# The decoder
# ----------------------------------------------------------------------------------------------

COMPILE_BACKEND = "inductor"
"""What `torch.compile` lowers the decode step with (tests count compilations through a backend of their own)."""


class StaticDecoder:
    """`raftlib.text.decoding.Decoder` with a static cache of one shape and a decode step compiled once.

    `compile=True` compiles the step with `mode="reduce-overhead"` (CUDA graphs) on a GPU and the default mode
    elsewhere. `rows` and `prompt_width` (rounded up to `prompt_bucket`) fix the shape; a decode call with more
    rows or a wider prompt grows it, with a warning (and compiles again).
    """

    def __init__(
        self, model, decoding: Decoding, *, rows: int, prompt_width: int, compile: bool = False, prompt_bucket: int = 64
    ) -> None:
        self.model = model
        self.decoding = decoding
        self.rows = rows
        self.prompt_bucket = prompt_bucket
        self.width = self.bucketed_width(prompt_width)
        self.compile = compile
        self._cache = None
        self._step = None
        self._shared: _CompiledStep | None = None
        self._graphs_before = 0

    @property
    def compilations(self) -> int:
        """Graphs the compiler built for this decoder's step: one per run unless the shape had to grow, none
        where an earlier decoder of this process with the same settings and shape built it already."""
        return self._shared.graphs - self._graphs_before if self._shared is not None else 0

    @classmethod
    def for_spec(cls, spec: DecoderSpec) -> StaticDecoder:
        settings = spec.config.generation
        on_gpu = next(spec.policy.parameters()).is_cuda
        compile_step = settings.compile == "always" or (settings.compile == "auto" and on_gpu)
        return cls(spec.policy, spec.decoding, rows=spec.rows, prompt_width=spec.prompt_width, compile=compile_step)

    def bucketed_width(self, width: int) -> int:
        return -(-width // self.prompt_bucket) * self.prompt_bucket

    def refresh(self, policy, saved: Path | None) -> None:
        self.model = policy  # the compiled step takes the model as an argument: no recompilation

    def close(self) -> None:
        self.model = self._cache = self._step = None

    # -- the one shape ----------------------------------------------------------------------------------------

    def _static_cache(self, prefill_cache):
        """The run's cache, allocated at the first call (its dtype and head shapes come from the prefill)."""
        from transformers import StaticCache

        if self._cache is None:
            if any(getattr(layer, "is_sliding", False) for layer in prefill_cache.layers):
                raise GenerationError(
                    "generation.backend = 'static' supports full-attention models only (this one has "
                    "sliding-window layers); use backend 'eager'"
                )
            first = prefill_cache.layers[0]
            max_len = self.width + self.decoding.max_new_tokens
            cache = StaticCache(config=self.model.config, max_cache_len=max_len)
            heads, head_dim = first.keys.shape[1], first.keys.shape[-1]
            cache.early_initialization(self.rows, heads, head_dim, first.keys.dtype, first.keys.device)
            self._cache = cache
        return self._cache

    def _grow(self, rows: int, width: int) -> None:
        """A call larger than the run's shape (only when called directly: a run measures its prompts first)."""
        logger.warning(
            "static decoder: %d rows of prompts up to %d tokens exceed the cache's %d rows x %d; the cache and the "
            "compiled step are rebuilt",
            *(rows, width, self.rows, self.width),
        )
        self.rows, self.width = max(rows, self.rows), max(self.bucketed_width(width), self.width)
        self._cache = self._step = None

    def _decode_step(self):
        """model forward on one token per row + sampling: fixed shapes, so it compiles to one graph."""
        if not self.compile:
            return _step_function(self.decoding)
        if self._shared is None:
            self._shared = _shared_compiled_step(self.decoding, next(self.model.parameters()).is_cuda)
            self._graphs_before = self._shared.graphs
        return self._shared.function

    # -- decoding ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, prompt_ids: Sequence[list[int]], samples_per_prompt: int, seed: int) -> Decoded:
        """Left-padded prompts -> (P*K, T) sampled tokens and their log-probabilities, on the CPU.

        Decoding runs until every row has an EOS (checked every 8 steps) or `max_new_tokens`; where each row
        ends is decided by the caller (`raftlib.text.generate`).
        """
        k = samples_per_prompt
        real_rows = len(prompt_ids) * k
        widest = max(len(ids) for ids in prompt_ids)
        if real_rows > self.rows or widest > self.width:
            self._grow(real_rows, widest)
        model = self.model
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            tokens, logprobs, entropies, margins = self._decode(model, prompt_ids, k, seed, device, real_rows)
        finally:
            model.train(was_training)
        real = slice(0, real_rows)
        return Decoded(tokens[real], logprobs[real], entropies=entropies[real], margins=margins[real])

    def _decode(self, model, prompt_ids, k: int, seed: int, device, real_rows: int):
        settings, rows, width = self.decoding, self.rows, self.width
        input_ids, attention = left_pad(prompt_ids, width, settings.pad_id, device)  # (P, W) each
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (P, W)
        prefill = model(
            input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        prefill_cache = returned_cache(prefill)
        cache = self._static_cache(prefill_cache)
        # Row r of the call is prompt r // k; rows past P*K (a short batch) repeat the first prompt and are dropped.
        source = torch.arange(rows, device=device) // k
        source = torch.where(source < len(prompt_ids), source, torch.zeros_like(source))  # (R,)
        for static_layer, prefill_layer in zip(cache.layers, prefill_cache.layers, strict=True):
            static_layer.keys[:, :, :width].copy_(prefill_layer.keys[source])
            static_layer.values[:, :, :width].copy_(prefill_layer.values[source])
            static_layer.cumulative_length.fill_(width)
        del prefill_cache

        # Prompt padding stays masked; every column after the prompt is open (the causal mask hides the future).
        max_len = width + settings.max_new_tokens
        full_attention = torch.ones((rows, max_len), dtype=attention.dtype, device=device)  # (R, max_len)
        full_attention[:, :width] = attention[source]
        position = positions[source, -1]  # (R,)
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        row_seeds = torch.randint(0, 2**31 - 1, (rows,), generator=generator, device=device)  # (R,)
        eos = torch.tensor(sorted(settings.eos_ids), device=device)

        first = prefill.logits[source, -1, :]  # (R, V)
        del prefill
        draws = [draw_step(first, settings, hashed_uniform(row_seeds, torch.tensor(0, device=device)))]
        finished = torch.isin(draws[0].token, eos)
        finished[real_rows:] = True  # dummy rows never hold decoding up
        if self._step is None:
            self._step = self._decode_step()
        token = draws[0].token
        for step_index in range(1, settings.max_new_tokens):
            if step_index % 8 == 0 and bool(finished.all()):
                break
            position = position + 1
            index = torch.tensor(step_index, device=device)
            drawn = self._step(model, cache, token, position, full_attention, row_seeds, index)
            drawn = type(drawn)(*(value.clone() for value in drawn))  # a CUDA graph overwrites its outputs on replay
            draws.append(drawn)
            token = drawn.token
            finished |= torch.isin(token, eos)
        return [torch.stack(column, dim=1).cpu() for column in zip(*draws)]  # tokens, logprobs, entropies, margins


# ----------------------------------------------------------------------------------------------
# The compiled step, one per sampling settings per process
# ----------------------------------------------------------------------------------------------


def _step_function(settings: Decoding):
    def step(model, cache, token, position, attention, row_seeds, step_index):
        inputs = {"input_ids": token[:, None], "position_ids": position[:, None], "attention_mask": attention}
        out = model(**inputs, use_cache=True, **{cache_argument(model): cache})
        return draw_step(out.logits[:, -1, :], settings, hashed_uniform(row_seeds, step_index))

    return step


@dataclass
class _CompiledStep:
    function: Callable
    graphs: int = 0
    """Graphs the compiler built for `function` (dynamo calls the backend once per graph)."""


_COMPILED_STEPS: dict[tuple[Decoding, bool], _CompiledStep] = {}


def _shared_compiled_step(settings: Decoding, on_gpu: bool) -> _CompiledStep:
    """The compiled decode step every decoder of these settings in this process shares.

    Why shared, and why each with a code object of its own: dynamo keeps its graphs on the function's code
    object and guards them on the backend object. A backend per decoder (as this file had) made every new
    decoder a recompilation of the same code, and from the 9th in one process (an evaluation per GRPO
    callback, the models of a table evaluated in one kernel) dynamo hit `recompile_limit` (8) and ran the
    step eagerly, with one log line. One backend per settings reuses the graph for every decoder of the same
    shape; a code object per settings keeps one settings' graphs from counting against another's limit. The
    graphs (on a GPU with their CUDA-graph memory pool) live as long as the process, one set per settings.
    """
    key = (settings, on_gpu)
    if key not in _COMPILED_STEPS:
        step = _step_function(settings)
        own_code = types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__, None, step.__closure__)
        compiled = _CompiledStep(function=own_code)

        def counting_backend(graph, example_inputs):
            compiled.graphs += 1
            if COMPILE_BACKEND != "inductor":
                return COMPILE_BACKEND(graph, example_inputs)
            import torch._inductor
            from torch._inductor.compile_fx import compile_fx

            # mode="reduce-overhead" as torch.compile spells it: CUDA graphs, on a GPU only
            patches = torch._inductor.list_mode_options("reduce-overhead") if on_gpu else {}
            return compile_fx(graph, example_inputs, config_patches=patches)

        compiled.function = torch.compile(own_code, backend=counting_backend, dynamic=False)
        _COMPILED_STEPS[key] = compiled
    return _COMPILED_STEPS[key]
