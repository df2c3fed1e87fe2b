"""The language-model modality: what `raftlib.loop` calls to generate, rank, fine-tune and evaluate text.

It implements `raftlib.modality.Modality`; `raftlib.diffusion.modality.ImageModality` is its image peer.
Generation runs one of three decoders (eager, static, vLLM) batch by batch through `raftlib.batches`; an
iteration's candidate pool also takes `selection.external_samples` (a teacher's completions, say), added to
the batch of their prompt so they are saved and resumed with it.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from raftlib import metrics as M
from raftlib.batches import Batches, flatten, run_batches
from raftlib.data import load_external_samples
from raftlib.records import Prompt, Sample
from raftlib.scoring import text_inputs
from raftlib.text.config import RAFTConfig
from raftlib.text.finetune import completion_logprobs, finetune, reference_perplexity
from raftlib.text.generate import batch_drawer
from raftlib.text.models import is_peft_model, load_base_model, load_policy, load_tokenizer, save_model
from raftlib.text.prompts import encode_prompts, eos_token_ids


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


def examples_of(samples: list[Sample]) -> list[tuple[list[int], list[int]]]:
    return [(s.prompt_token_ids, s.completion_token_ids) for s in samples]


class TextModality:
    """A causal language model: K completions per prompt, completion-only SFT, KL and perplexity."""

    record = Sample

    has_likelihood = True

    def __init__(self, config: RAFTConfig, device) -> None:
        self.config = config
        self.device = device
        self.tokenizer = load_tokenizer(config.model)
        section = config.selection
        self.external = load_external_samples(section.external_samples) if section.external_samples else {}
        self._engine = None  # the static decoder or vLLM engine of the current policy, reused across calls

    # -- the policy -------------------------------------------------------------------------------

    def load_policy(self, checkpoint: Path | None):
        return load_policy(self.config.model, checkpoint, self.device, seed=self.config.seed)

    def save(self, policy, directory: Path, state_dict=None) -> None:
        save_model(policy, self.tokenizer, directory, state_dict)

    @staticmethod
    def trained_module(policy):
        """The module the fine-tune trains (and FSDP shards): the policy itself."""
        return policy

    # -- generation and scoring -------------------------------------------------------------------

    def generate(
        self, policy, prompts: Sequence[Prompt], *, stream: int, samples_per_prompt: int | None = None,
        candidates: bool = False, batches: Batches | None = None,
    ) -> list[Sample]:  # fmt: skip
        """K samples per prompt from the configured decoder; with `candidates`, plus the external ones."""
        settings, data = self.config.generation, self.config.data
        options = dict(
            seed=self.config.seed, stream=stream, samples_per_prompt=samples_per_prompt,
            max_prompt_tokens=data.max_prompt_tokens,
        )  # fmt: skip
        if settings.backend == "vllm":
            from raftlib.text.vllm_backend import vllm_batch_drawer

            draw = vllm_batch_drawer(
                self._vllm_engine(policy), self.tokenizer, settings, eos_ids=eos_token_ids(policy, self.tokenizer),
                **options,
            )  # fmt: skip
        else:
            draw = batch_drawer(policy, self.tokenizer, settings, decoder=self._static_decoder(policy), **options)
        if candidates and self.external:
            draw = self._with_external(draw, policy, prompts)
        return flatten(run_batches(prompts, settings.prompts_per_batch, draw, batches, unit="prompt"))

    def _with_external(self, draw, policy, prompts: Sequence[Prompt]):
        """`draw`, with each prompt's external candidates added to the batch of its first appearance."""
        size = self.config.generation.prompts_per_batch
        first_batch: dict[int, int] = {}
        for position, prompt in enumerate(prompts):
            first_batch.setdefault(prompt.prompt_id, position // size)

        def draw_with_external(index: int, batch: Sequence[Prompt]) -> list[Sample]:
            owned = [p for p in batch if first_batch[p.prompt_id] == index and p.prompt_id in self.external]
            owned = list({p.prompt_id: p for p in owned}.values())  # each prompt once
            return draw(index, batch) + self.external_candidates(policy, owned)

        return draw_with_external

    def _static_decoder(self, policy):
        from raftlib.text.fastgen import StaticDecoder

        settings = self.config.generation
        if settings.backend != "static":
            return None
        if self._engine is None or self._engine.model is not policy:
            on_gpu = next(policy.parameters()).is_cuda
            compile_step = settings.compile == "always" or (settings.compile == "auto" and on_gpu)
            self._engine = StaticDecoder(policy, compile=compile_step)
        return self._engine

    def _vllm_engine(self, policy):
        """A vLLM engine holding the current policy's weights (rebuilt when the policy changed)."""
        from raftlib.text.vllm_backend import VLLMEngine

        if self._engine is None:
            self._engine = VLLMEngine.for_policy(policy, self.tokenizer, self.config)
        return self._engine

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
        tokenizer, config = self.tokenizer, self.config
        k = config.generation.samples_per_prompt
        prompt_ids = encode_prompts(
            tokenizer, prompts, chat_template=config.generation.chat_template,
            max_prompt_tokens=config.data.max_prompt_tokens,
        )  # fmt: skip
        samples = []
        for prompt, ids in zip(prompts, prompt_ids, strict=True):
            for j, text in enumerate(self.external[prompt.prompt_id]):
                completion_ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                samples.append(
                    Sample(prompt.prompt_id, k + j, prompt.text, text, ids, completion_ids, 0.0, "eos", "external")
                )
        logprobs, _ = completion_logprobs(policy, examples_of(samples), tokenizer.pad_token_id)
        return [replace(s, logprob=lp) for s, lp in zip(samples, logprobs, strict=True)]

    def reference_logprobs(self, policy, samples: list[Sample]) -> list[float]:
        """log pi_0 of each sample (the KL ranking key of Eq. 5 and the eval KL)."""
        with reference_model(policy, self.config) as reference:
            logprobs, _ = completion_logprobs(reference, examples_of(samples), self.tokenizer.pad_token_id)
        return logprobs

    # -- fine-tuning ------------------------------------------------------------------------------

    def finetune(self, policy, kept: list[Sample], *, iteration, accelerator, progress):
        if self.config.generation.backend == "vllm" and self._engine is not None:
            self._engine.close()  # its weights are about to be stale; the next generate reloads them
            self._engine = None
        return finetune(
            policy, examples_of(kept), self.config.training, pad_id=self.tokenizer.pad_token_id,
            seed=self.config.seed, iteration=iteration, accelerator=accelerator, progress=progress,
        )  # fmt: skip

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
        ref_logprobs = [s.logprob for s in samples] if iteration == 0 else self.reference_logprobs(policy, samples)
        metrics: dict[str, Any] = {"eval_kl": M.kl_estimate([s.logprob for s in samples], ref_logprobs)}
        if self.config.data.reference_column:
            metrics["eval_reference_ppl"] = reference_perplexity(
                policy, self.tokenizer, prompts, self.config.data.reference_column,
                chat_template=self.config.generation.chat_template, max_prompt_tokens=self.config.data.max_prompt_tokens,
            )  # fmt: skip
        return metrics, [{"ref_logprob": lp} for lp in ref_logprobs]
