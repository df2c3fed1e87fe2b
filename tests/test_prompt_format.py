"""One prompt format per experiment, and the end of a templated turn counts as an end of sequence. A Qwen2-like
stand-in shows both: its tokenizer ships a ChatML template whose turns end in `<|im_end|>` while its EOS is
`<|endoftext|>` alone, as Qwen2.5's base models do."""

import torch
from transformers import AutoModelForCausalLM

from raftlib import testing as T
from raftlib.config import GenerationSection, ModelSection, RAFTConfig
from raftlib.records import Prompt
from raftlib.text.generate import Draw, generate_from
from raftlib.text.models import load_tokenizer, read_model_config
from raftlib.text.prompts import TextFormat

HH_PROMPT = "\n\nHuman: how do I bake bread?\n\nAssistant:"


def test_a_chatml_template_adds_its_end_of_turn_to_the_eos_set(tmp_path):
    directory = T.build_qwen2(tmp_path / "qwen2")
    tokenizer = load_tokenizer(ModelSection(path=str(directory)))
    _, generation_config = read_model_config(ModelSection(path=str(directory)))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    auto = TextFormat.of(tokenizer, generation_config, GenerationSection(chat_template="auto"))
    assert auto.templated and auto.eos_ids == {tokenizer.eos_token_id, im_end}
    assert tokenizer.decode(auto.encode([Prompt(0, "hi", {})])[0]).endswith("<|im_start|>assistant\n")
    never = TextFormat.of(tokenizer, generation_config, GenerationSection(chat_template="never"))
    assert not never.templated and never.eos_ids == {tokenizer.eos_token_id}


def test_a_templated_completion_ends_at_im_end_not_at_the_length_limit(tmp_path):
    directory = T.build_qwen2(tmp_path / "qwen2")
    tokenizer = load_tokenizer(ModelSection(path=str(directory)))
    model = AutoModelForCausalLM.from_pretrained(directory)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[im_end] = 30.0  # the model ends its turn at once
    model.lm_head = head
    section = GenerationSection(chat_template="auto", max_new_tokens=8, samples_per_prompt=2)
    samples = generate_from(model, tokenizer, [Prompt(0, "hi", {})], section, Draw(seed=0, samples_per_prompt=2))
    assert [s.finish_reason for s in samples] == ["eos", "eos"]
    assert [s.completion_token_ids for s in samples] == [[im_end], [im_end]] and samples[0].completion == ""


def test_the_hh_runs_read_hh_text_as_the_sft_reads_it(tmp_path):
    """HH-RLHF's prompts are their own format: RAFT, its evaluation (and perplexity: the same text format) read
    them without a template even where the tokenizer has one, exactly the ids the SFT setup trains on."""
    from raftsuite import hh_methods

    policy = T.build_qwen2(tmp_path / "qwen2")
    reward = T.build_gpt2_reward_model(tmp_path / "rm")
    settings = hh_methods.MethodSettings(sft_model=str(policy), reward_model=str(reward), gold=False)
    prompts = T.write_prompts(tmp_path / "prompts.jsonl")
    run = hh_methods.MethodRun("raft", 1e-4, 0)
    configs = [
        RAFTConfig.from_dict(hh_methods.raft_config(settings, prompts, 4, run, tmp_path / "run")),
        hh_methods.evaluation_config(settings, 0),
    ]
    tokenizer = load_tokenizer(ModelSection(path=str(policy)))
    _, generation_config = read_model_config(ModelSection(path=str(policy)))
    sft_ids = tokenizer(HH_PROMPT)["input_ids"]  # raftsuite.hh_paper's SFT examples
    for config in configs:
        text_format = TextFormat.of(tokenizer, generation_config, config.generation)
        assert not text_format.templated
        assert text_format.encode([Prompt(0, HH_PROMPT, {})])[0] == sft_ids


def test_the_reasoning_grpo_baseline_stops_where_raft_stops(tmp_path):
    """TRL stops a GRPO completion, and masks its loss after it, at the policy's generation-config EOS and the
    tokenizer's: for a ChatML model it must see `<|im_end|>` as raftlib's TextFormat does."""
    from datasets import Dataset
    from trl import GRPOTrainer

    from raftsuite import hh
    from raftsuite import reasoning as R

    directory = T.build_qwen2(tmp_path / "qwen2")
    tokenizer = load_tokenizer(ModelSection(path=str(directory)))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    stop_ids = R.stop_token_ids(str(directory))
    assert stop_ids == sorted({tokenizer.eos_token_id, im_end})
    settings = R.ReasoningSettings(base_model=str(directory))
    policy = R.grpo_policy(settings, stop_ids, 1e-4, data_parallel=False)
    args = hh.grpo_config(
        tmp_path / "grpo",
        seed=0,
        use_cpu=True,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=4,
        max_steps=1,
    )
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=[lambda prompts, completions, **kwargs: [0.0] * len(completions)],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": "1 + 1"}]}] * 4),
        processing_class=tokenizer,
    )
    assert im_end in trainer.eos_token_ids and im_end in trainer.generation_config.eos_token_id


def test_the_hh_sft_trains_on_the_ids_the_perplexity_scores(tmp_path):
    """The paper SFT's examples and the runs' reference perplexity (`eval_reference_ppl`, no EOS) read one HH row
    as the same prompt and reference ids, SFT then adding the EOS: the leading space after "Assistant:" is part of
    the reference (a GPT-2 BPE gives " Sure" and "Sure" different ids, so a space added on one side only would
    score other tokens than were trained)."""
    from raftlib.text.tokens import reference_examples
    from raftsuite import hh_paper

    dialogue = "\n\nHuman: how do I bake bread?\n\nAssistant: Sure, mix flour and water.  \n"
    prompt, chosen = hh_paper.split_dialogue(dialogue)
    for directory in (T.build_gpt2(tmp_path / "gpt2"), T.build_llama(tmp_path / "llama", chat_template=False)):
        tokenizer = load_tokenizer(ModelSection(path=str(directory)))
        _, generation_config = read_model_config(ModelSection(path=str(directory)))
        row = {"prompt": prompt, "reference": chosen.rstrip()}  # as hh_paper.hh_prompts stores it
        assert row["reference"] == " Sure, mix flour and water."
        text_format = TextFormat.of(tokenizer, generation_config, GenerationSection(chat_template="never"))
        scored = reference_examples(
            text_format, [Prompt(0, prompt, {"reference": row["reference"]})], "reference", append_eos=False
        )
        prompt_ids, completion_ids = hh_paper.sft_example(tokenizer, row)
        assert list(scored[0][0]) == prompt_ids and [*scored[0][1], tokenizer.eos_token_id] == completion_ids
