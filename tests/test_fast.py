"""The fast paths give the same answers: static-cache generation, packing, chunked cross-entropy.

The speed itself is measured in results/ (tools/gpu_check.py, notebooks/efficiency.ipynb), never asserted.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from test_generate import PROMPTS, load
from transformers import AutoModelForCausalLM

from conftest import LOGPROB_ATOL, TIE_MARGIN, assert_same_draws
from raftlib.batches import Batches
from raftlib.config import GenerationSection, TrainingSection
from raftlib.records import Sample
from raftlib.text.decoding import Decoding
from raftlib.text.eager import EagerDecoder
from raftlib.text.fastgen import StaticDecoder, hashed_uniform
from raftlib.text.finetune import (
    chunked_completion_nll,
    collate,
    collate_packed,
    completion_logprobs,
    completion_loss,
    finetune,
    output_head,
)
from raftlib.text.generate import Draw, generate_samples, samples_of
from raftlib.text.prompts import TextFormat
from raftlib.text.sampling import draw_step

EXAMPLES = [([5, 6, 7], [8, 9, 10, 11]), ([12, 13], [14, 15]), ([3, 4, 5, 6, 7], [1]), ([9], [2, 3, 4, 5, 6, 7])]


# ----------------------------------------------------------------------------------------------
# Sampling numerics
# ----------------------------------------------------------------------------------------------


def test_hashed_uniforms_are_uniform_and_a_pure_function_of_seed_and_step():
    seeds = torch.arange(100_000, dtype=torch.int64) * 7919
    u = hashed_uniform(seeds, torch.tensor(3))
    assert u.min() > 0 and u.max() < 1
    assert u.mean().item() == pytest.approx(0.5, abs=0.005)
    assert torch.histc(u, bins=10, min=0, max=1).div(u.numel()).sub(0.1).abs().max() < 0.005
    assert torch.equal(u[5:9], hashed_uniform(seeds[5:9], torch.tensor(3)))  # rows do not depend on the batch
    assert not torch.equal(u, hashed_uniform(seeds, torch.tensor(4)))  # the step matters
    assert torch.corrcoef(torch.stack([u, hashed_uniform(seeds, torch.tensor(4))]))[0, 1].abs() < 0.01


def test_inverse_cdf_draws_follow_the_tempered_softmax_and_respect_top_k():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5]).repeat(40_000, 1)
    uniforms = torch.rand(40_000, generator=torch.Generator().manual_seed(0))
    for temperature in (1.0, 0.5):
        settings = SimpleNamespace(temperature=temperature, top_k=0, top_p=1.0)
        drawn = draw_step(logits, settings, uniforms)
        frequencies = torch.bincount(drawn.token, minlength=5).float() / len(drawn.token)
        torch.testing.assert_close(frequencies, torch.softmax(logits[0] / temperature, -1), atol=0.01, rtol=0)
        # log-probabilities and entropy are the model's own (temperature 1), whatever the sampling temperature
        log_dist = torch.log_softmax(logits, -1)
        torch.testing.assert_close(drawn.logprob, log_dist.gather(-1, drawn.token[:, None]).squeeze(-1))
        torch.testing.assert_close(drawn.entropy, -(log_dist.exp() * log_dist).sum(-1))
        assert (drawn.margin >= 0).all()
    drawn = draw_step(logits, SimpleNamespace(temperature=1.0, top_k=2, top_p=1.0), uniforms)
    assert set(drawn.token.tolist()) == {0, 1}
    # a uniform of exactly 0 never draws a token of probability 0 (top-k masked the first ones here)
    masked = torch.tensor([[-50.0, -50.0, 3.0, 2.0]])
    edge = draw_step(masked, SimpleNamespace(temperature=1.0, top_k=2, top_p=1.0), torch.zeros(1))
    assert edge.token.item() == 2
    greedy = draw_step(logits[:3], SimpleNamespace(temperature=0.0, top_k=0, top_p=1.0), uniforms[:3])
    assert greedy.token.tolist() == [0, 0, 0] and torch.allclose(greedy.margin, torch.ones(3))


# ----------------------------------------------------------------------------------------------
# The static backend
# ----------------------------------------------------------------------------------------------


def decode_with(decoder, text_format, settings) -> tuple[list[Sample], torch.Tensor]:
    """One decode call of `decoder` on PROMPTS (seed 0), its samples and the (rows, steps) draw margins."""
    ids = text_format.encode(PROMPTS)
    decoded = decoder.decode(ids, settings.samples_per_prompt, 0)
    return samples_of(PROMPTS, ids, settings.samples_per_prompt, decoded, text_format), decoded.margins


def static_and_eager(model, tokenizer, settings, compile: bool = False):
    text_format = TextFormat.of(tokenizer, model, settings)
    decoding = Decoding.of(settings, text_format)
    rows = len(PROMPTS) * settings.samples_per_prompt
    static = StaticDecoder(model, decoding, rows=rows, prompt_width=16, compile=compile)
    return static, EagerDecoder(model, decoding), text_format


@pytest.mark.parametrize("which", ["gpt2_dir", "llama_dir"])
def test_static_backend_greedy_equals_the_eager_loop_with_eos_and_stop_strings(which, request):
    model, tokenizer = load(request.getfixturevalue(which))
    greedy = GenerationSection(samples_per_prompt=2, temperature=0.0, max_new_tokens=12)
    static, eager, text_format = static_and_eager(model, tokenizer, greedy)
    reference, _ = decode_with(eager, text_format, greedy)
    drawn, margins = decode_with(static, text_format, greedy)
    assert_same_draws(drawn, reference, margins)
    # a stop string taken from the text: both backends stop the same rows at the same token
    stopping = replace(greedy, stop_strings=[reference[0].completion[4:6]])
    static, eager, text_format = static_and_eager(model, tokenizer, stopping)
    reference, _ = decode_with(eager, text_format, stopping)
    assert "stop" in {s.finish_reason for s in reference}
    drawn, margins = decode_with(static, text_format, stopping)
    assert_same_draws(drawn, reference, margins)
    # EOS made likely enough to end a row part-way (the bias is searched for)
    bias = torch.zeros(len(tokenizer))
    output_head(model).register_forward_hook(lambda m, i, out: out + bias)
    static, eager, text_format = static_and_eager(model, tokenizer, greedy)
    for strength in torch.linspace(0.05, 1.0, 20).tolist():
        bias[tokenizer.eos_token_id] = strength
        reference, _ = decode_with(eager, text_format, greedy)
        if any(s.finish_reason == "eos" and s.completion_token_count > 1 for s in reference):
            break
    else:
        pytest.fail("no EOS bias ended a row part-way")
    drawn, margins = decode_with(static, text_format, greedy)
    assert_same_draws(drawn, reference, margins)
    assert any(s.finish_reason == "eos" and s.completion_token_count > 1 for s in drawn)


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
    static, _, text_format = static_and_eager(model, tokenizer, settings)
    plan = Draw(seed=4, stream=0, samples_per_prompt=3, prompts_per_batch=2)
    first = generate_samples(static, text_format, PROMPTS, plan, Batches(progress=False))
    fresh, _, _ = static_and_eager(model, tokenizer, settings)
    again = generate_samples(fresh, text_format, PROMPTS, plan, Batches(progress=False))
    # Exact equality is right here and below: the same kernels on the same shapes repeat the same arithmetic.
    assert [s.to_row() for s in first] == [s.to_row() for s in again]
    assert len({tuple(s.completion_token_ids) for s in first}) > len(PROMPTS)  # K samples differ
    # batch 1 alone (as after a crash that kept batch 0) is the same as in the full run; its 3 rows are padded to
    # the cache's 9 with dummy rows, which change nothing
    only_second = generate_samples(
        static, text_format, PROMPTS, plan, Batches(progress=False, owns=lambda index: index == 1)
    )
    assert [s.to_row() for s in only_second] == [s.to_row() for s in first[2 * 3 :]]
    forced, counts = completion_logprobs(
        model, [(s.prompt_token_ids, s.completion_token_ids) for s in first], tokenizer.pad_token_id
    )
    assert [s.completion_token_count for s in first] == counts
    assert [s.logprob for s in first] == pytest.approx(forced, abs=1e-4)
    assert all(s.entropy is not None and s.entropy > 0 for s in first)  # the static step records entropy too


def test_compiled_static_step_equals_the_uncompiled_one_and_compiles_once(gpt2_dir):
    """torch.compile (Inductor's C++ backend here; CUDA graphs on a GPU) changes nothing in what is drawn,
    up to rounding: Inductor fuses and reorders the step's float arithmetic (see assert_same_draws). One
    compilation serves every call of the run's shape, a refreshed policy object included."""
    torch._dynamo.reset()  # a graph another test built for these settings would be reused: none compiled here
    model, tokenizer = load(gpt2_dir)
    settings = GenerationSection(samples_per_prompt=2, temperature=1.0, max_new_tokens=6)
    plain, _, text_format = static_and_eager(model, tokenizer, settings)
    reference, margins = decode_with(plain, text_format, settings)
    compiled, _, _ = static_and_eager(model, tokenizer, settings, compile=True)
    drawn, _ = decode_with(compiled, text_format, settings)
    assert_same_draws(drawn, reference, margins)
    assert compiled.compilations == 1
    compiled.decode(text_format.encode(PROMPTS[:1]), 2, 5)  # fewer rows: padded to the one shape
    compiled.refresh(AutoModelForCausalLM.from_pretrained(gpt2_dir).eval(), None)  # another module object
    drawn_again, _ = decode_with(compiled, text_format, settings)
    assert_same_draws(drawn_again, reference, margins)
    assert compiled.compilations == 1


def test_a_static_run_compiles_its_decode_step_once_over_iterations_and_evaluation(
    gpt2_dir, prompts_file, tmp_path, monkeypatch
):
    """A whole run (2 iterations, each generating K = 4 and evaluating at 2 samples per held-out prompt, its
    policy refreshed after every fine-tune) builds one decoder and the compiler one graph: dynamo calls the
    backend once per graph it builds, a recompilation or a graph break included, so a second shape shows."""
    from conftest import base_config
    from raftlib import run
    from raftlib.config import RAFTConfig
    from raftlib.text import fastgen

    built, for_spec = [], StaticDecoder.__dict__["for_spec"]
    monkeypatch.setattr(fastgen, "COMPILE_BACKEND", lambda graph, example_inputs: graph.forward)  # no codegen
    monkeypatch.setattr(
        StaticDecoder,
        "for_spec",
        classmethod(lambda cls, spec: built.append(for_spec.__func__(cls, spec)) or built[-1]),
    )
    torch._dynamo.reset()  # graphs another test compiled are not this run's
    config = base_config(
        gpt2_dir,
        prompts_file,
        tmp_path / "run",
        generation={"samples_per_prompt": 4, "max_new_tokens": 8, "prompts_per_batch": 2, "backend": "static"},
        loop={"iterations": 2, "prompts_per_iteration": 4, "eval_samples_per_prompt": 2},
    )
    config["generation"]["compile"] = "always"
    result = run(RAFTConfig.from_dict(config))
    assert [row["iteration"] for row in result.metrics] == [0, 1, 2]  # 0: the evaluation before any fine-tune
    assert len(built) == 1 and built[0].compile
    assert built[0].compilations == 1


@pytest.mark.parametrize("settings", ["the same", "each its own"])
def test_static_decoders_past_dynamos_recompile_limit_still_run_a_compiled_step(gpt2_dir, monkeypatch, settings):
    """dynamo keeps at most `recompile_limit` (8) graphs per code object and then runs it eagerly, with one log
    line. An evaluation per GRPO callback, or a table's models evaluated in one kernel, builds a static decoder
    per call: every one of them must still run a compiled step. The same settings compile once and every later
    decoder reuses the graph; other settings compile their own, each once. The backend counts graphs built and
    calls of them (an eager fallback calls none)."""
    from raftlib.text import fastgen

    graph_calls = []

    def counting(graph, example_inputs):
        return lambda *inputs: graph_calls.append(1) or graph.forward(*inputs)

    monkeypatch.setattr(fastgen, "COMPILE_BACKEND", counting)
    torch._dynamo.reset()
    model, tokenizer = load(gpt2_dir)
    compilations, calls = [], []
    for index in range(torch._dynamo.config.recompile_limit + 2):
        temperature = 1.0 if settings == "the same" else 0.5 + index / 20
        decoding = GenerationSection(samples_per_prompt=2, temperature=temperature, max_new_tokens=4)
        decoder, _, text_format = static_and_eager(model, tokenizer, decoding, compile=True)
        before = len(graph_calls)
        decode_with(decoder, text_format, decoding)
        compilations.append(decoder.compilations)
        calls.append(len(graph_calls) - before)
        decoder.close()
    assert all(count > 0 for count in calls), calls  # every decoder ran the compiled step
    expected = [1] + [0] * (len(calls) - 1) if settings == "the same" else [1] * len(calls)
    assert compilations == expected


# ----------------------------------------------------------------------------------------------
# Fine-tuning: packing and the chunked loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["gpt2_dir", "llama_dir"])
def test_packed_rows_and_chunked_loss_give_the_padded_loss_and_gradients(which, request):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(which))
    padded = collate(EXAMPLES, 0)
    reference = completion_loss(
        model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits, padded["labels"]
    )
    reference_grads = torch.autograd.grad(reference, list(model.parameters()), allow_unused=True)
    packed = collate_packed(EXAMPLES)
    assert packed["input_ids"].shape == (1, sum(len(p) + len(c) for p, c in EXAMPLES))  # no padding at all
    for chunk in (3, 1000):
        out = model(
            input_ids=packed["input_ids"],
            position_ids=packed["position_ids"],
            use_cache=False,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        tokens = (packed["labels"][:, 1:] != -100).sum()
        loss = chunked_completion_nll(out.hidden_states[-1], packed["labels"], output_head(model), chunk) / tokens
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
        model, _ = finetune(
            model, EXAMPLES, replace(settings, **options), pad_id=0, seed=0, iteration=1, progress=False
        )
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
        model, _ = finetune(
            model,
            EXAMPLES,
            replace(settings, gradient_checkpointing=checkpointing),
            pad_id=0,
            seed=0,
            iteration=1,
            progress=False,
        )
        assert not model.is_gradient_checkpointing  # switched off again after the stage
        results.append(model.state_dict())
    for key, tensor in results[0].items():
        torch.testing.assert_close(results[1][key], tensor, atol=1e-6, rtol=1e-5)


def test_chunked_loss_refuses_models_that_transform_their_logits(llama_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match=r"final_logit_softcapping.*loss_chunk_tokens = 0"):
        output_head(model)
