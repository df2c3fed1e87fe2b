"""Units of the experiment suite: the tiny-LM build steps, the HH pieces, the paper profile's data path."""

import json
import math

import pytest
import torch

from raftlib.records import Prompt
from raftsuite import ablations, hh, hh_paper, tinylm

PLAY = """HAMLET, PRINCE OF DENMARK

ACT I.

Scene I. Elsinore. A platform before the Castle.

[Francisco at his post. Enter to him Bernardo.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.

Ber.
Long live the king! [Aside] and all his
merry men of the watch.

First Clown.
Is she to be buried in Christian burial?
"""


def test_speeches_strip_tags_stage_directions_and_headings():
    assert tinylm.speeches(PLAY) == [
        "Nay, answer me: stand, and unfold yourself.",
        "Long live the king! and all his merry men of the watch.",
        "Is she to be buried in Christian burial?",
    ]  # "Who's there?" has 2 words: too short to be a training document


def test_heldout_split_is_deterministic_and_disjoint():
    docs = [f"speech number {i} of the play" for i in range(400)]
    train, heldout = tinylm.split_heldout(docs, 0.1)
    assert (train, heldout) == tinylm.split_heldout(list(docs), 0.1)
    assert set(train).isdisjoint(heldout) and len(train) + len(heldout) == 400
    assert 15 < len(heldout) < 70


def test_tokenizer_and_packing_on_a_small_text(tmp_path):
    docs = tinylm.speeches(PLAY) * 20
    tokenizer = tinylm.train_tokenizer(docs, vocab_size=300, directory=tmp_path / "tok")
    assert len(tokenizer) <= 300 and tokenizer.eos_token == tinylm.EOS and tokenizer.pad_token == tinylm.PAD
    text = "Long live the king!"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: lossless
    rows = tinylm.pack(tokenizer, docs, seq_len=16)
    assert rows.shape[1] == 16 and (rows == tokenizer.eos_token_id).sum() >= rows.numel() // 64
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "tok")(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_committed_tiny_lm_matches_its_build_record():
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(__file__).parent.parent / "assets" / "tiny-lm"
    record = json.loads((directory / "BUILD.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert sum(p.numel() for p in model.parameters()) == record["parameters"]
    assert len(tokenizer) == record["settings"]["vocab_size"]
    assert (directory / "model.safetensors").stat().st_size < 15 * 2**20
    assert 1 < record["heldout_perplexity"] < 200


def test_bradley_terry_loss_by_hand():
    loss = hh.bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    expected = (-math.log(1 / (1 + math.exp(-2.0))) - math.log(0.5)) / 2
    assert float(loss) == pytest.approx(expected)


def test_gold_reward_prefers_positive_varied_text():
    good, bad, repetitive, empty = hh.gold_reward(
        ["p"] * 4,
        [
            "she is a good and loving friend to me",
            "he is a cruel and hateful enemy to me",
            "good good good good good good",
            "",
        ],
    )
    assert good > bad and good > repetitive and good > empty
    assert hh.fluency("one two three four five six") == 0.0


def test_random_reward_is_deterministic_and_spread():
    a = hh.random_reward(["p"] * 50, [str(i) for i in range(50)])
    assert a == hh.random_reward(["p"] * 50, [str(i) for i in range(50)])
    assert 0.0 <= min(a) and max(a) < 1.0 and len(set(a)) == 50


def test_hh_dialogue_split_and_local_dataset(tmp_path):
    prompt, response = hh_paper.split_dialogue("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: more?\n\nAssistant: sure")
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: more?\n\nAssistant:" and response == " sure"
    with pytest.raises(ValueError, match="not an HH-RLHF dialogue"):
        hh_paper.split_dialogue("no dialogue")


def write_hh_dataset(directory, rows=12):
    """A local dir in the layout of Anthropic/hh-rlhf (a data dir with train/test JSONL of chosen/rejected
    dialogues; test dialogues differ from train ones, since evaluation drops prompts also in train)."""
    (directory / "helpful-base").mkdir(parents=True)
    for split in ("train", "test"):
        with open(directory / "helpful-base" / f"{split}.jsonl", "w") as handle:
            for i in range(rows):
                human = "the cat sat " * (1 if i % 4 else 40)  # every 4th prompt is too long and is dropped
                human += "" if split == "train" else "x"
                handle.write(json.dumps({
                    "chosen": f"\n\nHuman: {human}{i}\n\nAssistant: a kind answer {i}",
                    "rejected": f"\n\nHuman: {human}{i}\n\nAssistant: a rude answer {i}",
                }) + "\n")  # fmt: skip
    return directory


def test_paper_setup_runs_on_local_dirs_standing_in_for_hub_ids(tmp_path, gpt2_dir):
    dataset = write_hh_dataset(tmp_path / "hh-rlhf")
    setup = hh_paper.prepare_paper_setup(
        tmp_path / "setup", policy_model=str(gpt2_dir), dataset=str(dataset), reward_model=str(gpt2_dir),
        max_prompt_tokens=32, eval_prompts=5, progress=False, subset="helpful-base",
    )  # fmt: skip
    rows = [json.loads(line) for line in setup.prompts.read_text().splitlines()]
    # 3 of 12 prompts are over 32 tokens and dropped; the test split is then capped at 5
    assert setup.train_prompts == 9 and setup.eval_prompts == 5
    assert rows[0]["prompt"].endswith("\n\nAssistant:") and rows[0]["reference"] == "a kind answer 1"
    from transformers import AutoModelForCausalLM

    sft = AutoModelForCausalLM.from_pretrained(setup.sft_model)  # the SFT step ran and saved a loadable model
    base = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    assert any(
        not torch.equal(a, b) for a, b in zip(sft.state_dict().values(), base.state_dict().values(), strict=True)
    )


def test_trend_sentences_are_computed_from_numbers():
    import pandas as pd

    table = pd.DataFrame({"proxy_reward": [0.1, 0.2, 0.3], "gold_reward": [0.0, 0.0, 0.1]}, index=[8, 16, 32])
    assert "**reproduces**" in ablations.trend_sentence("K", table, ablations.PAPER["K"])
    falling = table.assign(proxy_reward=[0.3, 0.2, 0.1])
    assert "**does not reproduce**" in ablations.trend_sentence("K", falling, ablations.PAPER["K"])
    assert ablations.trend_word([0.1, 0.3, 0.2]) == "non-monotonic (first to last: rises)"
    assert "no numbers" in ablations.trend_sentence("K", table.set_axis([2, 4, 6]), ablations.PAPER["K"])


def test_evaluate_best_of_k_picks_the_proxy_argmax(gpt2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(gpt2_dir), AutoTokenizer.from_pretrained(gpt2_dir)
    tokenizer.pad_token = tokenizer.eos_token
    prompts = [Prompt(i, f"the cat {i}", {"reference": "sat on the mat."}) for i in range(4)]

    def count_a(prompts, completions, **columns):
        return [c.count("a") for c in completions]

    plain = hh.evaluate(model, tokenizer, prompts, count_a, max_new_tokens=8, samples_per_prompt=1)
    best = hh.evaluate(model, tokenizer, prompts, count_a, max_new_tokens=8, samples_per_prompt=1, best_of=6)
    assert best["proxy_reward"] >= plain["proxy_reward"]
    assert plain["perplexity"] == best["perplexity"] > 1.0


# ---- the efficiency experiment -------------------------------------------------------------------


def allocate_and_report(megabytes: int) -> int:
    """A child's job for the test below: hold `megabytes` of touched memory, then return."""
    block = bytearray(megabytes * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
    return len(block)


def test_a_child_reports_its_own_peak_memory_not_its_parents(tmp_path, monkeypatch):
    from pathlib import Path

    from raftsuite import efficiency

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))  # the child imports this module

    parent_ballast = bytearray(1200 * 2**20)
    parent_ballast[::4096] = b"y" * len(parent_ballast[::4096])
    small = efficiency.run_in_child(
        "test_suite_units:allocate_and_report", {"megabytes": 10}, tmp_path / "a.json", tmp_path / "a.log"
    )
    large = efficiency.run_in_child(
        "test_suite_units:allocate_and_report", {"megabytes": 300}, tmp_path / "b.json", tmp_path / "b.log"
    )
    assert small["result"] == 10 * 2**20
    assert (
        small["peak_rss_mib"] < 800
    )  # the child imports torch (~300 MiB), not the parent's 1.2 GiB ballast (ru_maxrss would)
    assert large["peak_rss_mib"] - small["peak_rss_mib"] == pytest.approx(290, abs=40)
    with pytest.raises(RuntimeError, match="failed in its process"):
        efficiency.run_in_child(
            "test_suite_units:allocate_and_report", {"megabytes": "ten"}, tmp_path / "c.json", tmp_path / "c.log"
        )


def allocate_by_rank(megabytes: int) -> int:
    """A worker's job under `accelerate launch`: rank r holds (r + 1) x `megabytes`, then returns its rank."""
    import os

    rank = int(os.environ["RANK"])
    allocate_and_report(megabytes * (rank + 1))
    return rank


def test_children_under_accelerate_launch_report_every_process_and_the_main_result(tmp_path, monkeypatch):
    from pathlib import Path

    from raftsuite import efficiency

    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    lines = []
    record = efficiency.run_in_child(
        "test_suite_units:allocate_by_rank", {"megabytes": 200}, tmp_path / "a.json", tmp_path / "a.log",
        num_processes=2, echo=lines.append,
    )  # fmt: skip
    assert record["result"] == 0  # the main process's return value
    assert record["processes"] == 2
    small, large = record["peak_rss_mib_per_process"]  # rank 0, rank 1
    assert large - small == pytest.approx(200, abs=40)
    assert record["peak_rss_mib"] == large
    assert lines and (tmp_path / "a.log").is_file()  # streamed, and kept


def test_comparison_finds_the_common_target_and_the_first_points_reaching_it():
    import pandas as pd

    from raftsuite import efficiency

    fast = pd.DataFrame({"samples": [0, 10, 20], "train_seconds": [0, 5, 10], "eval_reward": [0.0, 0.6, 0.9]})
    slow = pd.DataFrame(
        {"samples": [0, 10, 20, 30], "train_seconds": [0, 20, 40, 60], "eval_reward": [0.0, 0.2, 0.5, 0.7]}
    )
    target, table = efficiency.comparison({"fast": fast, "slow": slow}, {"fast": 100.0, "slow": 250.0})
    assert target == 0.7
    assert table.loc["fast", "seconds_to_target"] == 10 and table.loc["fast", "samples_to_target"] == 20
    assert table.loc["slow", "seconds_to_target"] == 60 and table.loc["slow", "samples_to_target"] == 30
    assert efficiency.first_reaching(slow, 0.95) is None


# ----------------------------------------------------------------------------------------------
# Issue 14: one prompt plan for every seed; the learning-rate sweep chooses on validation only
# ----------------------------------------------------------------------------------------------

OPENINGS = "notebooks/data/openings.jsonl"


def test_validation_prompts_never_overlap_the_held_out_prompts_nor_train():
    """The tiny sizes on the real openings: validation, held-out (curve) and fit prompts are disjoint and cover
    the file; the held-out prompts are the tiny setup's own held-out split (load_prompts, seed 0)."""
    from raftlib.config import DataSection
    from raftlib.data import load_prompts

    plan = hh.prompt_plan(OPENINGS, 64, 32)
    held_out, validation, fit = (hh.plan_prompts(plan, part) for part in ("curve", "validation", "fit"))
    texts = [{p.text for p in part} for part in (held_out, validation, fit)]
    assert [len(t) for t in texts] == [64, 32, 400 - 96]
    assert not texts[0] & texts[1] and not texts[0] & texts[2] and not texts[1] & texts[2]
    assert {p.text for p in load_prompts(DataSection(prompts=OPENINGS, eval_prompts=64), 0).eval} == texts[0]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_seed_prompts_file_makes_raftlib_hold_out_the_plan_for_any_seed(tmp_path, seed):
    from raftlib.config import DataSection
    from raftlib.data import load_prompts

    plan = hh.prompt_plan(OPENINGS, 20, 10)
    path = hh.seed_prompts_file(plan, seed, tmp_path)
    split = load_prompts(DataSection(prompts=str(path), eval_prompts=20), seed)
    assert {p.text for p in split.eval} == {p.text for p in hh.plan_prompts(plan, "curve")}
    assert {p.text for p in split.train} == {p.text for p in hh.plan_prompts(plan, "fit")}
    assert not {p.text for p in split.train + split.eval} & {p.text for p in hh.plan_prompts(plan, "validation")}
    assert hh.seed_prompts_file(plan, seed, tmp_path).read_text() == path.read_text()  # written once, reused


def test_prompt_plan_refuses_sizes_that_leave_nothing_to_train_on():
    with pytest.raises(ValueError, match="no training prompt"):
        hh.prompt_plan(OPENINGS, 300, 100)


def test_sweep_chooses_each_methods_best_validation_rate_first_on_ties():
    import pandas as pd

    from raftsuite import efficiency

    sweep = pd.DataFrame(
        {
            "method": ["raft", "raft", "raft", "grpo", "grpo", "grpo"],
            "learning_rate": [1e-4, 2e-4, 4e-4, 2e-5, 5e-5, 1e-4],
            "validation_reward": [0.3, 0.7, 0.5, 0.4, 0.4, 0.1],
        }
    )
    marked = efficiency.mark_chosen(sweep)
    assert marked["chosen"].tolist() == [False, True, False, True, False, False]
    assert efficiency.chosen_rates(marked) == {"raft": 2e-4, "grpo": 2e-5}


def test_method_runs_are_cached_per_setting_and_refuse_a_stale_record(tmp_path):
    from raftsuite import efficiency

    plan = hh.prompt_plan(OPENINGS, 20, 10)
    settings = efficiency.MethodSettings(sft_model="sft", reward_model="rm")
    root = efficiency.runs_root(tmp_path, settings, plan)
    assert root == efficiency.runs_root(tmp_path, settings, plan)
    assert root != efficiency.runs_root(
        tmp_path, efficiency.MethodSettings(sft_model="sft", reward_model="rm", iterations=2), plan
    )
    record = {"params": {"method": "raft", "learning_rate": 2e-4, "seed": 1}, "curve": [], "model_dir": "m"}
    (root / "raft_lr0.0002_seed1.json").write_text(json.dumps(record))
    assert efficiency.method_run(root, settings, plan, "raft", 2e-4, 1) == record  # read back, nothing run
    (root / "grpo_lr1e-05_seed0.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="delete it to recompute"):
        efficiency.method_run(root, settings, plan, "grpo", 1e-5, 0)
    with pytest.raises(ValueError, match="method 'ppo'"):
        efficiency.method_run(root, settings, plan, "ppo", 1e-5, 0)


SHARED_RUN_PARAMETERS = (
    "eval_prompts", "validation_prompts", "samples_per_prompt", "temperature", "max_new_tokens",
    "prompts_per_iteration", "iterations", "learning_rates", "grpo_learning_rates", "epochs", "micro_batch_size",
    "eval_samples_per_prompt", "grpo_prompts_per_step", "grpo_eval_every_steps", "grpo_gradient_accumulation_steps",
    "policy_dtype", "reward_dtype", "mixed_precision", "lora_rank", "gradient_checkpointing", "generation_backend",
    "prompts_per_batch", "reward_batch_size", "num_processes", "accelerate_config", "setup_samples_per_prompt",
    "rm_epochs", "base_model", "openings",
)  # fmt: skip
"""What `efficiency.MethodSettings`, the prompt plan and the sweep are built from in both notebooks."""


@pytest.mark.parametrize("profile", ["tiny", "smoke"])
def test_hh_rlhf_and_efficiency_share_one_sweep_and_one_set_of_runs(profile):
    """Equal values give one runs/PROFILE/method_runs/<hash> directory: the sweep is computed once, used twice."""
    from raftsuite import runner

    entries = runner.load_profile(profile)

    def values(name):
        defaults = runner.notebook_parameters(name)
        return {key: entries.get(name, {}).get(key, defaults[key]) for key in SHARED_RUN_PARAMETERS}

    assert values("hh_rlhf") == values("efficiency")
    assert len(values("hh_rlhf")["learning_rates"]) >= (3 if profile == "tiny" else 1)
    assert len(values("hh_rlhf")["grpo_learning_rates"]) == len(values("hh_rlhf")["learning_rates"])
