"""The `static` generation backend: a static KV cache, one prefill per prompt, a compiled decode step.

`raftlib.text.generate` decodes with transformers' dynamic cache, which grows by one column per step and
so cannot be captured as a CUDA graph. Here the cache is a `transformers.StaticCache` allocated once
for the batch's P*K rows and the longest completion; each prompt is prefilled once (eagerly) and its
keys and values are copied K times into it; the decode step (model forward + sampling) has fixed
shapes, so `torch.compile(mode="reduce-overhead")` captures it as a CUDA graph on a GPU. The engines
are PyTorch's and transformers'; nothing here re-implements a model.

Sampling is Gumbel-max with counter-based noise: the uniform draw for (row, step, token) is a hash of
the row's seed, the step and the token id, computed inside the compiled step (no (rows x vocab)
random tensor in memory). Row seeds come from the batch's seeded `torch.Generator`, so a batch
regenerated after a crash is identical, as with the eager backend. The two backends draw different
(equally distributed) samples from the same seed; a run's backend is part of its config.
"""

from __future__ import annotations

import logging

import torch

from raftlib.text.config import GenerationSection
from raftlib.text.prompts import GenerationError
from raftlib.text.sampling import cache_argument, filter_logits, returned_cache

logger = logging.getLogger(__name__)

_MASK32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------
# Sampling numerics (pure)
# ----------------------------------------------------------------------------------------------


def hashed_uniform(row_seeds: torch.Tensor, step: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(R,) int64 seeds, 0-d step -> (R, V) uniforms in (0, 1), a pure function of (seed, step, token).

    A 32-bit integer hash in the shape of Chris Wellons' lowbias32 (xor-shift, multiply, xor-shift,
    multiply, xor-shift) of seed ^ step-constant + token-constant. Every constant is under 2**31, so each
    product of a 32-bit value and a constant stays under 2**63 (exact in int64 on any device) and Triton,
    which indexes in int32, can fuse it (a constant over 2**31 made Inductor's kernel fail to compile).
    """
    tokens = torch.arange(vocab_size, device=row_seeds.device, dtype=torch.int64)  # (V,)
    x = ((row_seeds[:, None] ^ ((step * 0x165667B1) & _MASK32)) + tokens[None, :] * 0x27D4EB2F) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x6B43A9B5) & _MASK32
    x = x ^ (x >> 16)
    return ((x >> 8).to(torch.float32) + 0.5) / float(1 << 24)  # 24 bits: exact in float32, never 0 or 1


def decision_scores(
    logits: torch.Tensor,
    row_seeds: torch.Tensor,
    step: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """(R, V) logits -> (R, V) scores whose argmax is the drawn token.

    Greedy (temperature 0): the logits. Otherwise logits / T, masked by top-k and top-p as in
    `raftlib.text.sampling.filter_logits`, plus Gumbel noise: argmax of that draws from softmax(logits / T)
    (the Gumbel-max trick). Split from `gumbel_sample` so that a caller can see how close a draw was
    (the gap between the top two scores), e.g. to tell a rounding flip from a real difference.
    """
    logits = logits.float()
    if temperature == 0.0:
        return logits
    scaled = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
    return scaled - torch.log(-torch.log(hashed_uniform(row_seeds, step, logits.shape[-1])))


def gumbel_sample(
    logits: torch.Tensor,
    row_seeds: torch.Tensor,
    step: torch.Tensor,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, V) logits -> sampled (R,) tokens and their log-probabilities at temperature 1 (see `decision_scores`)."""
    scores = decision_scores(logits, row_seeds, step, temperature=temperature, top_k=top_k, top_p=top_p)
    token = scores.argmax(dim=-1)
    logprob = torch.log_softmax(logits.float(), dim=-1).gather(-1, token[:, None]).squeeze(-1)
    return token, logprob


# ----------------------------------------------------------------------------------------------
# The decoder
# ----------------------------------------------------------------------------------------------


class StaticDecoder:
    """Decode P prompts x K samples with a static cache; reuse the cache and compiled step across batches.

    `compile=True` compiles the decode step with `mode="reduce-overhead"` (CUDA graphs) on a GPU and the
    default mode elsewhere. Prompt widths are rounded up to `prompt_bucket` so batches share one shape
    (and one compiled graph).
    """

    def __init__(self, model, *, compile: bool = False, prompt_bucket: int = 64) -> None:
        self.model = model
        self.compile = compile
        self.prompt_bucket = prompt_bucket
        self._cache = None
        self._cache_shape: tuple | None = None
        self._step = None

    def bucketed_width(self, width: int) -> int:
        return -(-width // self.prompt_bucket) * self.prompt_bucket

    def _static_cache(self, prefill_cache, rows: int, max_len: int):
        from transformers import StaticCache

        first = prefill_cache.layers[0]
        shape = (rows, max_len, first.keys.shape[1], first.keys.shape[-1], first.keys.dtype, first.keys.device)
        if self._cache is None or self._cache_shape != shape:
            if any(getattr(layer, "is_sliding", False) for layer in prefill_cache.layers):
                raise GenerationError(
                    "generation.backend = 'static' supports full-attention models only (this one has "
                    "sliding-window layers); use backend 'eager'"
                )
            cache = StaticCache(config=self.model.config, max_cache_len=max_len)
            cache.early_initialization(rows, shape[2], shape[3], shape[4], shape[5])
            self._cache, self._cache_shape, self._step = cache, shape, None  # a new shape compiles anew
        return self._cache

    def _decode_step(self, cache):
        """model forward on one token per row + sampling: fixed shapes, so it compiles to one graph."""
        model, cache_kwarg = self.model, cache_argument(self.model)

        def step(token, position, attention, row_seeds, step_index, temperature: float, top_k: int, top_p: float):
            out = model(
                input_ids=token[:, None], position_ids=position[:, None], attention_mask=attention,
                use_cache=True, **{cache_kwarg: cache},
            )  # fmt: skip
            return gumbel_sample(
                out.logits[:, -1, :], row_seeds, step_index, temperature=temperature, top_k=top_k, top_p=top_p
            )

        if not self.compile:
            return step
        on_gpu = next(model.parameters()).is_cuda
        return torch.compile(step, mode="reduce-overhead" if on_gpu else None, dynamic=False)

    @torch.no_grad()
    def decode(
        self,
        input_ids: torch.Tensor,
        attention: torch.Tensor,
        samples_per_prompt: int,
        settings: GenerationSection,
        *,
        generator: torch.Generator | None,
        eos_ids: set[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded (P, L) prompts -> sampled tokens and their log-probabilities, (P*K, T) each, on the CPU.

        Rows are grouped by prompt (K consecutive rows per prompt). Decoding runs until every row has an
        EOS (checked every 8 steps) or `max_new_tokens`; where each row ends is decided by the caller (`raftlib.text.sampling.finish_rows`).
        """
        model, k = self.model, samples_per_prompt
        device = input_ids.device
        prompts, width = input_ids.shape
        rows, max_len = prompts * k, width + settings.max_new_tokens
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (P, L)

        prefill = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
        prefill_cache = returned_cache(prefill)
        cache = self._static_cache(prefill_cache, rows, max_len)
        for static_layer, prefill_layer in zip(cache.layers, prefill_cache.layers, strict=True):
            static_layer.keys[:, :, :width].copy_(prefill_layer.keys.repeat_interleave(k, dim=0))
            static_layer.values[:, :, :width].copy_(prefill_layer.values.repeat_interleave(k, dim=0))
            static_layer.cumulative_length.fill_(width)
        del prefill_cache

        # Prompt padding stays masked; every column after the prompt is open (the causal mask hides the future).
        full_attention = torch.ones((rows, max_len), dtype=attention.dtype, device=device)  # (R, max_len)
        full_attention[:, :width] = attention.repeat_interleave(k, dim=0)
        position = positions[:, -1].repeat_interleave(k, dim=0)  # (R,)
        seed_device = generator.device if generator is not None else "cpu"
        row_seeds = torch.randint(0, 2**31 - 1, (rows,), generator=generator, device=seed_device).to(device)
        eos = torch.tensor(sorted(eos_ids), device=device)
        options = (settings.temperature, settings.top_k, settings.top_p)

        token, logprob = gumbel_sample(
            prefill.logits[:, -1, :].repeat_interleave(k, dim=0), row_seeds, torch.tensor(0, device=device),
            temperature=options[0], top_k=options[1], top_p=options[2],
        )  # fmt: skip
        del prefill
        tokens, logprobs = [token], [logprob]
        finished = torch.isin(token, eos)
        if self._step is None:
            self._step = self._decode_step(cache)
        for step_index in range(1, settings.max_new_tokens):
            if step_index % 8 == 0 and bool(finished.all()):
                break
            position = position + 1
            token, logprob = self._step(
                token, position, full_attention, row_seeds, torch.tensor(step_index, device=device), *options
            )
            token, logprob = token.clone(), logprob.clone()  # a CUDA graph overwrites its outputs on replay
            tokens.append(token)
            logprobs.append(logprob)
            finished |= torch.isin(token, eos)
        return torch.stack(tokens, dim=1).cpu(), torch.stack(logprobs, dim=1).cpu()
