"""The HH-RLHF paper path on local stand-ins shaped like the hub repos (raftsuite.standins).

No train prompt in the evaluation set; the reward model's input format is the model card's; its sentencepiece
tokenizer loads; the setup is built once even when two processes ask for it at the same moment.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

CARD_EXAMPLE = (
    "###Human: My daughter wants to know how to convert fractions to decimals, but I'm not sure how to explain it. "
    "Can you help? ###Assistant: Sure. So one way of converting fractions to decimals is to ask."
)
"""The first example text of the weqweasdas/hh_rlhf_rm_open_llama_3b model card (its answer shortened)."""


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict[str, Path]:
    from raftsuite.standins import build_all

    return build_all(tmp_path_factory.mktemp("standins"))


def test_the_rm_formatter_writes_the_model_cards_format():
    from raftsuite.hh_paper import FORMATTERS, open_llama_rm_format, split_dialogue

    hh = (
        "\n\nHuman: My daughter wants to know how to convert fractions to decimals, but I'm not sure how to "
        "explain it. Can you help?\n\nAssistant: Sure. So one way of converting fractions to decimals is to ask."
    )
    prompt, completion = split_dialogue(hh)
    assert open_llama_rm_format(prompt, completion) == CARD_EXAMPLE
    assert FORMATTERS["open_llama_hh"] is open_llama_rm_format
    two_turns = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Help?\n\nAssistant:"
    assert (
        open_llama_rm_format(two_turns, " Yes.")
        == "###Human: Hi ###Assistant: Hello. ###Human: Help? ###Assistant: Yes."
    )


def test_the_reward_scores_formatted_text_with_the_sentencepiece_rm(standins):
    from transformers import AutoTokenizer

    from raftlib.text.rewards import RewardModelScorer
    from raftsuite.hh_paper import formatted_reward_model

    tokenizer = AutoTokenizer.from_pretrained(standins["reward_model"])
    assert not (standins["reward_model"] / "tokenizer.json").exists()  # converted from tokenizer.model
    assert tokenizer.chat_template is None and tokenizer.pad_token is None
    assert tokenizer.decode(tokenizer("###Human: soup? ###Assistant: rain")["input_ids"], skip_special_tokens=True) == (
        "###Human: soup? ###Assistant: rain"
    )
    # the converted fast tokenizer splits runs of spaces unlike the tokenizer.model (transformers#24233), as
    # Open-LLaMA's does: the scorer then encodes with sentencepiece, the tokens the reward model was trained on
    import sentencepiece

    from raftlib.text.rewards import check_against_sentencepiece, sentencepiece_batch

    processor = check_against_sentencepiece(tokenizer, str(standins["reward_model"]))
    assert processor is not None
    text = "###Human: How do I   bake bread?"
    spm = sentencepiece.SentencePieceProcessor(model_file=str(standins["reward_model"] / "tokenizer.model"))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    row = sentencepiece_batch(processor, tokenizer, [text, "short"], None)["input_ids"][0].tolist()
    assert [t for t in row if t != tokenizer.bos_token_id] == spm.encode(text)
    reward = formatted_reward_model(str(standins["reward_model"]), formatter="open_llama_hh", batch_size=2)
    prompts, completions = ["\n\nHuman: How do I make soup?\n\nAssistant:"] * 2, [" Boil water.", " Rain."]
    ours = reward(prompts, completions)
    direct = RewardModelScorer(str(standins["reward_model"]), use_chat_template=False)
    card = direct(
        [
            "###Human: How do I make soup? ###Assistant: Boil water.",
            "###Human: How do I make soup? ###Assistant: Rain.",
        ],
        ["", ""],
    )
    assert ours == pytest.approx(card, abs=1e-5)
    assert ours != pytest.approx(direct(prompts, completions), abs=1e-5)  # the raw HH text scores differently
    with pytest.raises(ValueError, match=r"reward\.args\.formatter = 'chatml'"):
        formatted_reward_model(str(standins["reward_model"]), formatter="chatml")


def test_a_difference_the_probes_miss_is_caught_on_the_texts_scored(standins, monkeypatch, caplog):
    """The probes are a sample; the scorer checks every batch it encodes against the tokenizer.model, so a text
    the fast tokenizer gets wrong is scored with sentencepiece's tokens, as a scorer warned at setup scores it."""
    import logging

    from raftlib.text import rewards

    path = str(standins["reward_model"])
    texts = ["###Human: soup? ###Assistant: rain", "###Human: How do I   bake bread? ###Assistant:  Mix  flour."]
    warned_at_setup = rewards.RewardModelScorer(path, use_chat_template=False, batch_size=1)
    expected = warned_at_setup(texts, ["", ""])
    monkeypatch.setattr(rewards, "SENTENCEPIECE_PROBES", (texts[0],))  # a probe both tokenizers encode alike
    scorer = rewards.RewardModelScorer(path, use_chat_template=False, batch_size=1)
    scorer.setup()
    try:
        assert scorer.sentencepiece is None and scorer.reference is not None  # the probe passed
        with caplog.at_level(logging.WARNING, "raftlib"):
            assert scorer(texts, ["", ""]) == pytest.approx(expected, abs=1e-6)
        assert scorer.sentencepiece is scorer.reference  # switched at the second text, for the rest of the run
        assert "How do I   bake bread" in caplog.text and "transformers#24233" in caplog.text
    finally:
        scorer.teardown()
    fast_only = rewards.RewardModelScorer(path, use_chat_template=False, batch_size=1)
    fast_only.setup()
    fast_only.reference = None  # what the scorer did before: the probes alone
    try:
        assert fast_only(texts, ["", ""])[1] != pytest.approx(expected[1], abs=1e-6)  # the tokens matter
    finally:
        fast_only.teardown()


def _setup(directory: str, standins: dict, **extra):
    from raftsuite.hh_paper import PaperSetupRequest, prepare_paper_setup

    request = PaperSetupRequest(
        policy_model=str(standins["policy_model"]),
        dataset=str(standins["dataset"]),
        reward_model=str(standins["reward_model"]),
        max_prompt_tokens=128,
        eval_prompts=40,
        policy_dtype="float32",
        mixed_precision="no",
        **extra,
    )
    return prepare_paper_setup(directory, request, progress=False)


def test_no_train_prompt_is_in_the_evaluation_set_and_the_subset_is_respected(standins, tmp_path):
    from raftsuite.hh_paper import read_hh, split_dialogue, test_prompts

    setup = _setup(str(tmp_path / "setup"), standins)
    train = {json.loads(line)["prompt"] for line in setup.prompts.read_text().splitlines()}
    evaluation = [p.text for p in test_prompts(setup)]
    # all train-split prompts of the helpful dirs, read straight from the dataset
    every_train = {split_dialogue(r["chosen"])[0] for r in read_hh(str(standins["dataset"]), "train", "helpful")}
    every_test = {split_dialogue(r["chosen"])[0] for r in read_hh(str(standins["dataset"]), "test", "helpful")}
    assert every_train & every_test, "the stand-in repeats train dialogues in test, as the hub's split does"
    assert evaluation and not set(evaluation) & every_train
    assert set(evaluation) <= every_test and train <= every_train
    harmless = {split_dialogue(r["chosen"])[0] for r in read_hh(str(standins["dataset"]), "train", "harmless")}
    assert not (train | set(evaluation)) & harmless  # helpful subset only, as the RM was trained
    assert all("How can I hurt" not in text for text in train | set(evaluation))


def test_a_wrong_subset_names_the_parameter(standins, tmp_path):
    with pytest.raises(ValueError, match="subset = 'helpfull'"):
        _setup(str(tmp_path / "s"), standins, subset="helpfull")


def _build_in_process(directory: str, standins: dict, log: str) -> None:
    import raftsuite.hh_paper as hp

    built = hp._build_paper_setup

    def counting(*args, **kwargs):
        with open(log, "a") as handle:
            handle.write("built\n")
        return built(*args, **kwargs)

    hp._build_paper_setup = counting
    _setup(directory, standins)


def test_two_notebooks_started_at_once_build_the_setup_once(standins, tmp_path):
    directory, log = str(tmp_path / "shared" / "setup"), str(tmp_path / "builds.log")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_build_in_process, args=(directory, standins, log)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=300)
        assert worker.exitcode == 0
    assert Path(log).read_text().splitlines() == ["built"]
    setup = _setup(directory, standins)  # and a third call reuses it
    assert Path(setup.sft_model).is_dir() and setup.prompts.is_file()
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == [".setup.lock", "setup"]  # no temporaries left


def test_a_hub_reward_model_is_checked_against_its_sentencepiece_model_too(standins, tmp_path, monkeypatch, caplog):
    """The paper names the RM by hub id: its tokenizer.model comes from the hub cache (a Hugging Face cache
    layout, offline), so the repeated-spaces check runs as it does for a local dir; one not cached warns."""
    import logging
    import shutil

    import huggingface_hub.constants
    from transformers import AutoTokenizer

    from raftlib.text.rewards import check_against_sentencepiece

    repo = "weqweasdas/hh_rlhf_rm_open_llama_3b"
    commit = "0" * 40
    cache = tmp_path / "hub"
    snapshot = cache / "models--weqweasdas--hh_rlhf_rm_open_llama_3b" / "snapshots" / commit
    shutil.copytree(standins["reward_model"], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    tokenizer = AutoTokenizer.from_pretrained(standins["reward_model"])
    assert check_against_sentencepiece(tokenizer, repo) is not None  # it differs on runs of spaces, as a dir's does
    with caplog.at_level(logging.WARNING, "raftlib"):
        assert check_against_sentencepiece(tokenizer, "someone/not-cached-rm") is None
    assert "tokenizer.model could not be fetched" in caplog.text


def test_a_pickled_reward_model_is_converted_to_safetensors_once_and_scores_the_same(standins, tmp_path):
    """The stand-in ships only pytorch_model.bin, as the authors' RM does: the setup writes a safetensors copy
    (every stage then maps it), with the tokenizer.model the sentencepiece check reads; scores are unchanged."""
    from transformers import AutoTokenizer

    from raftlib.text.rewards import check_against_sentencepiece
    from raftsuite.hh_paper import formatted_reward_model, safetensors_reward_model

    source = standins["reward_model"]
    assert (source / "pytorch_model.bin").is_file() and not list(source.glob("*.safetensors"))
    converted = Path(safetensors_reward_model(str(source), tmp_path))
    assert converted == tmp_path / "reward_model"
    assert (converted / "model.safetensors").is_file() and not list(converted.glob("*.bin"))
    assert (converted / "tokenizer.model").read_bytes() == (source / "tokenizer.model").read_bytes()
    assert check_against_sentencepiece(AutoTokenizer.from_pretrained(converted), str(converted)) is not None
    prompts, completions = ["\n\nHuman: How do I make soup?\n\nAssistant:"] * 2, [" Boil water.", " Rain."]
    scores = [
        formatted_reward_model(str(m), formatter="open_llama_hh")(prompts, completions) for m in (source, converted)
    ]
    assert scores[0] == scores[1]
    assert safetensors_reward_model(str(converted), tmp_path / "again") == str(converted)  # mapped already: kept


def test_a_cut_prompt_keeps_the_bos_a_llama_tokenizer_starts_it_with(standins):
    """Truncation keeps the end of a long prompt (what the completion continues) and, first, the <s> the Llama
    tokenizer adds: the model never saw text without it."""
    from raftlib.config import ModelSection
    from raftlib.records import Prompt
    from raftlib.text.models import load_tokenizer
    from raftlib.text.prompts import encode_prompts

    tokenizer = load_tokenizer(ModelSection(path=str(standins["policy_model"])))
    text = "\n\nHuman: " + "how do I make soup with bread and rain " * 8 + "\n\nAssistant:"
    whole = tokenizer(text)["input_ids"]
    assert whole[0] == tokenizer.bos_token_id and len(whole) > 20
    [cut] = encode_prompts(tokenizer, [Prompt(0, text)], chat_template="never", max_prompt_tokens=20)
    assert cut == [tokenizer.bos_token_id, *whole[-19:]]


def test_a_causal_lm_bin_is_refused_not_converted_into_a_reward_model(tmp_path):
    """A causal LM's weights load as a sequence classifier with a random score head: converted and saved, that head
    would pass as trained, so the conversion refuses it as the reward model's own loader does."""
    import torch
    from transformers import AutoModelForCausalLM

    from raftlib import testing as T
    from raftlib.hub import ModelLoadError
    from raftsuite.hh_paper import safetensors_reward_model

    source = T.build_gpt2(tmp_path / "lm")
    model = AutoModelForCausalLM.from_pretrained(source)
    for weights in source.glob("*.safetensors"):
        weights.unlink()
    torch.save(model.state_dict(), source / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"lacks trained weights for score\.weight"):
        safetensors_reward_model(str(source), tmp_path / "setup")
