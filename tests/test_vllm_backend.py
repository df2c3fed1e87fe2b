"""The vLLM translation layer, against an engine double (vLLM itself cannot be installed or run here).

The double has vLLM's call shape (`generate(prompts, sampling_params, lora_request=, use_tqdm=)` returning
request outputs with `.outputs[i].index/.text/.token_ids/.cumulative_logprob/.finish_reason/.stop_reason`)
and draws its completions with raftlib's own decode loop on a real tiny model, seeded by the request's seed.
What is tested is ours: the requests we build and how we read the answers back.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from test_generate import PROMPTS, load

from raftlib.batches import Batches
from raftlib.config import GenerationSection
from raftlib.text.generate import generate_batch
from raftlib.text.sampling import batch_generator
from raftlib.text.vllm_backend import VLLMEngine, generate_with_vllm, request_seed


class EngineDouble:
    """vLLM's LLM.generate, answered by raftlib's decode loop on a tiny HF model."""

    def __init__(self, model, tokenizer, settings: GenerationSection) -> None:
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.requests: list[tuple[dict, SimpleNamespace]] = []

    def generate(self, prompts, sampling_params, lora_request=None, use_tqdm=True):
        outputs = []
        for request, params in zip(prompts, sampling_params, strict=True):
            self.requests.append((request, params))
            ids = request["prompt_token_ids"]
            drawn = generate_batch(
                self.model, self.tokenizer, [PROMPTS[0]], [ids], self.settings, samples_per_prompt=params.n,
                generator=batch_generator(params.seed),
            )  # fmt: skip
            answers = [
                SimpleNamespace(
                    index=i,
                    text=s.completion,
                    token_ids=tuple(s.completion_token_ids),
                    cumulative_logprob=s.logprob,
                    finish_reason="length" if s.finish_reason == "length" else "stop",
                    stop_reason=(params.stop or [None])[0] if s.finish_reason == "stop" else None,
                )
                for i, s in enumerate(drawn)
            ]
            outputs.append(SimpleNamespace(outputs=answers[::-1]))  # vLLM does not promise index order
        return outputs


def engine_for(gpt2_dir, settings):
    model, tokenizer = load(gpt2_dir)
    double = EngineDouble(model, tokenizer, settings)
    return VLLMEngine(double, sampling_params=lambda **kw: SimpleNamespace(**kw)), double, tokenizer


def test_requests_carry_k_seeds_and_settings_and_answers_become_samples(gpt2_dir):
    settings = GenerationSection(
        samples_per_prompt=3, temperature=0.7, top_p=0.9, max_new_tokens=8, prompts_per_batch=2
    )
    engine, double, tokenizer = engine_for(gpt2_dir, settings)
    samples = generate_with_vllm(engine, tokenizer, PROMPTS, settings, seed=5, stream=1)
    assert [(s.prompt_id, s.sample_index) for s in samples] == [(p.prompt_id, j) for p in PROMPTS for j in range(3)]
    params = [p for _, p in double.requests]
    assert {(p.n, p.temperature, p.top_p, p.top_k, p.max_tokens, p.logprobs, p.include_stop_str_in_output)
            for p in params} == {(3, 0.7, 0.9, -1, 8, 0, True)}  # fmt: skip
    assert [p.seed for p in params] == [request_seed(5, 1, 0, 0), request_seed(5, 1, 0, 1), request_seed(5, 1, 1, 0)]
    assert len({p.seed for p in params}) == 3
    for sample in samples:
        assert sample.finish_reason in {"eos", "length"}
        assert sample.completion == tokenizer.decode(sample.completion_token_ids, skip_special_tokens=True)
        if sample.finish_reason == "eos":
            assert sample.completion_token_ids[-1] == tokenizer.eos_token_id
    # the same seeds give the same samples: a batch regenerated after a crash is the one that was lost
    again = generate_with_vllm(engine, tokenizer, PROMPTS, settings, seed=5, stream=1, batches=Batches(indices=[1]))
    assert [s.to_row() for s in again] == [s.to_row() for s in samples[6:]]


def test_completed_batches_are_not_requested_and_new_ones_are_handed_to_on_batch(gpt2_dir):
    settings = GenerationSection(samples_per_prompt=2, max_new_tokens=6, prompts_per_batch=2)
    engine, double, tokenizer = engine_for(gpt2_dir, settings)
    first = generate_with_vllm(engine, tokenizer, PROMPTS, settings, seed=0)
    double.requests.clear()
    saved = {}
    resumed = generate_with_vllm(
        engine,
        tokenizer,
        PROMPTS,
        settings,
        seed=0,
        batches=Batches(completed={0: first[:4]}, on_batch=saved.__setitem__),
    )
    assert len(double.requests) == 1 and list(saved) == [1]
    assert [s.to_row() for s in resumed] == [s.to_row() for s in first]


def test_stop_strings_are_kept_and_reported_as_stop(gpt2_dir):
    settings = GenerationSection(samples_per_prompt=1, temperature=0.0, max_new_tokens=12)
    engine, double, tokenizer = engine_for(gpt2_dir, settings)
    text = generate_with_vllm(engine, tokenizer, PROMPTS[:1], settings, seed=0)[0].completion
    stopping = GenerationSection(samples_per_prompt=1, temperature=0.0, max_new_tokens=12, stop_strings=[text[3:5]])
    double.settings = stopping
    stopped = generate_with_vllm(engine, tokenizer, PROMPTS[:1], stopping, seed=0)[0]
    assert double.requests[-1][1].stop == [text[3:5]]
    assert stopped.finish_reason == "stop" and stopped.completion.endswith(text[3:5])


def test_answers_raftlib_cannot_train_on_are_clear_errors(gpt2_dir):
    settings = GenerationSection(samples_per_prompt=1, max_new_tokens=4)
    engine, double, tokenizer = engine_for(gpt2_dir, settings)
    answer = SimpleNamespace(index=0, text="x", token_ids=(5,), cumulative_logprob=None, finish_reason="length",
                             stop_reason=None)  # fmt: skip
    double.generate = lambda *a, **k: [SimpleNamespace(outputs=[answer])]
    with pytest.raises(ValueError, match="no log-probabilities"):
        generate_with_vllm(engine, tokenizer, PROMPTS[:1], settings, seed=0)
    answer.cumulative_logprob, answer.finish_reason = -1.0, "stop"  # an EOS finish without the EOS token
    with pytest.raises(ValueError, match="EOS that is not among its tokens"):
        generate_with_vllm(engine, tokenizer, PROMPTS[:1], settings, seed=0)


def test_a_missing_vllm_is_named_with_the_alternative(monkeypatch, gpt2_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as on this machine: not installed
    model, _ = load(gpt2_dir)
    with pytest.raises(ImportError, match=r"pip install vllm.*backend 'static'"):
        VLLMEngine.for_policy(model, None, None)


def fake_vllm(monkeypatch) -> list[dict]:
    """A `vllm` module double recording how the engine is built (the real one cannot be installed here)."""
    import types

    built: list[dict] = []

    class LLM:
        def __init__(self, **kwargs):
            built.append(kwargs)

    class LoRARequest:
        def __init__(self, name, number, path):
            self.name, self.number, self.path = name, number, path

    vllm, lora, request = (types.ModuleType(n) for n in ("vllm", "vllm.lora", "vllm.lora.request"))
    vllm.LLM, vllm.SamplingParams, request.LoRARequest = LLM, SimpleNamespace, LoRARequest
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request)):
        monkeypatch.setitem(sys.modules, name, module)
    return built


def test_the_engine_loads_the_current_weights_full_or_as_a_lora_adapter(monkeypatch, gpt2_dir):
    from pathlib import Path

    from safetensors.torch import load_file

    from raftlib.config import RAFTConfig
    from raftlib.text.models import load_policy

    built = fake_vllm(monkeypatch)
    model, tokenizer = load(gpt2_dir)
    config = RAFTConfig.from_dict({"model": {"path": str(gpt2_dir)}, "data": {"prompts": "p.jsonl"},
                                   "generation": {"vllm_options": {"gpu_memory_utilization": 0.4}}, "reward": {"fn": "length"}, "seed": 3})  # fmt: skip
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # as after a fine-tune: vLLM must get these weights, not the base dir's
    engine = VLLMEngine.for_policy(model, tokenizer, config)
    saved = Path(built[-1]["model"])
    assert built[-1] == {"model": str(saved), "seed": 3, "logprobs_mode": "raw_logprobs", "gpu_memory_utilization": 0.4}
    assert torch.equal(load_file(saved / "model.safetensors")["transformer.wte.weight"], model.lm_head.weight)
    engine.close()
    assert not saved.exists()  # the saved copy goes with the engine

    lora_config = config.replace(["model.lora={r: 4, alpha: 8}"])
    policy = load_policy(lora_config.model, None, "cpu", seed=0)
    engine = VLLMEngine.for_policy(policy, tokenizer, lora_config)
    assert built[-1]["model"] == str(gpt2_dir) and built[-1]["enable_lora"] and built[-1]["max_lora_rank"] == 4
    assert (Path(engine.lora_request.path) / "adapter_config.json").is_file()
    engine.close()
