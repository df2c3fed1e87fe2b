"""The language-model side of the loop: what `loop.py` calls to generate, rank, fine-tune and evaluate text.

The loop itself (stages, persistence, resume) is modality-free; `raftlib.diffusion.modality` is the
image counterpart of this module.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from raftlib import metrics as M
from raftlib.config import RAFTConfig
from raftlib.finetune import completion_logprobs, finetune, reference_perplexity
from raftlib.generate import encode_prompts, eos_token_ids, generate_samples
from raftlib.models import is_peft_model, load_base_model, load_policy, load_tokenizer, save_model
from raftlib.records import Prompt, Sample


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

    def __init__(self, config: RAFTConfig, device) -> None:
        from raftlib.data import load_external_samples

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

    def generate(self, policy, prompts, *, stream, samples_per_prompt=None, completed=None, on_batch=None,
                 progress=True, description="generate", batch_indices=None) -> list[Sample]:  # fmt: skip
        settings = self.config.generation
        if settings.backend == "vllm":
            from raftlib.vllm_backend import generate_with_vllm

            return generate_with_vllm(
                self._vllm_engine(policy), self.tokenizer, prompts, settings, seed=self.config.seed, stream=stream,
                samples_per_prompt=samples_per_prompt, max_prompt_tokens=self.config.data.max_prompt_tokens,
                completed=completed, on_batch=on_batch, batch_indices=batch_indices,
                eos_ids=eos_token_ids(policy, self.tokenizer),
            )  # fmt: skip
        return generate_samples(
            policy, self.tokenizer, prompts, settings,
            seed=self.config.seed, stream=stream, samples_per_prompt=samples_per_prompt,
            max_prompt_tokens=self.config.data.max_prompt_tokens, completed=completed, on_batch=on_batch,
            progress=progress, description=description, decoder=self._static_decoder(policy),
            batch_indices=batch_indices,
        )  # fmt: skip

    def _static_decoder(self, policy):
        from raftlib.fastgen import StaticDecoder

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
        from raftlib.vllm_backend import VLLMEngine

        if self._engine is None:
            self._engine = VLLMEngine.for_policy(policy, self.tokenizer, self.config)
        return self._engine

    @staticmethod
    def reward_inputs(samples: list[Sample]) -> tuple[list[str], list[str]]:
        """The reward callable's positional arguments: (prompts, completions)."""
        return [s.prompt for s in samples], [s.completion for s in samples]

    @staticmethod
    def generated_units(samples: list[Sample]) -> int:
        return sum(s.completion_token_count for s in samples)

    def extra_candidates(self, policy, prompts: list[Prompt]) -> list[Sample]:
        """Candidates from a file (a teacher's, say) for this iteration's prompts, with their policy logprob."""
        if not self.external:
            return []
        tokenizer, config = self.tokenizer, self.config
        k = config.generation.samples_per_prompt
        chosen = list({p.prompt_id: p for p in prompts if p.prompt_id in self.external}.values())  # each once
        prompt_ids = encode_prompts(
            tokenizer, chosen, chat_template=config.generation.chat_template,
            max_prompt_tokens=config.data.max_prompt_tokens,
        )  # fmt: skip
        samples = []
        for prompt, ids in zip(chosen, prompt_ids, strict=True):
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
