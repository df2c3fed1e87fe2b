"""The fast paths give the same answers: static-cache generation, packing, chunked cross-entropy.

The speed itself is measured in results/ (tools/gpu_check.py, notebooks/efficiency.ipynb), never asserted.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_generate import PROMPTS, load
from transformers import AutoModelForCausalLM

from conftest import LOGPROB_ATOL, TIE_MARGIN, assert_same_draws
from raftlib.batches import Batches
from raftlib.config import GenerationSection, TrainingSection
from raftlib.records import Sample
from raftlib.text import fastgen
from raftlib.text.fastgen import StaticDecoder, decision_scores, gumbel_sample, hashed_uniform
from raftlib.text.finetune import (
    chunked_completion_loss,
    collate,
    collate_packed,
    completion_logprobs,
    completion_loss,
    finetune,
    output_head,
)
from raftlib.text.generate import generate_samples

EXAMPLES = [([5, 6, 7], [8, 9, 10, 11]), ([12, 13], [14, 15]), ([3, 4, 5, 6, 7], [1]), ([9], [2, 3, 4, 5, 6, 7])]


# ----------------------------------------------------------------------------------------------
# Sampling numerics
# ----------------------------------------------------------------------------------------------


def test_hashed_uniforms_are_uniform_and_a_pure_function_of_seed_step_token():
    seeds = torch.arange(256, dtype=torch.int64) * 7919
    u = hashed_uniform(seeds, torch.tensor(3), 4096)
    assert u.min() > 0 and u.max() < 1
    assert u.mean().item() == pytest.approx(0.5, abs=0.005)
    assert torch.histc(u, bins=10, min=0, max=1).div(u.numel()).sub(0.1).abs().max() < 0.005
    assert torch.equal(u[5:9], hashed_uniform(seeds[5:9], torch.tensor(3), 4096))  # rows do not depend on the batch
    assert not torch.equal(u, hashed_uniform(seeds, torch.tensor(4), 4096))  # the step matters


def test_gumbel_max_draws_follow_the_tempered_softmax_and_respect_top_k():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5]).repeat(40_000, 1)
    seeds = torch.randint(0, 2**31 - 1, (40_000,), generator=torch.Generator().manual_seed(0))
    for temperature in (1.0, 0.5):
        tokens, logprobs = gumbel_sample(logits, seeds, torch.tensor(1), temperature=temperature)
        frequencies = torch.bincount(tokens, minlength=5).float() / len(tokens)
        torch.testing.assert_close(frequencies, torch.softmax(logits[0] / temperature, -1), atol=0.01, rtol=0)
        # log-probabilities are the model's own (temperature 1), whatever the sampling temperature
        torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1))
    tokens, _ = gumbel_sample(logits, seeds, torch.tensor(1), temperature=1.0, top_k=2)
    assert set(tokens.tolist()) == {0, 1}
    greedy, _ = gumbel_sample(logits[:3], seeds[:3], torch.tensor(1), temperature=0.0)
    assert greedy.tolist() == [0, 0, 0]


# ----------------------------------------------------------------------------------------------
# The static backend
# ----------------------------------------------------------------------------------------------


def static_draws(model, tokenizer, settings, monkeypatch, **options) -> tuple[list[Sample], torch.Tensor]:
    """generate_samples with a StaticDecoder (one batch), and the (rows, steps) gap between the top two
    decision scores of every draw it made."""
    gaps, sample = [], fastgen.gumbel_sample

    def recording(logits, row_seeds, step, **sampling):
        top_two = decision_scores(logits, row_seeds, step, **sampling).topk(2, dim=-1).values
        gaps.append(top_two[:, 0] - top_two[:, 1])
        return sample(logits, row_seeds, step, **sampling)

    with monkeypatch.context() as patch:  # the uncompiled step looks gumbel_sample up at each call
        patch.setattr(fastgen, "gumbel_sample", recording)
        drawn = generate_samples(model, tokenizer, PROMPTS, settings, decoder=StaticDecoder(model),
                                 **options, batches=Batches(progress=False))  # fmt: skip
    assert settings.prompts_per_batch >= len(PROMPTS), "one batch: the gaps' rows are the samples"
    return drawn, torch.stack(gaps, dim=1)


@pytest.mark.parametrize("which", ["gpt2_dir", "llama_dir"])
def test_static_backend_greedy_equals_the_eager_loop_with_eos_and_stop_strings(which, request, monkeypatch):
    model, tokenizer = load(request.getfixturevalue(which))
    greedy = GenerationSection(samples_per_prompt=2, temperature=0.0, max_new_tokens=12)
    eager = generate_samples(model, tokenizer, PROMPTS, greedy, seed=0, batches=Batches(progress=False))
    static, gaps = static_draws(model, tokenizer, greedy, monkeypatch, seed=0)
    assert_same_draws(static, eager, gaps)
    # a stop string taken from the text: both backends stop the same rows at the same token
    stopping = replace(greedy, stop_strings=[eager[0].completion[4:6]])
    eager = generate_samples(model, tokenizer, PROMPTS, stopping, seed=0, batches=Batches(progress=False))
    assert "stop" in {s.finish_reason for s in eager}
    static, gaps = static_draws(model, tokenizer, stopping, monkeypatch, seed=0)
    assert_same_draws(static, eager, gaps)
    # EOS made likely enough to end a row part-way (the bias is searched for)
    bias = torch.zeros(len(tokenizer))
    output_head(model).register_forward_hook(lambda m, i, out: out + bias)
    for strength in torch.linspace(0.05, 1.0, 20).tolist():
        bias[tokenizer.eos_token_id] = strength
        eager = generate_samples(model, tokenizer, PROMPTS, greedy, seed=0, batches=Batches(progress=False))
        if any(s.finish_reason == "eos" and s.completion_token_count > 1 for s in eager):
            break
    else:
        pytest.fail("no EOS bias ended a row part-way")
    static, gaps = static_draws(model, tokenizer, greedy, monkeypatch, seed=0)
    assert_same_draws(static, eager, gaps)
    assert any(s.finish_reason == "eos" and s.completion_token_count > 1 for s in static)


def test_a_flip_is_accepted_only_at_a_near_tie():
    """The comparison above is not vacuous: a different token where the scores were far apart fails it."""
    reference = [Sample(0, 0, "p", "ab", [1], [5, 6], -1.0, "length")]
    flipped = [Sample(0, 0, "p", "ac", [1], [5, 7], -1.0, "length")]
    assert assert_same_draws(flipped, reference, torch.tensor([[0.5, TIE_MARGIN / 2]])) == 1
    with pytest.raises(AssertionError, match="more than a rounding flip"):
        assert_same_draws(flipped, reference, torch.tensor([[0.5, 0.01]]))
    with pytest.raises(AssertionError):  # same tokens, log-probabilities too far apart
        assert_same_draws([replace(reference[0], logprob=-1.0 + 10 * LOGPROB_ATOL)], reference, torch.ones(1, 2))


def test_static_backend_samples_are_seeded_per_batch_and_logprobs_are_the_models(llama_dir):
    model, tokenizer = load(llama_dir)
    settings = GenerationSection(
        samples_per_prompt=3, temperature=0.8, top_p=0.95, max_new_tokens=10, prompts_per_batch=2
    )
    decoder = StaticDecoder(model)
    first = generate_samples(
        model, tokenizer, PROMPTS, settings, seed=4, decoder=decoder, batches=Batches(progress=False)
    )
    again = generate_samples(
        model, tokenizer, PROMPTS, settings, seed=4, decoder=StaticDecoder(model), batches=Batches(progress=False)
    )
    # Exact equality is right here and below: the same kernels on the same shapes repeat the same arithmetic.
    assert [s.to_row() for s in first] == [s.to_row() for s in again]
    assert len({tuple(s.completion_token_ids) for s in first}) > len(PROMPTS)  # K samples differ
    # batch 1 alone (as after a crash that kept batch 0) is the same as in the full run
    only_second = generate_samples(
        model,
        tokenizer,
        PROMPTS,
        settings,
        seed=4,
        decoder=decoder,
        batches=Batches(progress=False, indices=[1]),
    )
    assert [s.to_row() for s in only_second] == [s.to_row() for s in first[2 * 3 :]]
    forced, counts = completion_logprobs(
        model, [(s.prompt_token_ids, s.completion_token_ids) for s in first], tokenizer.pad_token_id
    )
    assert [s.completion_token_count for s in first] == counts
    assert [s.logprob for s in first] == pytest.approx(forced, abs=1e-4)


def test_compiled_static_step_equals_the_uncompiled_one(gpt2_dir, monkeypatch):
    """torch.compile (Inductor's C++ backend here; CUDA graphs on a GPU) changes nothing in what is drawn,
    up to rounding: Inductor fuses and reorders the step's float arithmetic (see assert_same_draws)."""
    model, tokenizer = load(gpt2_dir)
    settings = GenerationSection(samples_per_prompt=2, temperature=1.0, max_new_tokens=6)
    plain, gaps = static_draws(model, tokenizer, settings, monkeypatch, seed=2)
    compiled = generate_samples(
        model,
        tokenizer,
        PROMPTS,
        settings,
        seed=2,
        decoder=StaticDecoder(model, compile=True),
        batches=Batches(progress=False),
    )
    assert_same_draws(compiled, plain, gaps)


# ----------------------------------------------------------------------------------------------
# Fine-tuning: packing and the chunked loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["gpt2_dir", "llama_dir"])
def test_packed_rows_and_chunked_loss_give_the_padded_loss_and_gradients(which, request):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(which))
    padded = collate(EXAMPLES, 0)
    reference = completion_loss(model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits,
                                padded["labels"])  # fmt: skip
    reference_grads = torch.autograd.grad(reference, list(model.parameters()), allow_unused=True)
    packed = collate_packed(EXAMPLES)
    assert packed["input_ids"].shape == (1, sum(len(p) + len(c) for p, c in EXAMPLES))  # no padding at all
    for chunk in (3, 1000):
        out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False,
                    output_hidden_states=True, logits_to_keep=1)  # fmt: skip
        loss = chunked_completion_loss(out.hidden_states[-1], packed["labels"], output_head(model), chunk)
        torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        for mine, theirs in zip(grads, reference_grads, strict=True):
            if theirs is not None:
                torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)


def test_a_stage_with_packing_and_chunked_loss_trains_like_the_plain_one(llama_dir):
    # Adam turns float-rounding differences of a near-zero gradient into lr-sized steps: a small lr keeps them small
    settings = TrainingSection(learning_rate=1e-3, epochs=2, micro_batch_size=2, lr_scheduler="constant")
    weights = {}
    for name, options in {"plain": {}, "fast": {"packing": True, "loss_chunk_tokens": 4}}.items():
        model = AutoModelForCausalLM.from_pretrained(llama_dir)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model, _ = finetune(model, EXAMPLES, replace(settings, **options), pad_id=0, seed=0, iteration=1,
                                progress=False)  # fmt: skip
        weights[name] = model.state_dict()
        assert any(not torch.equal(before[k], v) for k, v in weights[name].items())
    for key, tensor in weights["plain"].items():
        torch.testing.assert_close(weights["fast"][key], tensor, atol=2e-5, rtol=1e-4)


def test_gradient_checkpointing_changes_memory_not_the_result(gpt2_dir):
    settings = TrainingSection(learning_rate=1e-2, epochs=1, micro_batch_size=2, lr_scheduler="constant")
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(gpt2_dir, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        model, _ = finetune(model, EXAMPLES, replace(settings, gradient_checkpointing=checkpointing), pad_id=0,
                            seed=0, iteration=1, progress=False)  # fmt: skip
        assert not model.is_gradient_checkpointing  # switched off again after the stage
        results.append(model.state_dict())
    for key, tensor in results[0].items():
        torch.testing.assert_close(results[1][key], tensor, atol=1e-6, rtol=1e-5)


def test_chunked_loss_refuses_models_that_transform_their_logits(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match=r"final_logit_softcapping.*loss_chunk_tokens = 0"):
        output_head(model)
