"""The language-model modality: what `raftlib.loop` calls to generate, rank, fine-tune and evaluate text.

It implements `raftlib.modality.Modality`; `raftlib.diffusion.modality.ImageModality` is its image peer.
Generation goes through one decoder per run (`raftlib.text.decoding`: eager, static or vLLM, built once by
name and refreshed after every fine-tune) and the one batch drawer of `raftlib.text.generate`. An iteration's
candidate pool also takes `selection.external_samples` (a teacher's completions, say), added to the batch of
their prompt so they are saved and resumed with it.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from raftlib import metrics as M
from raftlib.batches import Batches, flatten, run_batches
from raftlib.data import PromptSplits, load_external_samples
from raftlib.records import Prompt, Sample
from raftlib.scoring import text_inputs
from raftlib.text.config import RAFTConfig
from raftlib.text.decoders import build_decoder
from raftlib.text.decoding import Decoder, DecoderSpec
from raftlib.text.finetune import completion_logprobs, completion_token_logprobs, finetune, reference_perplexity
from raftlib.text.generate import Draw, batch_drawer
from raftlib.text.losses import build_loss
from raftlib.text.models import (
    is_peft_model,
    load_base_model,
    load_policy,
    load_tokenizer,
    read_model_config,
    save_model,
)
from raftlib.text.prompts import GenerationError, TextFormat, context_window

logger = logging.getLogger(__name__)


@contextmanager
def reference_model(policy, config: RAFTConfig):
    """pi_0: the LoRA policy with its adapter disabled, or the base weights loaded for the moment."""
    if is_peft_model(policy):
        with policy.disable_adapter():
            yield policy
        return
    reference = load_base_model(config.model, next(policy.parameters()).device)
    try:
        yield reference
    finally:
        del reference
        gc.collect()


def examples_of(samples: Sequence[Sample]) -> list[tuple[list[int], list[int]]]:
    return [(s.prompt_token_ids, s.completion_token_ids) for s in samples]


def logprob_gap(policy, samples: Sequence[Sample], pad_id: int) -> tuple[float, float]:
    """Mean and max over the samples' tokens of |log p(policy) - log p(decoder)| (the decoder's are stored)."""
    checked = [s for s in samples if s.token_logprobs is not None and s.completion_token_ids]
    if not checked:
        return float("nan"), float("nan")
    recomputed = completion_token_logprobs(policy, examples_of(checked), pad_id)
    gaps = np.concatenate(
        [np.abs(np.asarray(mine) - np.asarray(s.token_logprobs)) for mine, s in zip(recomputed, checked, strict=True)]
    )
    return float(gaps.mean()), float(gaps.max())


class TextModality:
    """A causal language model: K completions per prompt, completion-only SFT, KL and perplexity."""

    record = Sample

    has_likelihood = True

    def __init__(self, config: RAFTConfig, device) -> None:
        self.config = config
        self.device = device
        self.tokenizer = load_tokenizer(config.model)
        model_config, generation_config = read_model_config(config.model)
        # The run's one decision about text and tokens (chat template, prompt cut, EOS set, stop strings).
        self.text_format = TextFormat.of(
            self.tokenizer, generation_config, config.generation, config.data.max_prompt_tokens
        )
        self.window = context_window(model_config)
        build_loss(config.training, self.text_format.pad_id)  # a bad training.loss fails now, not after generation
        section = config.selection
        self.external = load_external_samples(section.external_samples) if section.external_samples else {}
        self.prompt_ids: dict[int, list[int]] = {}
        """Every prompt of the run, encoded once when the data is prepared."""
        self._decoder: Decoder | None = None
        self._decoding_from = None  # the policy object the decoder holds the weights of

    # -- the data and the policy ------------------------------------------------------------------

    def prepare(self, splits: PromptSplits) -> PromptSplits:
        """Encode every prompt once; drop (and count) those too long to leave room for max_new_tokens."""
        new_tokens = self.config.generation.max_new_tokens
        train, train_ids, dropped_train = self.text_format.fitting(splits.train, new_tokens, self.window, "train")
        held_out, eval_ids, dropped_eval = self.text_format.fitting(splits.eval, new_tokens, self.window, "eval")
        if not train:
            raise GenerationError(
                f"every training prompt is longer than the context window {self.window} minus "
                f"generation.max_new_tokens {new_tokens}; set data.max_prompt_tokens"
            )
        self.prompt_ids = train_ids | eval_ids
        return replace(splits, train=train, eval=held_out, dropped=dropped_train + dropped_eval)

    def load_policy(self, checkpoint: Path | None):
        return load_policy(self.config.model, checkpoint, self.device, seed=self.config.seed)

    def save(self, policy, directory: Path, state_dict=None) -> None:
        save_model(policy, self.tokenizer, directory, state_dict)

    @staticmethod
    def trained_module(policy):
        """The module the fine-tune trains (and FSDP shards): the policy itself."""
        return policy

    def refresh(self, policy, saved: Path | None) -> None:
        """The policy that generates from now on (after a fine-tune; `saved` is its checkpoint directory)."""
        if self._decoder is not None:
            self._decoder.refresh(policy, saved)
        self._decoding_from = policy

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None

    # -- generation and scoring -------------------------------------------------------------------

    @property
    def rows_per_batch(self) -> int:
        """Rows one decode call draws: prompts_per_batch x K (evaluation batches hold as many rows)."""
        g = self.config.generation
        return g.prompts_per_batch * g.samples_per_prompt

    def decoder(self, policy) -> Decoder:
        """The run's decoder, decoding from `policy` (built at the first call, refreshed when handed another)."""
        if self._decoder is None:
            widest = max((len(ids) for ids in self.prompt_ids.values()), default=1)
            rows = max(self.rows_per_batch, self.config.loop.eval_samples_per_prompt)
            spec = DecoderSpec(policy, self.config, self.text_format, rows=rows, prompt_width=widest)
            self._decoder, self._decoding_from = build_decoder(spec), policy
        elif self._decoding_from is not policy:
            self.refresh(policy, None)
        return self._decoder

    def generate(
        self,
        policy,
        prompts: Sequence[Prompt],
        *,
        stream: int,
        samples_per_prompt: int | None = None,
        candidates: bool = False,
        batches: Batches | None = None,
    ) -> list[Sample]:
        """K samples per prompt from the run's decoder; with `candidates`, plus the external ones.

        A call with k samples per prompt batches max(1, rows_per_batch // k) prompts, so every decode call
        draws about the same number of rows (evaluation at k = 1 batches K times more prompts).
        """
        k = samples_per_prompt or self.config.generation.samples_per_prompt
        size = max(1, self.rows_per_batch // k)
        draw = Draw(seed=self.config.seed, stream=stream, samples_per_prompt=k, prompts_per_batch=size)
        drawer = batch_drawer(self.decoder(policy), self.text_format, draw, self.prompt_ids)
        if candidates and self.external:
            drawer = self._with_external(drawer, policy, prompts, size)
        return flatten(run_batches(prompts, size, drawer, batches, unit="prompt"))

    def check_generation(self, policy, samples: Sequence[Sample]) -> dict[str, Any]:
        """The decoder's log-probabilities against the policy's own on a few newly drawn samples: a stale engine
        (weights not refreshed) or a broken decode path shows as a gap, and past the limit the run stops."""
        count = self.config.generation.logprob_check_samples
        drawn = [s for s in samples if s.source == "policy"][:count]
        if not count or not drawn:
            return {}
        mean, largest = logprob_gap(policy, drawn, self.text_format.pad_id)
        limit = self.config.generation.max_logprob_gap
        if mean > limit:
            raise GenerationError(
                f"the {self.config.generation.backend} decoder's log-probabilities differ from the policy's by "
                f"{mean:.3f} per token on average (max {largest:.3f}) over {len(drawn)} samples, above "
                f"generation.max_logprob_gap = {limit}: the decoder is not sampling from the policy being trained "
                "(stale engine weights?)"
            )
        return {"generate_logprob_gap": mean, "generate_logprob_gap_max": largest}

    def _with_external(self, draw, policy, prompts: Sequence[Prompt], size: int):
        """`draw`, with each prompt's external candidates added to the batch of its first appearance."""
        first_batch: dict[int, int] = {}
        for position, prompt in enumerate(prompts):
            first_batch.setdefault(prompt.prompt_id, position // size)

        def draw_with_external(index: int, batch: Sequence[Prompt]) -> list[Sample]:
            owned = [p for p in batch if first_batch[p.prompt_id] == index and p.prompt_id in self.external]
            owned = list({p.prompt_id: p for p in owned}.values())  # each prompt once
            return draw(index, batch) + self.external_candidates(policy, owned)

        return draw_with_external

    reward_inputs = staticmethod(text_inputs)
    """The reward callable's positional arguments: (prompts, completions)."""

    @staticmethod
    def generated_units(samples: list[Sample]) -> int:
        """Completion tokens the decoder drew (external candidates were not drawn)."""
        return sum(s.completion_token_count for s in samples if s.source != "external")

    def external_candidates(self, policy, prompts: Sequence[Prompt]) -> list[Sample]:
        """The external completions of these prompts (sample_index K, K+1, ...), with their policy logprob."""
        if not prompts:
            return []
        k = self.config.generation.samples_per_prompt
        samples = []
        for prompt, ids in zip(prompts, self.text_format.encode(prompts), strict=True):
            for j, text in enumerate(self.external[prompt.prompt_id]):
                completion_ids = self.text_format.completion_ids(text)
                samples.append(
                    Sample(prompt.prompt_id, k + j, prompt.text, text, ids, completion_ids, 0.0, "eos", "external")
                )
        logprobs, _ = completion_logprobs(policy, examples_of(samples), self.text_format.pad_id)
        return [replace(s, logprob=lp) for s, lp in zip(samples, logprobs, strict=True)]

    def reference_logprobs(self, policy, samples: list[Sample]) -> list[float]:
        """log pi_0 of each sample (the KL ranking key of Eq. 5 and the eval KL)."""
        with reference_model(policy, self.config) as reference:
            logprobs, _ = completion_logprobs(reference, examples_of(samples), self.text_format.pad_id)
        return logprobs

    # -- fine-tuning ------------------------------------------------------------------------------

    def finetune(self, policy, kept: list[Sample], *, iteration, accelerator, progress):
        return finetune(
            policy,
            examples_of(kept),
            self.config.training,
            pad_id=self.text_format.pad_id,
            seed=self.config.seed,
            iteration=iteration,
            accelerator=accelerator,
            progress=progress,
        )

    # -- what gets recorded -----------------------------------------------------------------------

    def sample_settings(self) -> dict[str, Any]:
        g = self.config.generation
        return {"temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k, "max_new_tokens": g.max_new_tokens}

    @staticmethod
    def sample_metrics(samples: list[Sample], prefix: str) -> dict[str, Any]:
        metrics = M.text_metrics([s.completion for s in samples], prefix)
        metrics[f"{prefix}_length_tokens"] = M.completion_length_mean([s.completion_token_count for s in samples])
        metrics[f"{prefix}_token_entropy"] = M.token_entropy_mean(
            [s.entropy for s in samples], [s.completion_token_count for s in samples]
        )
        if prefix == "sample":
            metrics["sample_eos_fraction"] = float(np.mean([s.finish_reason == "eos" for s in samples]))
        return metrics

    def eval_metrics(
        self, policy, samples: list[Sample], prompts: list[Prompt], iteration: int
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """KL to the initial model and reference perplexity; per-sample columns for eval_samples.parquet."""
        metrics: dict[str, Any] = {}
        columns: list[dict[str, Any]] = [{} for _ in samples]
        if self.config.loop.eval_kl:
            ref_logprobs = [s.logprob for s in samples] if iteration == 0 else self.reference_logprobs(policy, samples)
            metrics["eval_kl"] = M.kl_estimate([s.logprob for s in samples], ref_logprobs)
            columns = [{"ref_logprob": lp} for lp in ref_logprobs]
        if self.config.data.reference_column:
            metrics["eval_reference_ppl"] = reference_perplexity(
                policy, self.text_format, prompts, self.config.data.reference_column
            )
        return metrics, columns
