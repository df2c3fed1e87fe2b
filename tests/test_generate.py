"""Generation: sampling numerics, correctness against HF generate, one prefill per prompt, seeds, EOS, stops."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import assert_near_tie, first_difference
from raftlib.batches import Batches
from raftlib.config import GenerationSection
from raftlib.records import Prompt
from raftlib.text.decoding import Decoding
from raftlib.text.eager import EagerDecoder
from raftlib.text.finetune import completion_logprobs
from raftlib.text.generate import Draw, generate_samples, samples_of
from raftlib.text.prompts import GenerationError, TextFormat, encode_prompts
from raftlib.text.sampling import batch_generator, filter_logits

PROMPTS = [Prompt(0, "the cat sat"), Prompt(1, "a very quiet river and the"), Prompt(2, "red")]


def load(directory):
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(directory).eval(), tokenizer


def eager(model, tokenizer, settings: GenerationSection) -> tuple[EagerDecoder, TextFormat]:
    """The eager decoder and the run's text format for `settings`, as a run builds them."""
    text_format = TextFormat.of(tokenizer, model, settings)
    return EagerDecoder(model, Decoding.of(settings, text_format)), text_format


def draw(model, tokenizer, prompts, settings: GenerationSection, seed: int = 0, stream: int = 0, batches=None):
    """generate_samples through the eager decoder, batched and seeded as `settings` and `seed` say."""
    decoder, text_format = eager(model, tokenizer, settings)
    plan = Draw(seed, stream, settings.samples_per_prompt, settings.prompts_per_batch)
    return generate_samples(decoder, text_format, prompts, plan, batches or Batches(progress=False))


def one_batch(model, tokenizer, prompts, settings: GenerationSection, seed: int = 0):
    """One decode call on `prompts` (no batching) and its samples."""
    decoder, text_format = eager(model, tokenizer, settings)
    ids = text_format.encode(prompts)
    k = settings.samples_per_prompt
    return samples_of(prompts, ids, k, decoder.decode(ids, k, seed), text_format)


def test_filter_logits_top_k_and_top_p_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # top_p 0.8: 0.5 + 0.3 reaches 0.8 -> keep two; top_p 0.81 needs the third
    assert torch.isinf(filter_logits(logits, top_p=0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.81)).tolist() == [[False, False, False, True]]
    # the most likely token always survives
    assert torch.isinf(filter_logits(logits, top_p=0.01)).tolist() == [[False, True, True, True]]
    # order of the vocabulary does not matter
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isinf(filter_logits(shuffled, top_p=0.8)).tolist() == [[True, False, True, False]]


@pytest.mark.parametrize("which", ["gpt2_dir", "llama_dir"])
def test_greedy_matches_hf_generate_despite_left_padding(which, request):
    model, tokenizer = load(request.getfixturevalue(which))
    settings = GenerationSection(samples_per_prompt=2, temperature=0.0, max_new_tokens=10, chat_template="never")
    ids = encode_prompts(tokenizer, PROMPTS, chat_template="never")
    samples = one_batch(model, tokenizer, PROMPTS, settings)
    assert len(samples) == 6
    for prompt_ids, pair in zip(ids, [samples[0:2], samples[2:4], samples[4:6]], strict=True):
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=10,
            pad_token_id=tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        reference = out.sequences[0, len(prompt_ids) :].tolist()
        top_two = torch.cat(out.logits).float().topk(2, dim=-1).values  # (steps, 2)
        for sample in pair:  # greedy: both of the K samples are the HF continuation
            assert sample.prompt_token_ids == prompt_ids
            # a left-padded batch and one unpadded prompt run different kernels: equal up to rounding flips
            step = first_difference(sample.completion_token_ids, reference)
            if step is None:
                assert sample.completion_token_ids == reference[: len(sample.completion_token_ids)]
            else:
                assert_near_tie(top_two[:, 0] - top_two[:, 1], step, f"prompt {sample.prompt_id}")


def test_one_prefill_per_prompt_batch(gpt2_dir):
    model, tokenizer = load(gpt2_dir)
    widths = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    settings = GenerationSection(samples_per_prompt=8, max_new_tokens=5, chat_template="never")
    one_batch(model, tokenizer, PROMPTS, settings)
    hook.remove()
    # the prefill sees 3 prompts once (not 3 x 8); every later call decodes one token for 24 rows
    assert widths[0][0] == 3 and widths[0][1] > 1
    assert all(shape == (24, 1) for shape in widths[1:])


def test_reproducible_under_seed_and_seed_matters(gpt2_dir):
    model, tokenizer = load(gpt2_dir)
    settings = GenerationSection(samples_per_prompt=4, max_new_tokens=8, prompts_per_batch=2)
    first = draw(model, tokenizer, PROMPTS, settings, seed=3, stream=1)
    again = draw(model, tokenizer, PROMPTS, settings, seed=3, stream=1)
    other = draw(model, tokenizer, PROMPTS, settings, seed=4, stream=1)
    assert [s.completion_token_ids for s in first] == [s.completion_token_ids for s in again]
    assert [s.completion_token_ids for s in first] != [s.completion_token_ids for s in other]
    assert [(s.prompt_id, s.sample_index) for s in first] == [(p, k) for p in range(3) for k in range(4)]


def test_completed_batches_are_reused_and_the_rest_regenerated_identically(gpt2_dir):
    model, tokenizer = load(gpt2_dir)
    settings = GenerationSection(samples_per_prompt=3, max_new_tokens=6, prompts_per_batch=1)
    saved = {}
    full = draw(model, tokenizer, PROMPTS, settings, batches=Batches(on_batch=saved.__setitem__, progress=False))
    partial = draw(model, tokenizer, PROMPTS, settings, batches=Batches(completed={0: saved[0]}, progress=False))
    assert partial == full


def test_logprob_is_the_models_own_at_temperature_one(gpt2_dir):
    model, tokenizer = load(gpt2_dir)
    settings = GenerationSection(samples_per_prompt=2, temperature=0.7, top_k=20, max_new_tokens=8)
    samples = draw(model, tokenizer, PROMPTS, settings, seed=1)
    forced, counts = completion_logprobs(
        model, [(s.prompt_token_ids, s.completion_token_ids) for s in samples], tokenizer.pad_token_id
    )
    assert [s.completion_token_count for s in samples] == counts
    assert [s.logprob for s in samples] == pytest.approx(forced, abs=1e-4)
    assert [sum(s.token_logprobs) for s in samples] == pytest.approx([s.logprob for s in samples], abs=1e-5)


def test_eos_ends_a_completion_and_is_kept(gpt2_dir):
    model, tokenizer = load(gpt2_dir)
    bias = torch.zeros(len(tokenizer))
    bias[tokenizer.eos_token_id] = 100.0  # make EOS the most likely next token everywhere
    model.lm_head.register_forward_hook(lambda m, i, out: out + bias)
    settings = GenerationSection(samples_per_prompt=2, max_new_tokens=8)
    samples = draw(model, tokenizer, PROMPTS, settings)
    for sample in samples:
        assert sample.finish_reason == "eos"
        assert sample.completion_token_ids == [tokenizer.eos_token_id]
        assert sample.completion == ""


def test_stop_strings_cut_the_completion(gpt2_dir):
    model, tokenizer = load(gpt2_dir)
    greedy = GenerationSection(samples_per_prompt=1, temperature=0.0, max_new_tokens=12)
    text = draw(model, tokenizer, PROMPTS[:1], greedy)[0].completion
    stop = text[3:5]
    assert stop.strip(), f"greedy text too short to pick a stop string from: {text!r}"
    stopping = GenerationSection(samples_per_prompt=1, temperature=0.0, max_new_tokens=12, stop_strings=[stop])
    stopped = draw(model, tokenizer, PROMPTS[:1], stopping)[0]
    assert stopped.finish_reason == "stop"
    assert stopped.completion.endswith(stop) and stop not in stopped.completion[: -len(stop)]
    assert text.startswith(stopped.completion)


def test_chat_template_modes(llama_dir, gpt2_dir):
    _, tokenizer = load(llama_dir)
    ids = encode_prompts(tokenizer, PROMPTS[:1], chat_template="auto")[0]
    assert tokenizer.decode(ids) == "<|user|>the cat sat\n<|assistant|>"
    assert encode_prompts(tokenizer, PROMPTS[:1], chat_template="never")[0] == tokenizer("the cat sat")["input_ids"]
    _, plain = load(gpt2_dir)
    with pytest.raises(GenerationError, match="no chat template"):
        encode_prompts(plain, PROMPTS[:1], chat_template="always")


def test_prompts_too_long_are_dropped_and_counted_and_truncation_keeps_the_end(gpt2_dir, caplog):
    model, tokenizer = load(gpt2_dir)
    long_prompt = Prompt(42, "the cat sat on the mat " * 40)
    settings = GenerationSection(max_new_tokens=16)
    kept, ids, dropped = TextFormat.of(tokenizer, model, settings).fitting([*PROMPTS, long_prompt], 16, 128, "train")
    assert kept == PROMPTS and dropped == 1 and set(ids) == {0, 1, 2}
    assert "train: dropped 1 of 4 prompts longer than the context window 128 minus max_new_tokens 16" in caplog.text
    assert "e.g. prompt 42" in caplog.text
    cut = TextFormat.of(tokenizer, model, settings, max_prompt_tokens=20)
    kept, ids, dropped = cut.fitting([long_prompt], 16, 128, "train")
    assert dropped == 0 and ids[42] == tokenizer(long_prompt.text)["input_ids"][-20:]


def test_batch_generator_streams_are_independent():
    a = torch.rand(3, generator=batch_generator(0, 1, 2))
    b = torch.rand(3, generator=batch_generator(0, 1, 2))
    c = torch.rand(3, generator=batch_generator(0, 2, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not math.isnan(float(a.sum()))
