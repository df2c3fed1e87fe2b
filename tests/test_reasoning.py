"""The reasoning notebook's pieces: verifiers, hub-format loaders on local files, the random control, the statistics."""

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raftlib.config import RAFTConfig
from raftlib.metrics import pass_at_k
from raftsuite import reasoning as R
from raftsuite import tinymath

# ---- verifiers ---------------------------------------------------------------------------------------


def test_exact_answer_parse_failure_is_none():
    completions = ["85", " 85 ", "84", "8 5", "", "85=", "-3"]
    answers = ["85", "85", "85", "85", "85", "85", "-3"]
    assert R.exact_answer([""] * 7, completions, answers) == [1.0, 1.0, 0.0, None, None, None, 1.0]


def test_last_boxed_balances_braces():
    assert R.last_boxed(r"so \boxed{1} or rather \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert R.last_boxed(r"\fbox{7}") == "7"
    assert R.last_boxed("no box here") is None
    assert R.last_boxed(r"cut off \boxed{\frac{1}{2") is None


@pytest.mark.parametrize(
    ("predicted", "reference", "equal"),
    [
        (r"\dfrac{1}{2}", r"\frac12", True),
        ("0.5", r"\frac{1}{2}", True),
        ("1/2", "0.5", True),
        (r"\text{ 10 }", "10", True),
        ("1,000", "1000", True),
        (r"\left( 1, 2 \right)", "(1,2)", True),
        ("90^\\circ", "90", True),
        ("3", "4", False),
        ("x+1", "x+2", False),
    ],
)
def test_math_equal(predicted, reference, equal):
    assert R.math_equal(predicted, reference) is equal


def test_math_answer_reads_the_last_box():
    rewards = R.math_answer(["q"] * 3, [r"... \boxed{42}", r"\boxed{41}", "forty-two"], ["42", "42", "42"])
    assert rewards == [1.0, 0.0, None]


def test_matched_random_keeps_as_many_as_are_correct_and_is_seeded():
    prompts = ["1+1="] * 4 + ["2+2="] * 4
    completions = ["2", "3", "2", "x", "5", "6", "7", "8"]
    answers = ["2"] * 4 + ["4"] * 4
    reward = R.matched_random("arithmetic", seed=3)
    first = reward(prompts, completions, answers)
    assert sum(first[:4]) == 2 and sum(first[4:]) == 0  # 2 correct of the first prompt's 4, none of the second's
    assert first == reward(prompts, completions, answers)  # a resumed run scores the same
    picks = {tuple(R.matched_random("arithmetic", seed=s)(prompts, completions, answers)[:4]) for s in range(20)}
    assert len(picks) > 1  # the choice does depend on the seed, not on correctness


# ---- prompt sources in the hub formats, from local files -------------------------------------------------


def test_math_prompts_in_numina_math500_and_olympiadbench_formats(tmp_path):
    numina = tmp_path / "numina.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"source": "amc", "problem": "What is 1+1?", "solution": r"Add: \boxed{2}.", "messages": []},
                {"source": "amc", "problem": "No answer.", "solution": "We cannot tell.", "messages": []},
            ]
        ),
        numina,
    )
    rows = R.math_prompts(str(numina), problem_column="problem", answer_column="solution")
    assert rows == [{"prompt": "What is 1+1?" + R.QWEN_MATH_SUFFIX, "answer": "2"}]  # unverifiable row dropped

    math500 = tmp_path / "math500.jsonl"
    math500.write_text(json.dumps({"problem": "Half of 1?", "answer": r"\frac{1}{2}", "level": 1}) + "\n")
    assert R.math_prompts(str(math500))[0]["answer"] == r"\frac{1}{2}"

    olympiad = tmp_path / "olympiad.jsonl"
    olympiad.write_text(json.dumps({"question": "Find x.", "final_answer": ["$3$"]}) + "\n")
    rows = R.math_prompts(str(olympiad), problem_column="question", answer_column="final_answer")
    assert rows[0]["answer"] == "$3$" and R.math_answer(["q"], [r"\boxed{3}"], [rows[0]["answer"]]) == [1.0]

    with pytest.raises(KeyError, match="needs columns 'problem' and 'answer'"):
        R.math_prompts(str(olympiad))


def test_math_prompts_from_a_dataset_dir_in_the_hub_layout(tmp_path):
    """A dir laid out as a hub repository (data/test-00000-of-00001.parquet) loads through datasets.load_dataset."""
    (tmp_path / "ds" / "data").mkdir(parents=True)
    rows = [{"problem": f"{i}*3?", "answer": str(3 * i)} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ds" / "data" / "test-00000-of-00001.parquet")
    loaded = R.math_prompts(str(tmp_path / "ds"), split="test", limit=3, seed=1)
    assert len(loaded) == 3 and all(r["prompt"].endswith(R.QWEN_MATH_SUFFIX) for r in loaded)
    assert {r["answer"] for r in loaded} <= {r["answer"] for r in rows}


# ---- the tiny task ------------------------------------------------------------------------------------------


def test_tiny_task_split_is_disjoint_and_deterministic():
    train, heldout = tinymath.split()
    assert not {p for p, _ in train} & {p for p, _ in heldout}
    assert len(heldout) / (len(train) + len(heldout)) == pytest.approx(0.1, abs=0.02)
    assert tinymath.split() == (train, heldout)
    assert ("47+38=", 85) in train + heldout and all(a >= 0 for _, a in train)


def test_corrupted_answers_are_wrong_and_non_negative():
    rng = np.random.default_rng(0)
    for answer in [0, 9, 10, 85, 198]:
        for _ in range(50):
            wrong = tinymath.corrupt(answer, rng)
            assert wrong != answer and wrong >= 0


def test_tokenizer_is_one_token_per_character(tmp_path):
    tokenizer = tinymath.build_tokenizer(tmp_path)
    ids = tokenizer("47+38=")["input_ids"]
    assert len(ids) == 6
    assert tokenizer.decode(
        ids + tokenizer("85")["input_ids"] + [tokenizer.eos_token_id], skip_special_tokens=True
    ) == ("47+38=85")


def test_committed_model_partly_solves_the_task():
    build = json.loads((Path(__file__).parent.parent / "assets" / "tiny-math" / "BUILD.json").read_text())
    assert 0.1 < build["greedy_heldout_accuracy"] < 0.9  # room for RAFT to improve, and something to keep


@pytest.mark.parametrize("method", ["RAFT", "RAFT++", "random"])
def test_raft_configs_are_valid(method, tmp_path):
    budget = R.Budget(
        iterations=2, prompts_per_iteration=8, samples_per_prompt=4, learning_rate=1e-4, micro_batch_size=4
    )
    raw = R.raft_config(method, "assets/tiny-math", tmp_path / "p.jsonl", budget, "arithmetic", 0, tmp_path / "run")
    config = RAFTConfig.from_dict(raw)
    assert config.selection.strategy == "threshold" and config.selection.threshold == 1.0
    assert config.training.loss == ("raftpp" if method == "RAFT++" else "sft")
    assert config.reward.batch_size % config.generation.samples_per_prompt == 0


# ---- statistics -----------------------------------------------------------------------------------------


def test_pass_at_k_matches_brute_force_enumeration():
    outcomes = [True, False, False, True, False]
    for k in range(1, 6):
        subsets = list(itertools.combinations(outcomes, k))
        expected = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(5, 2, k) == pytest.approx(expected)


def test_bootstrap_interval_holds_the_mean_and_degenerates_for_equal_values():
    low, high = R.bootstrap_ci([0.1, 0.2, 0.3])
    assert 0.1 <= low <= 0.2 <= high <= 0.3
    assert R.bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert R.sign_of({"ci95_low": 0.1, "ci95_high": 0.2}) == "yes"
    assert R.sign_of({"ci95_low": -0.1, "ci95_high": 0.2}) == "not resolved"
    assert R.sign_of({"ci95_low": -0.3, "ci95_high": -0.2}) == "no"


def frame_of(values: dict[str, list[tuple[float, float]]]) -> pd.DataFrame:
    """values[method] = [(pass@1, entropy) at iteration 0, 1, 2], the same for three seeds plus a seed offset."""
    rows = []
    for method, points in values.items():
        for seed in range(3):
            for t, (acc, ent) in enumerate(points):
                rows.append({"method": method, "seed": seed, "iteration": t, "pass_at_1": acc + 0.01 * seed,
                             "entropy": ent + 0.01 * seed})  # fmt: skip
    return pd.DataFrame(rows)


def test_verdict_finds_the_pattern_and_its_absence():
    pattern = frame_of({"RAFT++": [(0.2, 0.9), (0.4, 0.6), (0.5, 0.3)], "GRPO": [(0.2, 0.9), (0.3, 0.85), (0.55, 0.8)]})
    assert R.entropy_verdict(pattern)["verdict"] == "appears"
    over_two = R.entropy_verdict(pattern, early=2)["intervals"][
        "RAFT++ ahead of GRPO over iterations 1-2 (mean pass@1)"
    ]
    assert over_two["mean"] == pytest.approx(((0.4 + 0.5) - (0.3 + 0.55)) / 2)  # each seed's mean over 1..2
    no_lead = frame_of({"RAFT++": [(0.2, 0.9), (0.2, 0.6), (0.5, 0.3)], "GRPO": [(0.2, 0.9), (0.3, 0.85), (0.55, 0.8)]})
    assert R.entropy_verdict(no_lead)["verdict"] == "does not appear"
    noisy = pattern.copy()
    noisy.loc[(noisy["method"] == "RAFT++") & (noisy["iteration"] == 1), "pass_at_1"] = [0.5, 0.2, 0.35]
    assert R.entropy_verdict(noisy)["verdict"] == "not resolved"


def test_paper_table_names_the_version():
    frame = frame_of({m: [(0.2, 0.9), (0.3, 0.8)] for m in R.METHODS})
    table = R.paper_table(frame)
    assert table.loc["paper v2: RAFT++", "accuracy_pct"] == 56.1
    assert table.loc["ours: RAFT", "accuracy_pct"] == pytest.approx(31.0)
    assert table.loc["ours: base", "seeds"] == 3
