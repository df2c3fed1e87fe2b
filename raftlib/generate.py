"""Generate K completions per prompt, prefilling each prompt once.

Hugging Face `generate(num_return_sequences=K)` copies every prompt K times *before* the prefill, so it
runs K identical prefills. Here each prompt is prefilled once and its KV cache is repeated K times,
then a plain decode loop samples all P*K rows together. The loop also records the log-probability of
every sampled token under the model's own distribution (temperature 1), which the KL ranking key and
the KL metric need, and it draws from a `torch.Generator` the caller seeds, so a batch regenerated
after a crash is bit-identical to the one that was lost.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence

import torch

from raftlib.config import GenerationSection
from raftlib.records import FinishReason, Prompt, Sample

logger = logging.getLogger(__name__)


class GenerationError(ValueError):
    """A prompt or tokenizer cannot be used for generation; the message says which and why."""


# ----------------------------------------------------------------------------------------------
# Prompt tokens
# ----------------------------------------------------------------------------------------------


def uses_chat_template(tokenizer, mode: str) -> bool:
    """Whether prompts are wrapped in the tokenizer's chat template (`generation.chat_template`)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "always" and not has_template:
        raise GenerationError(
            "generation.chat_template = 'always' but the tokenizer has no chat template; "
            "set generation.chat_template=never or use a tokenizer that ships one"
        )
    return mode == "always" or (mode == "auto" and has_template)


def encode_prompts(
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    chat_template: str = "auto",
    max_prompt_tokens: int | None = None,
    max_new_tokens: int = 0,
    context_window: int | None = None,
) -> list[list[int]]:
    """Token ids per prompt: chat template when asked, keep the last `max_prompt_tokens`, check fit."""
    templated = uses_chat_template(tokenizer, chat_template)
    encoded = []
    for prompt in prompts:
        if templated:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt.text}], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt.text)["input_ids"]
        if not ids:
            raise GenerationError(f"prompt {prompt.prompt_id} encodes to no tokens: {prompt.text!r}")
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            ids = ids[-max_prompt_tokens:]  # keep the end: it is what the completion continues
        if context_window is not None and len(ids) + max_new_tokens > context_window:
            raise GenerationError(
                f"prompt {prompt.prompt_id} has {len(ids)} tokens; with generation.max_new_tokens = "
                f"{max_new_tokens} that exceeds the model's context window of {context_window}. "
                "Set data.max_prompt_tokens or lower max_new_tokens."
            )
        encoded.append(list(ids))
    return encoded


def context_window(model) -> int | None:
    config = model.config
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def eos_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return ids


# ----------------------------------------------------------------------------------------------
# Sampling numerics (pure)
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
# The decode loop
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

    `decoder`: a `raftlib.fastgen.StaticDecoder` (the `static` backend) or None (this module's loop).
    """
    k = samples_per_prompt or settings.samples_per_prompt
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos_ids = eos_token_ids(model, tokenizer)
    if not eos_ids:
        raise GenerationError("the tokenizer has no EOS token; completions could never end on their own")
    eos_tensor = torch.tensor(sorted(eos_ids), device=device)

    # Left-pad so every prompt ends at the same column and decoding appends in lockstep.
    lengths = [len(ids) for ids in prompt_token_ids]
    width = max(lengths) if decoder is None else decoder.bucketed_width(max(lengths))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # (P, L)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)  # (P, L)
    for row, ids in enumerate(prompt_token_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention[row, width - len(ids) :] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # (P, L): real positions despite padding

    was_training = model.training
    model.eval()
    if decoder is not None:
        from raftlib.fastgen import finish_rows  # imported here: fastgen imports this module

        try:
            token_matrix, logprob_matrix = decoder.decode(
                input_ids, attention, k, settings, generator=generator, eos_ids=eos_ids
            )
        finally:
            model.train(was_training)
        reasons, stop_at = finish_rows(token_matrix, eos_ids, settings.stop_strings, tokenizer)
        return _build_samples(prompts, prompt_token_ids, k, token_matrix, logprob_matrix, reasons, stop_at,
                              tokenizer, settings)  # fmt: skip
    try:
        cache_kwarg = _cache_argument(model)
        out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True)
        cache = _returned_cache(out)
        cache.batch_repeat_interleave(k)  # the one prefill is shared by the K samples of a prompt
        logits = out.logits[:, -1, :].repeat_interleave(k, dim=0)  # (P*K, V)
        attention = attention.repeat_interleave(k, dim=0)  # (P*K, L)
        position = positions[:, -1:].repeat_interleave(k, dim=0)  # (P*K, 1)

        rows = len(prompts) * k
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        reasons: list[FinishReason] = ["length"] * rows
        stop_at: list[int | None] = [None] * rows  # index of the last kept token per row
        tokens: list[torch.Tensor] = []
        logprobs: list[torch.Tensor] = []
        entropies: list[torch.Tensor] = []  # of the model's own distribution: the policy-entropy metric
        stop_window = max((len(s) for s in settings.stop_strings), default=0) + 8
        for step in range(settings.max_new_tokens):
            token = sample_next_token(
                logits,
                temperature=settings.temperature,
                top_k=settings.top_k,
                top_p=settings.top_p,
                generator=generator,
            )  # (P*K,)
            log_dist = torch.log_softmax(logits.float(), dim=-1)  # (P*K, V)
            token_logprob = log_dist.gather(-1, token[:, None]).squeeze(-1)
            token_entropy = -(log_dist.exp() * log_dist).sum(-1)  # (P*K,)
            token = torch.where(finished, torch.full_like(token, pad_id), token)
            tokens.append(token)
            logprobs.append(torch.where(finished, torch.zeros_like(token_logprob), token_logprob))
            entropies.append(torch.where(finished, torch.zeros_like(token_entropy), token_entropy))

            hit_eos = torch.isin(token, eos_tensor) & ~finished
            for row in hit_eos.nonzero().flatten().tolist():
                reasons[row], stop_at[row] = "eos", step
            finished |= hit_eos
            if settings.stop_strings:
                recent = torch.stack(tokens[-stop_window:], dim=1).tolist()
                for row in (~finished).nonzero().flatten().tolist():
                    tail = tokenizer.decode(recent[row], skip_special_tokens=True)
                    if any(stop in tail for stop in settings.stop_strings):
                        reasons[row], stop_at[row] = "stop", step
                        finished[row] = True
            if bool(finished.all()) or step == settings.max_new_tokens - 1:
                break
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
            position = position + 1
            out = model(
                input_ids=token[:, None],
                attention_mask=attention,
                position_ids=position,
                use_cache=True,
                **{cache_kwarg: cache},
            )
            cache = _returned_cache(out)
            logits = out.logits[:, -1, :]
    finally:
        model.train(was_training)

    token_matrix = torch.stack(tokens, dim=1).cpu()  # (P*K, T)
    logprob_matrix = torch.stack(logprobs, dim=1).cpu()  # (P*K, T)
    entropy_matrix = torch.stack(entropies, dim=1).cpu()  # (P*K, T)
    return _build_samples(prompts, prompt_token_ids, k, token_matrix, logprob_matrix, reasons, stop_at, tokenizer,
                          settings, entropy_matrix)  # fmt: skip


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
            text = _cut_at_stop(text, settings.stop_strings)
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


def _cache_argument(model) -> str:
    """transformers 5.2x renamed `past_key_values` to `cache`; use whichever this version takes."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _returned_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """Cut the text right after the earliest stop string (the last token may run past it)."""
    ends = [text.find(stop) + len(stop) for stop in stop_strings if stop in text]
    return text[: min(ends)] if ends else text


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
    completed: dict[int, list[Sample]] | None = None,
    on_batch=None,
    progress: bool = True,
    description: str = "generate",
    decoder=None,
    batch_indices: Sequence[int] | None = None,
) -> list[Sample]:
    """K samples for every prompt, in batches of `settings.prompts_per_batch` prompts.

    Batch b draws from a generator seeded by (seed, stream, b), so batches listed in `completed`
    (restored from a run directory after a crash) are skipped and the rest come out exactly as an
    uninterrupted run would have drawn them. `on_batch(b, samples)` is called after each new batch
    (the run store persists it there). `decoder` selects the static backend (see `generate_batch`).
    `batch_indices` restricts the work to those batches (a process's shard in a multi-process run);
    the samples of the other batches are then absent from the result.
    """
    from tqdm.auto import tqdm

    completed = completed or {}
    window = context_window(model)
    device = next(model.parameters()).device
    batch_size = settings.prompts_per_batch
    batches = [prompts[start : start + batch_size] for start in range(0, len(prompts), batch_size)]
    results: list[Sample] = []
    # disable=None: bars in terminals and Jupyter, none when stderr is a log file (CI, make > log)
    bar = tqdm(total=len(prompts), desc=description, unit="prompt", disable=None if progress else True, leave=False)
    wanted = set(range(len(batches)) if batch_indices is None else batch_indices)
    for index, batch in enumerate(batches):
        if index not in wanted:
            bar.update(len(batch))
            continue
        if index in completed:
            results.extend(completed[index])
            bar.update(len(batch))
            continue
        ids = encode_prompts(
            tokenizer,
            batch,
            chat_template=settings.chat_template,
            max_prompt_tokens=max_prompt_tokens,
            max_new_tokens=settings.max_new_tokens,
            context_window=window,
        )
        generator = batch_generator(seed, stream, index, device=device)
        samples = generate_batch(
            model, tokenizer, batch, ids, settings, generator=generator, samples_per_prompt=samples_per_prompt,
            decoder=decoder,
        )  # fmt: skip
        if on_batch is not None:
            on_batch(index, samples)
        results.extend(samples)
        bar.update(len(batch))
    bar.close()
    return results
