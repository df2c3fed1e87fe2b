"""The `eager` decoder: each prompt prefilled once, its KV cache repeated K times, then P*K rows in lockstep.

Hugging Face `generate(num_return_sequences=K)` copies every prompt K times *before* the prefill, so it runs K
identical prefills. Here each prompt is prefilled once and transformers' dynamic cache is repeated K times;
a plain decode loop then draws all rows together (`raftlib.text.sampling.draw_step`, one uniform per row and
step from a `torch.Generator` seeded by the batch's seed), and records each sampled token's log-probability and
the entropy of the model's own distribution (temperature 1), which the KL key, RAFT++ and the entropy metric
need.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from raftlib.text.decoding import Decoded, Decoding
from raftlib.text.sampling import cache_argument, draw_step, left_pad, returned_cache


class EagerDecoder:
    """`raftlib.text.decoding.Decoder` on the policy object itself (no copy, nothing compiled)."""

    def __init__(self, model, decoding: Decoding) -> None:
        self.model = model
        self.decoding = decoding

    def refresh(self, policy, saved: Path | None) -> None:
        self.model = policy

    def close(self) -> None:
        self.model = None

    @torch.no_grad()
    def decode(self, prompt_ids: Sequence[list[int]], samples_per_prompt: int, seed: int) -> Decoded:
        model, settings, k = self.model, self.decoding, samples_per_prompt
        device = next(model.parameters()).device
        input_ids, attention = left_pad(prompt_ids, max(len(ids) for ids in prompt_ids), settings.pad_id, device)
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        was_training = model.training
        model.eval()
        try:
            return self._decode(input_ids, attention, k, generator)
        finally:
            model.train(was_training)

    def _decode(self, input_ids, attention, k: int, generator: torch.Generator) -> Decoded:
        model, settings = self.model, self.decoding
        device = input_ids.device
        eos = torch.tensor(sorted(settings.eos_ids), device=device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (P, L): real positions despite padding
        cache_kwarg = cache_argument(model)
        out = model(
            input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        cache = returned_cache(out)
        cache.batch_repeat_interleave(k)  # the one prefill is shared by the K samples of a prompt
        logits = out.logits[:, -1, :].repeat_interleave(k, dim=0)  # (P*K, V)
        attention = attention.repeat_interleave(k, dim=0)  # (P*K, L)
        position = positions[:, -1:].repeat_interleave(k, dim=0)  # (P*K, 1)

        rows = input_ids.shape[0] * k
        finished = torch.zeros(rows, dtype=torch.bool, device=device)  # (P*K,)
        draws = []
        for step in range(settings.max_new_tokens):
            drawn = draw_step(logits, settings, torch.rand(rows, generator=generator, device=device))
            draws.append(drawn)
            # Stop once every row has drawn an EOS; where each row ends is decided after decoding.
            finished |= torch.isin(drawn.token, eos)
            if bool(finished.all()) or step == settings.max_new_tokens - 1:
                break
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            position = position + 1
            step_inputs = {"input_ids": drawn.token[:, None], "attention_mask": attention, "position_ids": position}
            out = model(**step_inputs, use_cache=True, **{cache_kwarg: cache})
            cache = returned_cache(out)
            logits = out.logits[:, -1, :]
        tokens, logprobs, entropies, margins = (torch.stack(column, dim=1).cpu() for column in zip(*draws))
        return Decoded(tokens=tokens, logprobs=logprobs, entropies=entropies, margins=margins)  # (P*K, T) each
