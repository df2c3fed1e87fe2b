"""Units of the experiment suite: the tiny-LM build steps, the HH pieces, the paper profile's data path."""

import json
import math

import pandas as pd
import pytest
import torch

from raftlib import testing
from raftsuite import ablations, hh, hh_paper, hh_table3, tinylm

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
                handle.write(
                    json.dumps(
                        {
                            "chosen": f"\n\nHuman: {human}{i}\n\nAssistant: a kind answer {i}",
                            "rejected": f"\n\nHuman: {human}{i}\n\nAssistant: a rude answer {i}",
                        }
                    )
                    + "\n"
                )
    return directory


def test_paper_setup_runs_on_local_dirs_standing_in_for_hub_ids(tmp_path, gpt2_dir):
    dataset = write_hh_dataset(tmp_path / "hh-rlhf")
    request = hh_paper.PaperSetupRequest(
        policy_model=str(gpt2_dir),
        dataset=str(dataset),
        reward_model=str(gpt2_dir),
        max_prompt_tokens=32,
        eval_prompts=5,
        subset="helpful-base",
    )
    setup = hh_paper.prepare_paper_setup(tmp_path / "setup", request, progress=False)
    rows = [json.loads(line) for line in setup.prompts.read_text().splitlines()]
    # 3 of 12 prompts are over 32 tokens and dropped; the test split is then capped at 5
    assert setup.train_prompts == 9 and setup.eval_prompts == 5
    assert rows[0]["prompt"].endswith("\n\nAssistant:") and rows[0]["reference"] == " a kind answer 1"
    from transformers import AutoModelForCausalLM

    sft = AutoModelForCausalLM.from_pretrained(setup.sft_model)  # the SFT step ran and saved a loadable model
    base = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    assert any(
        not torch.equal(a, b) for a, b in zip(sft.state_dict().values(), base.state_dict().values(), strict=True)
    )


# ---- the ablations' verdicts ---------------------------------------------------------------------


def _k_sweep() -> pd.DataFrame:
    """K = 4 (not in the paper's Table 5), 8 and 32 over 3 seeds; K 8 -> 32 by seed: +0.30, +0.31, +0.32."""
    per_seed = {4: [0.5, 1.5, 2.5], 8: [0.0, 1.0, 2.0], 32: [0.30, 1.31, 2.32]}
    return pd.DataFrame(
        [{"K": k, "seed": s, "run": f"K{k}", "proxy_reward": v} for k, vs in per_seed.items() for s, v in enumerate(vs)]
    )


def test_sweep_changes_are_paired_t_intervals_with_verdicts_where_the_paper_has_values():
    from raftsuite import stats

    table = ablations.changes(_k_sweep(), "K", "proxy_reward", ablations.PAPER["K"])
    assert list(table.index) == ["K 4 → 32", "K 4 → 8", "K 8 → 32"]
    assert table.loc["K 4 → 8", "verdict"] == "no paper value" and pd.isna(table.loc["K 4 → 8", "direction"])
    change = table.loc["K 8 → 32"]
    half = 4.302653 * 0.01 / math.sqrt(3)  # t(0.975, df 2) x sd 0.01 / sqrt(3 seeds)
    assert change["t"].as_tuple() == pytest.approx((0.31, 0.31 - half, 0.31 + half)) and change["n_seeds"] == 3
    assert change["ours"] == "0.310 [0.285, 0.335]" and change["direction"] == "up"
    assert change["paper_change"] == pytest.approx(2.329 - 2.180) and change["verdict"] == stats.REPRODUCES
    same = ablations.changes(_k_sweep(), "K", "proxy_reward", ablations.PAPER["K"], identical={(8, 32)})
    assert same.loc["K 8 → 32", "verdict"] == stats.IDENTICAL


def test_only_changes_with_a_paper_direction_become_claims():
    from raftsuite import stats

    table = ablations.changes(_k_sweep(), "K", "proxy_reward", ablations.PAPER["K"])
    claims = ablations.claims("Table 5", table, "proxy_reward", primary="K 8 → 32")
    rows = [c.row() for c in claims]  # what report.write_claims stores
    assert [(c.claim, c.paper, c.direction, c.primary) for c in claims] == [
        ("K 8 → 32, proxy reward", "+0.149", "up", True)
    ]
    assert rows[0]["ours"] == "0.310 [0.285, 0.335]" and rows[0]["verdict"] == stats.REPRODUCES


# ---- Table 3 -------------------------------------------------------------------------------------


def _row(prompt_id, sample_index, reward, completion="a b", gold=None):
    return {
        "prompt_id": prompt_id,
        "sample_index": sample_index,
        "reward": reward,
        "completion": completion,
        "reward/gold": gold,
    }


def test_best_of_keeps_the_proxy_argmax_of_each_group_of_k_samples():
    rows = [_row(7, 3, 0.9), _row(7, 0, 0.1), _row(2, 1, None), _row(7, 2, 0.2), _row(2, 0, -5.0), _row(7, 1, 0.5)]
    assert hh_table3.best_of(rows, 1) == rows
    # prompt 7: groups (0, 1) and (2, 3) by sample index, whatever the row order; prompt 2: an unscored sample
    # (reward None) is never picked over a scored one, however low its reward
    picked = [(r["prompt_id"], r["sample_index"]) for r in hh_table3.best_of(rows, 2)]
    assert picked == [(7, 1), (7, 3), (2, 0)]
    assert [(r["prompt_id"], r["sample_index"]) for r in hh_table3.best_of(rows, 4)] == [(7, 3), (2, 0)]


def test_table3_columns_and_per_prompt_rows_by_hand():
    rows = [_row(0, 0, 1.0, "The cat sat", 0.5), _row(0, 1, None, "the dog", -0.5), _row(1, 0, 3.0, "a cat", 1.0)]
    columns = hh_table3.columns(rows, perplexity=12.5)
    assert columns["proxy_reward"] == pytest.approx(2.0)  # the unscored sample is left out, not counted as 0
    assert columns["gold_reward"] == pytest.approx(1 / 3) and columns["perplexity"] == 12.5
    assert columns["distinct_1"] == pytest.approx(5 / 7)  # the cat sat | the dog | a cat: 5 distinct of 7 words
    assert columns["distinct_2"] == pytest.approx(4 / 4) and columns["length_words"] == pytest.approx(7 / 3)
    assert math.isnan(columns["msttr_100"])  # fewer than 100 words: no segment
    assert math.isnan(hh_table3.columns([_row(0, 0, 1.0)], 1.0)["gold_reward"])  # no gold column (HH data)
    per_prompt = hh_table3.per_prompt(rows, "RAFT", seed=3)
    assert [(r["prompt"], r["proxy_reward"], r["length_words"]) for r in per_prompt] == [(0, 1.0, 2.5), (1, 3.0, 2.0)]
    assert per_prompt[0]["gold_reward"] == pytest.approx(0.0) and {r["method"] for r in per_prompt} == {"RAFT"}


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A tiny GPT-2 sequence classifier, read raw: the proxy reward of the end-to-end tests below."""
    return testing.build_gpt2_reward_model(tmp_path_factory.mktemp("rm"))


def tiny_settings(policy, reward_model, **overrides):
    from raftsuite import hh_methods

    values = {
        "sft_model": str(policy),
        "reward_model": str(reward_model),
        "iterations": 1,
        "prompts_per_iteration": 4,
        "samples_per_prompt": 2,
        "max_new_tokens": 6,
        "prompts_per_batch": 4,
        "micro_batch_size": 4,
        "epochs": 1,
        "eval_samples_per_prompt": 2,
        "reward_batch_size": 8,
    }
    return hh_methods.MethodSettings(**(values | overrides))


def test_table3_of_tiny_models_is_raftlibs_evaluation_and_is_cached_per_seed(
    gpt2_dir, reward_model_dir, prompts_file, tmp_path
):
    from raftlib.evaluation import evaluate_policy
    from raftsuite import hh_methods

    settings = tiny_settings(gpt2_dir, reward_model_dir)
    held_out = hh.plan_prompts(hh.prompt_plan(prompts_file, 4, 4), "curve")
    table = hh_table3.Table3(
        settings,
        held_out,
        shared={"SFT": {"path": str(gpt2_dir)}, "best-of-3": {"path": str(gpt2_dir), "best_of": 3}},
        trained={"RAFT": {0: {"path": str(gpt2_dir), "extra": {"learning_rate": 1e-3}}}},
    )
    rows, prompts = hh_table3.evaluate_seeds(table, [0], tmp_path / "table3")
    by_method = rows.set_index("method")
    assert list(by_method.index) == ["SFT", "best-of-3", "RAFT"] and set(rows["seed"]) == {0}
    # the same model, seed and prompts: the same row, whichever label (and the trained entry's extra column)
    same = ["proxy_reward", "gold_reward", "perplexity", "distinct_2"]
    assert by_method.loc["RAFT", same].tolist() == by_method.loc["SFT", same].tolist()
    assert by_method.loc["RAFT", "learning_rate"] == 1e-3 and math.isnan(by_method.loc["SFT", "learning_rate"])
    assert 1 < by_method.loc["SFT", "perplexity"] == by_method.loc["best-of-3", "perplexity"]
    # best-of-3: raftlib's evaluation with 2 x 3 samples per prompt, the proxy's pick of each 3
    model, _ = hh.load_causal_lm(gpt2_dir)
    config = hh_methods.evaluation_config(settings, 0, samples_per_prompt=6)
    drawn = evaluate_policy(model, config, held_out, reward=hh_methods.evaluation_reward(settings)).rows
    picked = hh_table3.best_of(drawn, 3)
    assert len(drawn) == 6 * len(held_out) and len(picked) == 2 * len(held_out)
    assert by_method.loc["best-of-3", "proxy_reward"] == pytest.approx(sum(r["reward"] for r in picked) / len(picked))
    assert all(r["reward/gold"] is not None for r in drawn)  # the tiny setting's gold, beside the proxy
    assert len(prompts) == 3 * len(held_out) and set(prompts["prompt"]) == {p.prompt_id for p in held_out}
    # the seed's rows are cached by their parameters: read back as they are; another model set recomputes
    record = tmp_path / "table3" / "seed_0.json"
    written = record.stat().st_mtime_ns
    again, _ = hh_table3.evaluate_seeds(table, [0], tmp_path / "table3")
    assert record.stat().st_mtime_ns == written
    pd.testing.assert_frame_equal(again, rows)
    fewer = hh_table3.Table3(settings, held_out, shared={"SFT": {"path": str(gpt2_dir)}}, trained={})
    assert list(hh_table3.evaluate_seeds(fewer, [0], tmp_path / "table3")[0]["method"]) == ["SFT"]


# ---- a method run in its own process: raftsuite.children and raftsuite.launch --------------------

JOBS = '''
import os


def allocate(megabytes):
    """Hold `megabytes` of touched memory, then return its size."""
    block = bytearray(megabytes * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
    return len(block)


def allocate_by_rank(megabytes):
    """Under `accelerate launch`: rank r holds (r + 1) x `megabytes`, then returns its rank."""
    rank = int(os.environ["RANK"])
    allocate(megabytes * (rank + 1))
    return rank


def rank_variable():
    return os.environ.get("RANK")
'''
"""The children's jobs, written where the child imports them from (PYTHONPATH), light: no torch imported."""


@pytest.fixture
def jobs(tmp_path, monkeypatch):
    (tmp_path / "memory_jobs.py").write_text(JOBS)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return tmp_path


def test_a_child_reports_its_own_peak_memory_not_its_parents(jobs, monkeypatch):
    from raftsuite import children
    from raftsuite.launch import LaunchError

    parent_ballast = bytearray(1200 * 2**20)
    parent_ballast[::4096] = b"y" * len(parent_ballast[::4096])
    monkeypatch.setenv("RANK", "1")  # a kernel started under a launcher: its plain child is still rank 0
    small = children.run_in_child("memory_jobs:allocate", {"megabytes": 10}, jobs / "a.json", jobs / "a.log")
    large = children.run_in_child("memory_jobs:allocate", {"megabytes": 300}, jobs / "b.json", jobs / "b.log")
    assert small["result"] == 10 * 2**20 and (small["processes"], small["peak_cuda_mib"]) == (1, None)
    # the child's own high-water mark (VmHWM), not the parent's 1.2 GiB ballast (ru_maxrss would carry it over)
    assert small["peak_rss_mib"] < 600 and small["peak_rss_mib_per_process"] == [small["peak_rss_mib"]]
    assert large["peak_rss_mib"] - small["peak_rss_mib"] == pytest.approx(290, abs=40)
    assert small["process_seconds"] > 0 and "$ " in (jobs / "a.log").read_text()  # the command, logged
    assert children.run_in_child("memory_jobs:rank_variable", {}, jobs / "c.json", jobs / "c.log")["result"] is None
    with pytest.raises(LaunchError, match=r"(?s)exited with status 1.*TypeError"):
        children.run_in_child("memory_jobs:allocate", {"megabytes": "ten"}, jobs / "d.json", jobs / "d.log")
    del parent_ballast


def test_children_under_accelerate_launch_report_every_process_and_the_main_result(jobs):
    from raftsuite import children

    lines = []
    record = children.run_in_child(
        "memory_jobs:allocate_by_rank",
        {"megabytes": 200},
        jobs / "a.json",
        jobs / "a.log",
        num_processes=2,
        echo=lines.append,
    )
    assert record["result"] == 0  # the main process's return value
    assert record["processes"] == 2
    small, large = record["peak_rss_mib_per_process"]  # rank 0, rank 1
    assert large - small == pytest.approx(200, abs=40)
    assert record["peak_rss_mib"] == large
    assert lines[0] == f"log: {jobs / 'a.log'}\n" and (jobs / "a.log").is_file()  # streamed, and kept


def test_the_notebook_echo_shows_progress_and_problems_only(capsys):
    from raftsuite import launch

    for line in (
        "log: runs/x.log\n",
        "00:01:02 INFO raftlib: iter 2/6 | reward 0.41 | 3.0s\n",
        "GRPO step 4/12 | eval reward 0.300 | 1.0s training\n",
        "Loading weights: 100%|####| 28/28\n",
        "Traceback (most recent call last):\n",
        "ValueError: bad\n",
        "{'loss': 0.1}\n",
    ):
        launch.progress_echo(line)
    assert capsys.readouterr().out.splitlines() == [
        "log: runs/x.log",
        "00:01:02 INFO raftlib: iter 2/6 | reward 0.41 | 3.0s",
        "GRPO step 4/12 | eval reward 0.300 | 1.0s training",
        "Traceback (most recent call last):",
        "ValueError: bad",
    ]
    stopped = launch.Interrupted("stopped; its log: x.log")
    assert isinstance(stopped, KeyboardInterrupt) and stopped._render_traceback_() == [
        "Interrupted: stopped; its log: x.log"
    ]


CHILD_WITH_A_GRANDCHILD = """
import subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
print(f"grandchild {grandchild.pid}", flush=True)
print("iter 1/3 | ready", flush=True)
time.sleep(300)
"""


def test_an_interrupt_stops_the_child_and_everything_it_started(tmp_path):
    """Jupyter's stop button (SIGINT in the kernel) while a child streams: the child and its own children are
    stopped, and one `Interrupted` names the log."""
    import os
    import signal
    import sys

    import psutil

    from raftsuite import launch

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    lines, started = [], []

    def echo(line):
        lines.append(line)
        if line.startswith("grandchild "):
            started.append(int(line.split()[1]))
        if "ready" in line:
            os.kill(os.getpid(), signal.SIGINT)

    try:
        with pytest.raises(launch.Interrupted, match=r"stopped; its log: .*child\.log"):
            launch.stream(
                [sys.executable, "-c", CHILD_WITH_A_GRANDCHILD], dict(os.environ), tmp_path / "child.log", echo
            )
    finally:
        signal.signal(signal.SIGINT, previous)
    (grandchild,) = started

    def gone(pid):
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    assert gone(grandchild)
    assert "iter 1/3 | ready" in (tmp_path / "child.log").read_text()


# ---- the efficiency comparison -------------------------------------------------------------------

FAST = {"samples": [0, 10, 20], "train_seconds": [0, 5, 10], "eval_reward": [0.0, 0.6, 0.9]}
SLOW = {"samples": [0, 10, 20, 30], "train_seconds": [0, 20, 40, 60], "eval_reward": [0.0, 0.2, 0.5, 0.7]}


def test_the_common_target_is_half_the_smaller_gain_and_both_curves_reach_it():
    from raftsuite import efficiency

    curves = {"fast": pd.DataFrame(FAST), "slow": pd.DataFrame(SLOW)}
    # start 0 (both), gains 0.9 and 0.7: 0 + 0.5 x 0.7, not 0.7 (that would be slow's last point by construction)
    assert efficiency.target_reward(curves) == pytest.approx(0.35)
    assert efficiency.target_reward(curves, share=1.0) == pytest.approx(0.7)
    target, table = efficiency.comparison(curves, {"fast": 100.0, "slow": 250.0})
    assert target == pytest.approx(0.35)
    assert table.loc["fast", ["seconds_to_target", "samples_to_target"]].tolist() == [5, 10]
    assert table.loc["slow", ["seconds_to_target", "samples_to_target"]].tolist() == [40, 20]
    assert not table["censored"].any() and table.loc["slow", "best_reward"] == 0.7
    # the areas over the common spans: 10 s (fast's whole run) and 20 completions, trapezoids by hand
    assert table.loc["fast", "mean_reward_over_time"] == pytest.approx((0.3 * 5 + 0.75 * 5) / 10)
    assert table.loc["slow", "mean_reward_over_time"] == pytest.approx(0.05)  # 0 -> 0.1 (interpolated at 10 s)
    assert table.loc["fast", "mean_reward_over_samples"] == pytest.approx((3 + 7.5) / 20)
    assert table.loc["slow", "mean_reward_over_samples"] == pytest.approx((1 + 3.5) / 20)
    row = efficiency.seed_row(3, table, target, "fast", "slow")
    assert (row["seed"], row["time_ratio"], row["samples_ratio"], row["memory_ratio"]) == pytest.approx(
        (3, 5 / 40, 10 / 20, 0.4)
    )
    assert row["area_difference_time"] == pytest.approx(0.525 - 0.05)
    assert not row["raft_censored"] and not row["grpo_censored"]


def test_a_method_that_never_reaches_the_target_is_censored_at_its_budget():
    from raftsuite import efficiency

    # the two starts differ (0.0 and 0.6): start 0.3; flat's gain is 0.1 - 0.3 < 0, so the target 0.2 is above
    # everything flat reached: its time is its whole budget, a lower bound, and flagged
    flat = pd.DataFrame({"samples": [0, 8, 16], "train_seconds": [0, 4, 8], "eval_reward": [0.0, 0.1, 0.05]})
    high = pd.DataFrame({"samples": [0, 8, 16], "train_seconds": [0, 3, 6], "eval_reward": [0.6, 0.8, 1.0]})
    target, table = efficiency.comparison({"flat": flat, "high": high}, {"flat": 1.0, "high": 1.0})
    assert target == pytest.approx(0.2)
    assert table.loc["flat", ["censored", "seconds_to_target", "samples_to_target"]].tolist() == [True, 8, 16]
    assert table.loc["high", ["censored", "seconds_to_target", "samples_to_target"]].tolist() == [False, 0, 0]
    row = efficiency.seed_row(0, table, target, "flat", "high")
    assert row["raft_censored"] and not row["grpo_censored"]
    assert math.isnan(row["time_ratio"]) and math.isnan(row["samples_ratio"])  # reached at the start: no ratio
    assert efficiency.first_reaching(flat, 0.2) is None


def test_mean_reward_over_a_horizon_by_hand():
    from raftsuite import efficiency

    curve = pd.DataFrame(FAST)
    assert efficiency.mean_reward_over(curve, "samples", 15) == pytest.approx((3 + (0.6 + 0.75) / 2 * 5) / 15)
    assert efficiency.mean_reward_over(curve, "samples", 30) == pytest.approx((3 + 7.5 + 9) / 30)  # held at 0.9
    assert efficiency.mean_reward_over(curve, "samples", 0) == 0.0


def test_efficiency_claims_are_geometric_mean_ratios_and_count_censored_seeds():
    from raftsuite import efficiency, stats

    per_seed = pd.DataFrame(
        {
            "seed": [0, 1, 2],
            "time_ratio": [0.5, 0.25, math.nan],
            "samples_ratio": [2.0, 2.0, 2.0],
            "memory_ratio": [0.5, 0.5, 0.5],
            "area_difference_time": [0.1, 0.2, 0.3],
            "area_difference_samples": [0.0, 0.0, 0.0],
            "raft_censored": [False, False, True],
            "grpo_censored": [False, False, False],
        }
    )
    claims, table = efficiency.claims(per_seed)
    by_label = {c.claim: c for c in claims}
    time = by_label["training time to the common target, RAFT / GRPO"]
    assert time.primary and [c.primary for c in claims].count(True) == 1 and time.direction == "down"
    assert time.interval.mean == pytest.approx(math.sqrt(0.5 * 0.25)) and time.interval.n == 2  # the NaN seed left out
    assert by_label["completions to the common target, RAFT / GRPO"].row()["verdict"] == stats.OPPOSITE  # 2x, no spread
    assert by_label["peak resident memory, RAFT / GRPO"].row()["verdict"] == stats.REPRODUCES
    area = by_label["mean held-out reward over the common training time, RAFT − GRPO"].interval
    assert area.as_tuple() == pytest.approx(
        (0.2, 0.2 - 4.302653 * 0.1 / math.sqrt(3), 0.2 + 4.302653 * 0.1 / math.sqrt(3))
    )
    first = table.set_index("measure").iloc[0]
    assert (first["seeds without a value"], first["RAFT censored"], first["GRPO censored"]) == (1, 1, 0)


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


def _sweep(rows):
    return pd.DataFrame(rows, columns=["method", "learning_rate", "validation_reward"])


def test_sweep_chooses_each_methods_best_validation_rate_lowest_on_ties():
    from raftsuite import sweeps

    sweep = _sweep(
        [
            ("raft", 1e-4, 0.3),
            ("raft", 4e-4, 0.5),
            ("raft", 2e-4, 0.7),
            ("grpo", 1e-4, 0.1),
            ("grpo", 5e-5, 0.4),
            ("grpo", 2e-5, 0.4),
        ]
    )
    marked = sweeps.mark_chosen(sweep)
    chosen = marked.set_index(["method", "learning_rate"])["chosen"]
    assert chosen[chosen].index.tolist() == [("grpo", 2e-5), ("raft", 2e-4)]  # the tie 0.4 / 0.4 keeps 2e-5
    assert sweeps.chosen_rates(marked) == {"raft": 2e-4, "grpo": 2e-5}
    assert marked.groupby("method")["interior"].first().to_dict() == {"grpo": False, "raft": True}
    assert marked["learning_rate"].tolist() == [2e-5, 5e-5, 1e-4, 1e-4, 2e-4, 4e-4]  # by method, then rate


def test_a_grid_is_extended_past_the_end_its_choice_sits_on():
    from raftsuite import sweeps

    marked = sweeps.mark_chosen(
        _sweep(
            [
                ("low", 1e-4, 0.9),
                ("low", 2e-4, 0.5),
                ("high", 1e-4, 0.1),
                ("high", 2e-4, 0.5),
                ("mid", 1e-4, 0.1),
                ("mid", 2e-4, 0.5),
                ("mid", 4e-4, 0.2),
                ("one", 3e-4, 0.0),
            ]
        )
    )
    assert sweeps.extend_grid(marked, "low") == pytest.approx([5e-5, 1e-4, 2e-4])
    assert sweeps.extend_grid(marked, "high") == pytest.approx([1e-4, 2e-4, 4e-4])
    assert sweeps.extend_grid(marked, "high", factor=10) == pytest.approx([1e-4, 2e-4, 2e-3])
    assert sweeps.extend_grid(marked, "mid") is None  # interior: nothing to extend
    assert sweeps.extend_grid(marked, "one") is None  # one fixed rate: no choice was made


def test_an_inadmissible_rate_is_never_chosen_and_the_best_admissible_one_below_it_is_interior():
    from raftsuite import sweeps

    # reward keeps rising with the rate, but past 4e-4 the run breaks the constraint (say, perplexity)
    def score(method, rate):
        return {"validation_reward": rate, "admissible": rate <= 4e-4 if method == "raft" else False}

    sweep = sweeps.sweep_until_interior({"raft": [1e-4, 2e-4], "grpo": [1e-4, 2e-4]}, score, max_extensions=4)
    rates = sweep.groupby("method")["learning_rate"].apply(list).to_dict()
    assert rates["raft"] == pytest.approx([1e-4, 2e-4, 4e-4, 8e-4])  # 8e-4 was tried, rejected, so 4e-4 is inside
    assert sweeps.chosen_rates(sweep)["raft"] == pytest.approx(4e-4)
    assert sweep[sweep["method"] == "raft"]["interior"].all()
    # no rate admissible: the lowest is taken and the grid grows downwards, one halving per extension
    assert rates["grpo"] == pytest.approx([6.25e-6, 1.25e-5, 2.5e-5, 5e-5, 1e-4, 2e-4])
    assert sweeps.chosen_rates(sweep)["grpo"] == pytest.approx(6.25e-6)
    assert not sweep[sweep["method"] == "grpo"]["interior"].any()


def test_sweep_until_interior_extends_each_grid_until_its_choice_is_interior():
    from raftsuite import sweeps

    peaks = {"raft": 1.6e-3, "grpo": 2e-5}
    scored = []

    def score(method, rate):
        scored.append((method, rate))
        return {"validation_reward": -(math.log2(rate / peaks[method]) ** 2), "seconds": 1.0}

    sweep = sweeps.sweep_until_interior({"raft": [1e-4, 2e-4, 4e-4], "grpo": [2e-5, 5e-5, 1e-4]}, score)
    # raft: 4e-4 -> 8e-4 -> 1.6e-3 -> 3.2e-3 (three extensions, the last making 1.6e-3 interior); grpo: 1e-5 once
    rates = sweep.groupby("method")["learning_rate"].apply(list).to_dict()
    assert rates["raft"] == pytest.approx([1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3, 3.2e-3])
    assert rates["grpo"] == pytest.approx([1e-5, 2e-5, 5e-5, 1e-4])
    assert sweeps.chosen_rates(sweep) == pytest.approx({"raft": 1.6e-3, "grpo": 2e-5})
    assert sweep["interior"].all() and "seconds" in sweep  # the score's other columns are kept
    assert set(scored) == set(zip(sweep["method"], sweep["learning_rate"], strict=True))  # every row was scored

    far = sweeps.sweep_until_interior({"raft": [1e-4, 2e-4]}, lambda m, r: {"validation_reward": r}, max_extensions=2)
    assert far["learning_rate"].tolist() == pytest.approx([1e-4, 2e-4, 4e-4, 8e-4])  # two added, still at an end
    assert not far["interior"].any() and sweeps.chosen_rates(far) == pytest.approx({"raft": 8e-4})
    one = sweeps.sweep_until_interior({"grpo": [5e-5]}, lambda m, r: {"validation_reward": 0.0})
    assert one["learning_rate"].tolist() == [5e-5] and one["chosen"].all() and not one["interior"].any()
    with pytest.raises(ValueError, match="no learning rates for raft"):
        sweeps.learning_rate_sweep({"raft": []}, score)


# ---- the result cache and the method runs ----------------------------------------------------------


def test_a_cached_result_is_reused_only_with_the_same_parameters(tmp_path, caplog):
    import logging

    from raftsuite import cache

    calls = []

    def compute(value):
        calls.append(value)
        return {"value": value, "path": tmp_path}

    path = tmp_path / "stage" / "result.json"
    first = cache.cached(path, {"model": tmp_path / "m", "sizes": (1, 2)}, lambda: compute(1))
    assert first == {"value": 1, "path": str(tmp_path)} and calls == [1]  # as it reads back: paths as text
    assert cache.cached(path, {"model": str(tmp_path / "m"), "sizes": [1, 2]}, lambda: compute(2)) == first
    assert calls == [1]  # the same parameters as JSON: read back, not recomputed
    with caplog.at_level(logging.INFO, logger="raftsuite.cache"):
        second = cache.cached(path, {"model": "other", "sizes": [1, 2]}, lambda: compute(3))
    assert second["value"] == 3 and calls == [1, 3] and "other parameters (model)" in caplog.text
    with pytest.raises(ZeroDivisionError):
        cache.cached(tmp_path / "failed.json", {}, lambda: 1 / 0)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["result.json"]  # no half-written file


def test_method_settings_runs_and_configs():
    from raftlib import RAFTConfig
    from raftsuite import hh_methods
    from raftsuite.hh_methods import MethodRun, MethodSettings

    with pytest.raises(ValueError, match="method 'ppo'"):
        MethodRun("ppo", 1e-5, 0)
    assert MethodRun("raft", 2e-4, 1).name == "raft_lr0.0002_seed1"
    settings = MethodSettings(sft_model="sft", reward_model="rm", iterations=3, prompts_per_iteration=4)
    assert settings.budget == 3 * 4 * 8
    raw = hh_methods.raft_config(settings, "p.jsonl", 5, MethodRun("raft", 2e-4, 1), "out")
    config = RAFTConfig.from_dict(raw)  # a valid raftlib config
    assert (config.reward.fn, config.reward.args["path"]) == ("reward_model", "rm")
    assert (config.seed, config.training.learning_rate, config.data.eval_prompts) == (1, 2e-4, 5)
    assert config.model.lora is None and config.selection.kl_coef == 0.0
    control = RAFTConfig.from_dict(hh_methods.raft_config(settings, "p.jsonl", 5, MethodRun("random", 2e-4, 1), "o"))
    assert control.reward.fn == "raftsuite.hh:random_reward"
    assert control.replace(["reward.fn=reward_model", "reward.args={path: rm, batch_size: 64}", "output_dir=out"]) == (
        config
    )  # the control differs from RAFT in its reward only
    lora = hh_methods.raft_config(MethodSettings("sft", "rm", lora_rank=4), "p", 5, MethodRun("raft", 1e-4, 0), "o")
    assert (RAFTConfig.from_dict(lora).model.lora.r, RAFTConfig.from_dict(lora).model.lora.alpha) == (4, 8)
    formatted = RAFTConfig.from_dict(
        hh_methods.raft_config(
            MethodSettings("sft", "rm", reward_formatter="open_llama_hh"), "p", 5, MethodRun("raft", 1e-4, 0), "o"
        )
    )
    assert formatted.reward.fn == "raftsuite.hh_paper:formatted_reward_model"
    evaluation = hh_methods.evaluation_config(settings, seed=4)
    assert (evaluation.model.path, evaluation.seed, evaluation.loop.eval_samples_per_prompt) == ("sft", 4, 2)
    assert hh_methods.evaluation_config(settings, 4, samples_per_prompt=6).loop.eval_samples_per_prompt == 6


def test_runs_root_is_one_directory_per_settings_and_plan(tmp_path):
    from raftsuite import hh_methods
    from raftsuite.hh_methods import MethodSettings

    plan = hh.prompt_plan(OPENINGS, 20, 10)
    settings = MethodSettings(sft_model="sft", reward_model="rm")
    root = hh_methods.runs_root(tmp_path, settings, plan)
    assert root.parent == tmp_path / "method_runs" and root == hh_methods.runs_root(tmp_path, settings, plan)
    assert json.loads((root / "settings.json").read_text())["settings"]["iterations"] == 6
    assert root != hh_methods.runs_root(
        tmp_path, MethodSettings(sft_model="sft", reward_model="rm", iterations=2), plan
    )
    assert root != hh_methods.runs_root(tmp_path, settings, hh.prompt_plan(OPENINGS, 20, 11))


def test_a_method_run_is_made_once_in_its_own_process_and_chosen_on_validation(
    gpt2_dir, reward_model_dir, prompts_file, tmp_path
):
    """One real RAFT run of the tiny models in a child: its record (curve, memory, model) is made once; a stale
    record (other settings) is recomputed, never read; the sweep over one rate reads the same run back."""
    from dataclasses import asdict

    from raftsuite import hh_methods
    from raftsuite.hh_methods import MethodRun

    settings = tiny_settings(gpt2_dir, reward_model_dir)
    plan = hh.prompt_plan(prompts_file, 4, 4)
    root = hh_methods.runs_root(tmp_path / "runs", settings, plan)
    run = MethodRun("raft", 1e-3, 0)
    stale = {"run": asdict(run), "settings": asdict(settings) | {"iterations": 9}, "plan": asdict(plan)}
    (root / f"{run.name}.json").write_text(json.dumps({"params": stale, "result": {"curve": "stale"}}))

    record = hh_methods.method_run(root, settings, plan, run, link=tmp_path / "work" / "raft")
    assert [(p["step"], p["samples"]) for p in record["curve"]] == [(0, 0), (1, 4 * 2)]  # iteration 0 is the start
    assert record["curve"][1]["train_seconds"] > 0 and all(math.isfinite(p["eval_reward"]) for p in record["curve"])
    assert record["processes"] == 1 and 100 < record["peak_rss_mib"] < 4000
    assert (record["peak_cuda_mib"] is None) == (not torch.cuda.is_available())  # CUDA's peak too, on a GPU
    assert (tmp_path / "work" / "raft").resolve() == (root / run.name).resolve()
    assert (root / run.name / "final" / "model.safetensors").is_file() and record["model_dir"].endswith("final")
    log = root / f"{run.name}.log"
    assert "iter 1/1" in log.read_text()
    made = log.stat().st_mtime_ns

    assert hh_methods.method_run(root, settings, plan, run) == record  # read back: no second child
    assert log.stat().st_mtime_ns == made
    validation = hh_methods.validation_scores(root, settings, plan, record)
    assert math.isfinite(validation["validation_reward"]) and (root / f"{run.name}.validation.json").is_file()
    sft = hh_methods.validation_scores(root, settings, plan, None)
    assert validation["validation_perplexity"] > 1 and sft["validation_perplexity"] > 1
    assert validation["validation_perplexity"] != sft["validation_perplexity"]  # the run changed the model
    sweep = hh_methods.sweep_until_interior(root, settings, plan, {"raft": [1e-3]}, seed=0)
    assert sweep[["method", "learning_rate", "seed", "chosen", "interior"]].values.tolist() == [
        ["raft", 1e-3, 0, True, False]
    ]
    assert sweep.loc[0, "validation_reward"] == validation["validation_reward"] and log.stat().st_mtime_ns == made
    ratio = validation["validation_perplexity"] / sft["validation_perplexity"]
    assert sweep.loc[0, "perplexity_over_sft"] == pytest.approx(ratio)
    assert sweep.loc[0, "admissible"] == (ratio <= hh_methods.MAX_VALIDATION_PERPLEXITY_RATIO)


SHARED_RUN_PARAMETERS = (
    "eval_prompts",
    "validation_prompts",
    "samples_per_prompt",
    "temperature",
    "max_new_tokens",
    "prompts_per_iteration",
    "iterations",
    "learning_rates",
    "grpo_learning_rates",
    "epochs",
    "micro_batch_size",
    "eval_samples_per_prompt",
    "grpo_prompts_per_step",
    "grpo_eval_every_steps",
    "grpo_gradient_accumulation_steps",
    "policy_dtype",
    "reward_dtype",
    "mixed_precision",
    "lora_rank",
    "gradient_checkpointing",
    "generation_backend",
    "prompts_per_batch",
    "reward_batch_size",
    "num_processes",
    "accelerate_config",
    "setup_samples_per_prompt",
    "rm_epochs",
    "base_model",
    "openings",
)
"""What `hh_methods.MethodSettings`, the prompt plan and the sweep are built from in both notebooks."""


def tiny_setup(**overrides):
    """The record `hh_setup.prepare` returns in the tiny setting (its values, nothing built)."""
    from pathlib import Path

    from raftsuite.hh_setup import HHSetup

    values = {
        "hh_data": False,
        "directory": Path("runs/tiny/hh_setup"),
        "sft_model": "runs/tiny/hh_setup/sft",
        "reward_model": "runs/tiny/hh_setup/reward_model",
        "formatter": "raw",
        "prompts": Path("runs/tiny/hh_setup/prompts.jsonl"),
        "eval_prompts": 64,
        "curve_prompts": 64,
        "max_prompt_tokens": None,
        "test_prompts_file": None,
        "rm_accuracy": 0.7,
        "description": "",
    }
    return HHSetup(**(values | overrides))


def test_method_settings_come_from_the_notebooks_parameters_and_the_setup():
    import torch

    from raftsuite import runner
    from raftsuite.hh_methods import MethodSettings

    parameters = runner.notebook_parameters("hh_rlhf") | {
        "policy_dtype": "auto",
        "reward_dtype": "auto",
        "iterations": 3,
        "sft_model": "not this one",
    }
    settings = MethodSettings.from_parameters(parameters, tiny_setup())
    auto = "bfloat16" if torch.cuda.is_available() else "float32"
    assert (settings.policy_dtype, settings.reward_dtype, settings.iterations) == (auto, auto, 3)
    # what the setup built, not the notebook's parameter of the same name; gold scored only in the tiny setting
    assert (settings.sft_model, settings.reward_model, settings.gold) == (
        "runs/tiny/hh_setup/sft",
        "runs/tiny/hh_setup/reward_model",
        True,
    )
    assert settings.samples_per_prompt == parameters["samples_per_prompt"]
    hh_data = tiny_setup(hh_data=True, formatter="open_llama_hh", max_prompt_tokens=256)
    paper = MethodSettings.from_parameters(parameters, hh_data)
    assert (paper.reward_formatter, paper.max_prompt_tokens, paper.gold) == ("open_llama_hh", 256, False)
    with pytest.raises(ValueError, match="reward_dtype = 'fp8'"):
        MethodSettings.from_parameters({"reward_dtype": "fp8"}, tiny_setup())


@pytest.mark.parametrize("profile", ["tiny", "smoke"])
def test_hh_rlhf_and_efficiency_share_one_sweep_and_one_set_of_runs(profile):
    """Equal values give one runs/PROFILE/method_runs/<hash> directory: the sweep is computed once, used twice."""
    from raftsuite import hh_methods, runner

    entries = runner.load_profile(profile)

    def values(name):
        defaults = runner.notebook_parameters(name)
        return {key: entries.get(name, {}).get(key, defaults[key]) for key in SHARED_RUN_PARAMETERS}

    assert values("hh_rlhf") == values("efficiency")
    assert len(values("hh_rlhf")["learning_rates"]) >= (3 if profile == "tiny" else 1)
    assert len(values("hh_rlhf")["grpo_learning_rates"]) == len(values("hh_rlhf")["learning_rates"])

    def settings(name):
        parameters = runner.notebook_parameters(name) | entries.get(name, {})
        return hh_methods.MethodSettings.from_parameters(parameters, tiny_setup())

    assert settings("hh_rlhf") == settings("efficiency")


def test_the_fluency_check_gives_each_methods_perplexity_ratio_distinct2_and_gold_beside_sfts():
    from raftsuite import hh_report

    rows = []
    for seed, ratio in enumerate([2.0, 4.0, 8.0]):
        rows.append({"method": "SFT", "seed": seed, "perplexity": 100.0, "distinct_2": 0.8, "gold_reward": 0.1})
        rows.append(
            {"method": "RAFT", "seed": seed, "perplexity": 100.0 * ratio, "distinct_2": 0.2, "gold_reward": -0.2}
        )
    text = hh_report.fluency_check(pd.DataFrame(rows), "SFT", ["RAFT"])
    assert "n = 3 seeds" in text and "distinct-2 0.80, gold +0.100" in text
    assert "- RAFT: perplexity x 4.000 [" in text and "distinct-2 0.20, gold -0.200" in text  # geometric mean 4
    no_gold = hh_report.fluency_check(pd.DataFrame(rows).assign(gold_reward=float("nan")), "SFT", ["RAFT"])
    assert "gold" not in no_gold  # HH-RLHF profiles have no hidden gold preference


def test_sft_to_raft_compares_perplexity_as_a_ratio_and_the_rest_as_differences():
    from raftsuite import hh_report

    rows = []
    for seed, (sft_ppl, raft_ppl) in enumerate([(200.0, 400.0), (200.0, 440.0), (200.0, 420.0)]):
        rows.append({"method": "SFT", "seed": seed, "perplexity": sft_ppl, "proxy_reward": 0.0})
        rows.append({"method": "RAFT", "seed": seed, "perplexity": raft_ppl, "proxy_reward": 1.0 + seed})
    table = hh_report.sft_to_raft(pd.DataFrame(rows), "RAFT", "SFT", ["perplexity", "proxy_reward"])
    ppl, proxy = table.set_index("metric").loc["perplexity"], table.set_index("metric").loc["proxy_reward"]
    assert ppl["t"].method == "log-t" and ppl["t"].mean == pytest.approx((2.0 * 2.2 * 2.1) ** (1 / 3))  # geometric mean
    assert proxy["t"].method == "t" and proxy["t"].mean == pytest.approx(2.0)
    assert ppl["verdict"] == "reproduces"  # every seed's ratio is above 1, the paper's direction (3.781 -> 4.031)
    claims = hh_report.table3_claims(table.iloc[:0].assign(comparison=[]), table, hh_data=False)
    assert [c.claim for c in claims] == ["SFT -> RAFT, perplexity (ratio RAFT / SFT)", "SFT -> RAFT, proxy reward"]


def test_the_committed_index_leaves_out_profiles_git_ignores(tmp_path, monkeypatch):
    """A smoke or dryrun run on this machine must not change results/index.html, which is committed."""
    import subprocess
    from pathlib import Path

    from raftsuite import index

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("results/smoke/\n")
    for profile in ("tiny", "smoke"):
        (tmp_path / "results" / profile / "hh_rlhf").mkdir(parents=True)
        (tmp_path / "results" / profile / "hh_rlhf" / "status.json").write_text(
            '{"ok": true, "error": null, "seconds": 1.0, "profile": "tiny", "finished": "2026-12-04T20:00:00"}'
        )
    page = index.write_index(tmp_path / "results").read_text()
    assert "Profile <code>tiny</code>" in page and "Profile <code>smoke</code>" not in page
    assert "not committed (git ignores them): <code>smoke</code>" in page
    # A relative path is read from where the caller stands, not again from inside its own parent.
    monkeypatch.chdir(tmp_path)
    assert index.ignored_by_git(Path("results/smoke")) and not index.ignored_by_git(Path("results/tiny"))


def test_a_mistyped_profile_or_notebook_fails_before_setup_with_the_choices():
    """`make hh_rlhf PROFILE=typo` runs tools/check_profile.py (standard library only) before `make setup`."""
    import subprocess
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "check_profile.py"
    bare = {"PATH": "/usr/bin:/bin"}  # the system Python, as make runs it before .venv exists
    typo = subprocess.run(["python3", str(tool), "tiyn", "hh_rlhf"], capture_output=True, text=True, env=bare)
    assert typo.returncode == 1
    assert "PROFILE=tiyn: no such profile in notebooks/profiles.yaml (profiles: tiny, smoke," in typo.stderr
    notebook = subprocess.run(["python3", str(tool), "tiny", "hh_rlfh"], capture_output=True, text=True, env=bare)
    assert notebook.returncode == 1 and "no notebook notebooks/hh_rlfh.ipynb (notebooks: ablations," in notebook.stderr
    fine = subprocess.run(["python3", str(tool), "tiny", "hh_rlhf", "ablations"], capture_output=True, env=bare)
    assert fine.returncode == 0


def test_a_lora_method_run_without_peft_names_the_install_command_before_its_child_starts(tmp_path, monkeypatch):
    import importlib.util

    from raftlib.config import ConfigError
    from raftsuite import hh, hh_methods

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    settings = hh_methods.MethodSettings(sft_model="sft", reward_model="rm", lora_rank=16)
    plan = hh.PromptPlan(source="prompts.jsonl", curve=(0,), validation=(1,), fit=(2,))
    with pytest.raises(ConfigError, match=r"lora_rank = 16 needs the peft package.*pip install 'raftlib\[lora\]'"):
        hh_methods.method_run(tmp_path, settings, plan, hh_methods.MethodRun("grpo", 1e-5, 0))
    assert not list(tmp_path.glob("*.log"))  # no child was started


def test_the_sample_viewer_shows_gold_beside_proxy_kept_beside_rejected_for_every_seed(tmp_path):
    """The viewer a report shows: per seed's run, its first, middle and last iteration; per iteration the first
    prompts that have a kept sample (a prompt with none is skipped); the kept sample first, then the rejected
    ones best first, each with the proxy reward it was ranked by and the gold reward it never saw."""
    import re

    from raftlib.store import write_parquet
    from raftsuite import report

    runs = []
    for seed in (0, 1):
        run_dir = tmp_path / f"raft_seed{seed}"
        for iteration in (1, 2, 3, 4, 5):
            rows = []
            for prompt_id in (7, 8, 9):
                for index, reward in enumerate((0.1, 0.9, 0.5)):
                    kept = prompt_id != 7 and index == 1  # prompt 7 kept nothing
                    text = f"s{seed} i{iteration} p{prompt_id} r{reward} <b>"
                    rows.append(
                        {
                            "prompt_id": prompt_id,
                            "prompt": f"prompt {prompt_id}",
                            "kept": kept,
                            "reward": reward,
                            "completion": text,
                        }
                    )
            write_parquet(run_dir / f"iter_{iteration:04d}" / "samples.parquet", rows)
        runs.append(run_dir)
    gold_calls = []

    def gold(prompts, completions):
        gold_calls.append(len(completions))
        return [float(len(c)) / 100 for c in completions]

    page = report.sample_viewer(runs, gold=gold, prompts_per_run=2, max_rejected=2)
    headings = re.findall(r"<h4>([^<]+), iteration (\d+):", page)
    assert headings == [(f"raft_seed{s}", str(i)) for s in (0, 1) for i in (1, 3, 5)]
    assert "prompt 7" not in page and page.count("<th class='text'>prompt 8</th>") == 6  # 2 seeds x 3 iterations
    cells = re.findall(r"<td class='(kept|rejected)'><div class='reward'>[^<]*?proxy ([\d.]+) · gold ([\d.]+)", page)
    first_row = cells[:3]
    best_first = [("kept", "0.900"), ("rejected", "0.500"), ("rejected", "0.100")]
    assert [(kind, proxy) for kind, proxy, _ in first_row] == best_first
    assert len(cells) == 2 * 3 * 2 * 3 and gold_calls == [3] * 12  # every shown sample has its gold reward
    assert "&lt;b&gt;" in page and "<b>" not in page  # completions are escaped
