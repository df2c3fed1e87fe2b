"""K completions per prompt from any decoder, in resumable batches: encode -> decode -> end of row -> samples.

This is the only generation path: every decoder (`raftlib.text.decoding`: eager, static, vLLM) is driven by
the same batch drawer, which encodes the batch's prompts (`TextFormat`), asks the decoder for K rows per
prompt, applies the one end-of-row rule (`raftlib.text.sampling.finish_rows`) and builds the `Sample` records.
Batch b of a call draws from `stream_seed(seed, stream, b)` alone, so a batch drawn again after a crash is the
one that was lost, whatever the other batches did (`raftlib.batches` reuses finished batches).

    decoder = build_decoder(DecoderSpec(model, config, text_format, rows=64, prompt_width=32))
    samples = generate_samples(decoder, text_format, prompts, Draw(seed=0, stream=1, samples_per_prompt=8))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from raftlib.batches import Batches, flatten, run_batches
from raftlib.records import Prompt, Sample
from raftlib.text.decoding import Decoded, Decoder
from raftlib.text.prompts import TextFormat
from raftlib.text.sampling import finish_rows, stream_seed


@dataclass(frozen=True)
class Draw:
    """One generation call: whose random numbers, and how the prompts are batched."""

    seed: int
    """The run's seed."""
    stream: int = 0
    """Which random stream: the iteration for an iteration's candidates, `EVAL_STREAM` for evaluation."""
    samples_per_prompt: int = 8
    """K."""
    prompts_per_batch: int = 8
    """Prompts per batch; each batch is one decode call of prompts_per_batch x K rows."""


def samples_of(
    prompts: Sequence[Prompt], prompt_ids: Sequence[list[int]], k: int, decoded: Decoded, text_format: TextFormat
) -> list[Sample]:
    """Sample records from what a decoder drew, each row cut by the end-of-row rule (K rows per prompt)."""
    reasons, stop_at = finish_rows(
        decoded.tokens, text_format.eos_ids, text_format.stop_strings, text_format.tokenizer, decoded.lengths
    )
    samples = []
    for row in range(decoded.tokens.shape[0]):
        prompt = prompts[row // k]
        end = stop_at[row] + 1 if stop_at[row] is not None else decoded.length(row)
        completion_ids = decoded.tokens[row, :end].tolist()
        token_logprobs = decoded.logprobs[row, :end]
        samples.append(
            Sample(
                prompt_id=prompt.prompt_id,
                sample_index=row % k,
                prompt=prompt.text,
                completion=text_format.completion_text(completion_ids, reasons[row]),
                prompt_token_ids=list(prompt_ids[row // k]),
                completion_token_ids=completion_ids,
                logprob=float(token_logprobs.sum()),
                finish_reason=reasons[row],
                entropy=None if decoded.entropies is None else float(decoded.entropies[row, :end].sum()),
                token_logprobs=token_logprobs.tolist(),
            )
        )
    return samples


def batch_drawer(
    decoder: Decoder, text_format: TextFormat, draw: Draw, prompt_ids: dict[int, list[int]] | None = None
) -> Callable[[int, Sequence[Prompt]], list[Sample]]:
    """`draw(index, prompts)` for `raftlib.batches.run_batches`. `prompt_ids` are prompts encoded when the run's
    data was prepared (by prompt id); prompts missing from it are encoded here."""

    def draw_batch(index: int, batch: Sequence[Prompt]) -> list[Sample]:
        known = prompt_ids or {}
        missing = [p for p in batch if p.prompt_id not in known]
        encoded = dict(zip((p.prompt_id for p in missing), text_format.encode(missing), strict=True))
        ids = [known.get(p.prompt_id) or encoded[p.prompt_id] for p in batch]
        decoded = decoder.decode(ids, draw.samples_per_prompt, stream_seed(draw.seed, draw.stream, index))
        return samples_of(batch, ids, draw.samples_per_prompt, decoded, text_format)

    return draw_batch


def generate_samples(
    decoder: Decoder,
    text_format: TextFormat,
    prompts: Sequence[Prompt],
    draw: Draw,
    batches: Batches[list[Sample]] | None = None,
) -> list[Sample]:
    """K samples for every prompt, in batches of `draw.prompts_per_batch` prompts.

    `batches` (`raftlib.batches.Batches`) says which batches a run directory already holds (reused), where new
    ones are saved, and which belong to this process (the others are absent from the result).
    """
    drawer = batch_drawer(decoder, text_format, draw)
    return flatten(run_batches(prompts, draw.prompts_per_batch, drawer, batches, unit="prompt"))


def generate_from(model, tokenizer, prompts: Sequence[Prompt], section, draw: Draw, batches=None) -> list[Sample]:
    """K samples per prompt from a loaded model and a `GenerationSection`, through the decoder the section names
    (for code that holds a model rather than a run: data generation, benchmarks). Prompts are encoded as
    `section.chat_template` says; the decoder is closed afterwards."""
    from raftlib.text.config import ModelSection, RAFTConfig
    from raftlib.text.decoders import build_decoder
    from raftlib.text.decoding import DecoderSpec
    from raftlib.text.prompts import TextFormat

    text_format = TextFormat.of(tokenizer, model, section)
    widest = max(len(ids) for ids in text_format.encode(prompts))
    config = RAFTConfig(model=ModelSection(path=str(getattr(model, "name_or_path", ""))), generation=section)
    decoder = build_decoder(
        DecoderSpec(model, config, text_format, draw.prompts_per_batch * draw.samples_per_prompt, widest)
    )
    try:
        return generate_samples(decoder, text_format, prompts, draw, batches)
    finally:
        decoder.close()
