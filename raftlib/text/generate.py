"""Generate K completions per prompt, prefilling each prompt once.

Hugging Face `generate(num_return_sequences=K)` copies every prompt K times *before* the prefill, so it
runs K identical prefills. Here each prompt is prefilled once and its KV cache is repeated K times,
then a plain decode loop samples all P*K rows together. The loop also records the log-probability of
every sampled token under the model's own distribution (temperature 1), which the KL ranking key and
the KL metric need, and it draws from a `torch.Generator` the caller seeds, so a batch regenerated
after a crash is bit-identical to the one that was lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from raftlib.batches import Batches, flatten, run_batches
from raftlib.records import FinishReason, Prompt, Sample
from raftlib.text.config import GenerationSection
from raftlib.text.prompts import GenerationError, context_window, encode_prompts, eos_token_ids
from raftlib.text.sampling import (
    batch_generator,
    cache_argument,
    cut_at_stop,
    finish_rows,
    holds_stop,
    returned_cache,
    sample_next_token,
    stop_window,
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# One batch: P prompts, K samples each
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    prompt_token_ids: Sequence[list[int]],
    settings: GenerationSection,
    *,
    generator: torch.Generator | None = None,
    samples_per_prompt: int | None = None,
    decoder=None,
) -> list[Sample]:
    """Draw K completions for each prompt; samples come back grouped by prompt, K per prompt.

    `decoder`: a `raftlib.text.fastgen.StaticDecoder` (the `static` backend) or None (this module's loop).
    """
    k = samples_per_prompt or settings.samples_per_prompt
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_ids = eos_token_ids(model, tokenizer)
    if not eos_ids:
        raise GenerationError("the tokenizer has no EOS token; completions could never end on their own")
    longest = max(len(ids) for ids in prompt_token_ids)
    width = longest if decoder is None else decoder.bucketed_width(longest)
    input_ids, attention = left_pad(prompt_token_ids, width, pad_id, device)

    was_training = model.training
    model.eval()
    try:
        if decoder is not None:
            tokens, logprobs = decoder.decode(input_ids, attention, k, settings, generator=generator, eos_ids=eos_ids)
            entropies = None
            reasons, stop_at = finish_rows(tokens, eos_ids, settings.stop_strings, tokenizer)
        else:
            tokens, logprobs, entropies, reasons, stop_at = _decode_eager(
                model, tokenizer, input_ids, attention, k, settings, generator=generator, eos_ids=eos_ids
            )
    finally:
        model.train(was_training)
    return _build_samples(prompts, prompt_token_ids, k, tokens, logprobs, reasons, stop_at, tokenizer, settings,
                          entropies)  # fmt: skip


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


def _decode_eager(model, tokenizer, input_ids, attention, k, settings, *, generator, eos_ids):
    """The dynamic-cache decode loop: one prefill per prompt, its cache repeated K times, then P*K rows in
    lockstep. Returns (P*K, T) tokens, log-probabilities and entropies (on the CPU), and each row's finish
    reason and last kept step, by the end-of-row rule of `raftlib.text.sampling` applied as it goes."""
    device = input_ids.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_tensor = torch.tensor(sorted(eos_ids), device=device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (P, L): real positions despite padding
    cache_kwarg = cache_argument(model)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
    cache = returned_cache(out)
    cache.batch_repeat_interleave(k)  # the one prefill is shared by the K samples of a prompt
    logits = out.logits[:, -1, :].repeat_interleave(k, dim=0)  # (P*K, V)
    attention = attention.repeat_interleave(k, dim=0)  # (P*K, L)
    position = positions[:, -1:].repeat_interleave(k, dim=0)  # (P*K, 1)

    rows = input_ids.shape[0] * k
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    reasons: list[FinishReason] = ["length"] * rows
    stop_at: list[int | None] = [None] * rows  # index of the last kept token per row
    tokens: list[torch.Tensor] = []
    logprobs: list[torch.Tensor] = []
    entropies: list[torch.Tensor] = []  # of the model's own distribution: the policy-entropy metric
    window = stop_window(settings.stop_strings)
    for step in range(settings.max_new_tokens):
        token = sample_next_token(
            logits, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p, generator=generator
        )  # (P*K,)
        log_dist = torch.log_softmax(logits.float(), dim=-1)  # (P*K, V)
        token_logprob = log_dist.gather(-1, token[:, None]).squeeze(-1)
        token_entropy = -(log_dist.exp() * log_dist).sum(-1)  # (P*K,)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens.append(token)
        logprobs.append(torch.where(finished, torch.zeros_like(token_logprob), token_logprob))
        entropies.append(torch.where(finished, torch.zeros_like(token_entropy), token_entropy))

        # The end-of-row rule, step by step: an EOS first, then a stop string in the recent text.
        hit_eos = torch.isin(token, eos_tensor) & ~finished
        for row in hit_eos.nonzero().flatten().tolist():
            reasons[row], stop_at[row] = "eos", step
        finished |= hit_eos
        if settings.stop_strings:
            recent = torch.stack(tokens[-window:], dim=1).tolist()
            for row in (~finished).nonzero().flatten().tolist():
                if holds_stop(recent[row], settings.stop_strings, tokenizer):
                    reasons[row], stop_at[row] = "stop", step
                    finished[row] = True
        if bool(finished.all()) or step == settings.max_new_tokens - 1:
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
        position = position + 1
        out = model(
            input_ids=token[:, None], attention_mask=attention, position_ids=position, use_cache=True,
            **{cache_kwarg: cache},
        )  # fmt: skip
        cache = returned_cache(out)
        logits = out.logits[:, -1, :]
    stacked = [torch.stack(values, dim=1).cpu() for values in (tokens, logprobs, entropies)]  # (P*K, T) each
    return *stacked, reasons, stop_at


def _build_samples(
    prompts, prompt_token_ids, k, token_matrix, logprob_matrix, reasons, stop_at, tokenizer, settings,
    entropy_matrix=None,
):  # fmt: skip
    """Sample records from (P*K, T) decoded tokens, cutting each row after its last kept token."""
    samples = []
    for row in range(token_matrix.shape[0]):
        prompt_row = row // k
        end = stop_at[row] + 1 if stop_at[row] is not None else token_matrix.shape[1]
        completion_ids = token_matrix[row, :end].tolist()
        text = tokenizer.decode(completion_ids, skip_special_tokens=True)
        if reasons[row] == "stop":
            text = cut_at_stop(text, settings.stop_strings)
        samples.append(
            Sample(
                prompt_id=prompts[prompt_row].prompt_id,
                sample_index=row % k,
                prompt=prompts[prompt_row].text,
                completion=text,
                prompt_token_ids=list(prompt_token_ids[prompt_row]),
                completion_token_ids=completion_ids,
                logprob=float(logprob_matrix[row, :end].sum()),
                finish_reason=reasons[row],
                entropy=None if entropy_matrix is None else float(entropy_matrix[row, :end].sum()),
            )
        )
    return samples


# ----------------------------------------------------------------------------------------------
# Every prompt, in resumable batches
# ----------------------------------------------------------------------------------------------


def batch_drawer(
    model,
    tokenizer,
    settings: GenerationSection,
    *,
    seed: int,
    stream: int = 0,
    samples_per_prompt: int | None = None,
    max_prompt_tokens: int | None = None,
    decoder=None,
) -> Callable[[int, Sequence[Prompt]], list[Sample]]:
    """`draw(index, prompts)` for `raftlib.batches.run_batches`: batch b draws from a generator seeded by
    (seed, stream, b), so a batch drawn again after a crash is bit-identical to the one that was lost."""
    window = context_window(model)
    device = next(model.parameters()).device

    def draw(index: int, batch: Sequence[Prompt]) -> list[Sample]:
        ids = encode_prompts(
            tokenizer, batch, chat_template=settings.chat_template, max_prompt_tokens=max_prompt_tokens,
            max_new_tokens=settings.max_new_tokens, context_window=window,
        )  # fmt: skip
        generator = batch_generator(seed, stream, index, device=device)
        return generate_batch(
            model, tokenizer, batch, ids, settings, generator=generator, samples_per_prompt=samples_per_prompt,
            decoder=decoder,
        )  # fmt: skip

    return draw


def generate_samples(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    settings: GenerationSection,
    *,
    seed: int,
    stream: int = 0,
    samples_per_prompt: int | None = None,
    max_prompt_tokens: int | None = None,
    decoder=None,
    batches: Batches[list[Sample]] | None = None,
) -> list[Sample]:
    """K samples for every prompt, in batches of `settings.prompts_per_batch` prompts (see `batch_drawer`).

    `batches` (`raftlib.batches.Batches`) says which batches a run directory already holds (skipped), where
    new ones are saved, and which belong to this process (the others are absent from the result). `decoder`
    selects the static backend (see `generate_batch`).
    """
    draw = batch_drawer(
        model, tokenizer, settings, seed=seed, stream=stream, samples_per_prompt=samples_per_prompt,
        max_prompt_tokens=max_prompt_tokens, decoder=decoder,
    )  # fmt: skip
    return flatten(run_batches(prompts, settings.prompts_per_batch, draw, batches, unit="prompt"))
