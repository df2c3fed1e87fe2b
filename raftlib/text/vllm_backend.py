"""The `vllm` generation backend: K samples per prompt from a vLLM engine holding the current policy.

vLLM is an optional extra (`pip install vllm`, CUDA only) imported only here, only when
`generation.backend = "vllm"`. It was not run on the machines this suite is developed on (CPU only, and
vLLM pins transformers below the version raftlib needs); `tests/test_vllm_backend.py` checks this
translation layer against an engine double with vLLM's request/response shape.

What the layer does:
- one request per prompt with `SamplingParams(n=K, seed=...)`: vLLM prefills the prompt once and
  forks K sequences from it; the seed is derived from (seed, stream, batch, prompt), so a batch
  regenerated after a crash draws the same samples (vLLM's per-request seeds are reproducible for a
  given engine version and GPU);
- log-probabilities of the sampled tokens (`logprobs=0`, engine built with `logprobs_mode="raw_logprobs"`:
  the model's own distribution, temperature 1, which the KL key needs);
- finish reasons mapped to raftlib's ("eos", "stop", "length"); a stop string stays in the text;
- weights reloaded each iteration: the engine is rebuilt from the policy saved after each fine-tune
  (a LoRA policy is served as base model + `LoRARequest`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from raftlib.batches import Batches, flatten, run_batches
from raftlib.records import Prompt, Sample
from raftlib.text.config import GenerationSection
from raftlib.text.prompts import encode_prompts
from raftlib.text.sampling import stream_seed

logger = logging.getLogger(__name__)


class VLLMEngine:
    """A vLLM `LLM` (or anything with its `generate(prompts, sampling_params, ...)`) and how to call it."""

    def __init__(self, llm, *, sampling_params: Callable[..., Any], lora_request=None, workdir: Path | None = None):
        self.llm = llm
        self.sampling_params = sampling_params
        self.lora_request = lora_request
        self.workdir = workdir

    @classmethod
    def for_policy(cls, policy, tokenizer, config) -> VLLMEngine:
        """Save `policy` to a temporary dir and start a vLLM engine on it (LoRA: base model + adapter)."""
        try:
            from vllm import LLM, SamplingParams
            from vllm.lora.request import LoRARequest
        except ImportError as error:
            raise ImportError(
                "generation.backend = 'vllm' needs vLLM (pip install vllm; CUDA GPUs only). "
                "Use backend 'static' for the built-in fast path."
            ) from error
        from raftlib.text.models import is_peft_model

        workdir = Path(tempfile.mkdtemp(prefix="raftlib-vllm-"))
        options = {"seed": config.seed, "logprobs_mode": "raw_logprobs"} | dict(config.generation.vllm_options)
        if is_peft_model(policy):
            policy.save_pretrained(workdir / "adapter")
            llm = LLM(model=config.model.path, enable_lora=True, max_lora_rank=config.model.lora.r, **options)
            lora = LoRARequest("policy", 1, str(workdir / "adapter"))
            return cls(llm, sampling_params=SamplingParams, lora_request=lora, workdir=workdir)
        policy.save_pretrained(workdir / "model", safe_serialization=True)
        tokenizer.save_pretrained(workdir / "model")
        llm = LLM(model=str(workdir / "model"), **options)
        return cls(llm, sampling_params=SamplingParams, workdir=workdir)

    def close(self) -> None:
        """Free the engine (and its GPU memory) and the saved weights."""
        import gc

        self.llm = None
        gc.collect()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def request_seed(seed: int, stream: int, batch: int, position: int) -> int:
    """vLLM's per-request seed for one prompt: a function of (seed, stream, batch, prompt position) only."""
    return stream_seed(seed, stream, batch, position) % (2**31 - 1)


def sampling_params_for(engine: VLLMEngine, settings: GenerationSection, samples_per_prompt: int, seed: int):
    """raftlib's generation settings as vLLM SamplingParams."""
    return engine.sampling_params(
        n=samples_per_prompt,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k if settings.top_k > 0 else -1,  # vLLM's "no top-k"
        max_tokens=settings.max_new_tokens,
        stop=list(settings.stop_strings) or None,
        include_stop_str_in_output=True,  # raftlib keeps the stop string in the completion
        logprobs=0,  # the sampled token's log-probability only
        seed=seed,
    )


def samples_from_output(prompt: Prompt, prompt_ids: list[int], output, eos_ids: set[int]) -> list[Sample]:
    """One vLLM RequestOutput (n completions of one prompt) as raftlib Samples, in sample order."""
    samples = []
    for sample_index, completion in enumerate(sorted(output.outputs, key=lambda c: c.index)):
        token_ids = list(completion.token_ids)
        if completion.finish_reason == "length":
            reason = "length"
        elif isinstance(completion.stop_reason, str):
            reason = "stop"  # a stop string matched
        else:
            reason = "eos"  # an EOS (or stop token id) ended it
            if not token_ids or token_ids[-1] not in eos_ids:
                raise ValueError(
                    f"vLLM finished prompt {prompt.prompt_id} sample {sample_index} with an EOS that is not among "
                    "its tokens; raftlib trains on the EOS, so the engine must return it (vLLM does by default)"
                )
        logprob = completion.cumulative_logprob
        if logprob is None:
            raise ValueError("vLLM returned no log-probabilities; the engine must be called with logprobs=0")
        samples.append(
            Sample(
                prompt_id=prompt.prompt_id,
                sample_index=sample_index,
                prompt=prompt.text,
                completion=completion.text,
                prompt_token_ids=list(prompt_ids),
                completion_token_ids=token_ids,
                logprob=float(logprob),
                finish_reason=reason,
            )
        )
    return samples


def vllm_batch_drawer(
    engine: VLLMEngine,
    tokenizer,
    settings: GenerationSection,
    *,
    seed: int,
    stream: int = 0,
    samples_per_prompt: int | None = None,
    max_prompt_tokens: int | None = None,
    eos_ids: set[int] | None = None,
) -> Callable[[int, Sequence[Prompt]], list[Sample]]:
    """`draw(index, prompts)` for `raftlib.batches.run_batches` on a vLLM engine; request seeds depend on
    (seed, stream, batch, position), so a batch drawn again is the same."""
    k = samples_per_prompt or settings.samples_per_prompt
    if eos_ids is None:
        eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()

    def draw(index: int, batch: Sequence[Prompt]) -> list[Sample]:
        ids = encode_prompts(
            tokenizer, batch, chat_template=settings.chat_template, max_prompt_tokens=max_prompt_tokens
        )
        requests = [{"prompt_token_ids": prompt_ids} for prompt_ids in ids]
        params = [
            sampling_params_for(engine, settings, k, request_seed(seed, stream, index, position))
            for position in range(len(batch))
        ]
        outputs = engine.llm.generate(requests, params, lora_request=engine.lora_request, use_tqdm=False)
        return [
            sample
            for prompt, prompt_ids, output in zip(batch, ids, outputs, strict=True)
            for sample in samples_from_output(prompt, prompt_ids, output, eos_ids)
        ]

    return draw


def generate_with_vllm(
    engine: VLLMEngine,
    tokenizer,
    prompts: Sequence[Prompt],
    settings: GenerationSection,
    *,
    seed: int,
    stream: int = 0,
    samples_per_prompt: int | None = None,
    max_prompt_tokens: int | None = None,
    eos_ids: set[int] | None = None,
    batches: Batches[list[Sample]] | None = None,
) -> list[Sample]:
    """`raftlib.text.generate.generate_samples` on a vLLM engine: same batches, same persistence and resume."""
    draw = vllm_batch_drawer(
        engine, tokenizer, settings, seed=seed, stream=stream, samples_per_prompt=samples_per_prompt,
        max_prompt_tokens=max_prompt_tokens, eos_ids=eos_ids,
    )  # fmt: skip
    return flatten(run_batches(prompts, settings.prompts_per_batch, draw, batches, unit="prompt"))
