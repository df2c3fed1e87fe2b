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
from raftsuite import reasoning_report as RR
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


SETTINGS = R.ReasoningSettings(
    base_model="assets/tiny-math",
    iterations=2,
    prompts_per_iteration=8,
    samples_per_prompt=4,
    micro_batch_size=4,
    eval_samples_per_prompt=4,
    grpo_updates_per_generation=2,
)


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    parameters = {
        "train_dataset": "",
        "eval_problems": 16,
        "validation_problems": 12,
        "base_model": "assets/tiny-math",
        "max_new_tokens": SETTINGS.max_new_tokens,
    }
    return R.problem_files(tmp_path_factory.mktemp("problems"), parameters)


def test_problem_files_are_disjoint_and_drop_what_cannot_fit(problems, tmp_path):
    rows = {name: R.read_rows(getattr(problems, name)) for name in ("train", "validation", "held_out")}
    texts = {name: {r["prompt"] for r in part} for name, part in rows.items()}
    assert len(texts["validation"]) == 12 and len(texts["held_out"]) == 16
    assert not texts["train"] & texts["held_out"] and not texts["train"] & texts["validation"]
    assert not texts["validation"] & texts["held_out"]
    assert {r["set"] for r in rows["held_out"]} == {"held-out arithmetic"} and problems.dropped["held_out"] == 0
    # tiny-math's context is 32 positions: a 6-character prompt leaves room for 26 new tokens, not 27
    fits, dropped = R.fitting_rows(rows["held_out"][:3], "assets/tiny-math", 32 - len(rows["held_out"][0]["prompt"]))
    assert dropped == 0 and len(fits) == 3
    fits, dropped = R.fitting_rows(rows["held_out"][:3], "assets/tiny-math", 40)
    assert dropped == 3 and fits == []


@pytest.mark.parametrize("method", ["RAFT", "RAFT++", "random"])
def test_raft_configs_are_valid(method, problems, tmp_path):
    run = R.MethodRun(method, 1e-4, 0)
    raw = R.raft_config(SETTINGS, problems, run, tmp_path / "run", kept_counts=[3, 5] if method == "random" else ())
    config = RAFTConfig.from_dict(raw)
    assert config.training.loss == ("raftpp" if method == "RAFT++" else "sft")
    assert config.data.eval_file == problems.held_out and config.loop.pass_threshold == 1.0
    if method == "random":  # as many kept as RAFT kept, by a random key; the verifier recorded at weight 0
        assert config.selection.strategy == "count" and config.selection.kept_counts == [3, 5]
        assert [(c.name, c.weight) for c in config.reward.fn] == [("correct", 0.0), ("random", 1.0)]
    else:
        assert config.selection.strategy == "threshold" and config.selection.threshold == 1.0
    with pytest.raises(ValueError, match="kept count"):
        R.raft_config(SETTINGS, problems, R.MethodRun("random", 1e-4, 0), tmp_path / "run", kept_counts=[3])


def test_the_four_methods_run_and_the_control_keeps_what_raft_kept(problems, tmp_path):
    """Real runs in child processes: RAFT, the control matched to its kept counts, GRPO evaluated by raftlib."""
    root = R.runs_root(tmp_path, SETTINGS, problems)
    records = R.all_runs(root, SETTINGS, problems, {"RAFT": 3e-4, "GRPO": 3e-4}, ["RAFT", "GRPO", "random"], [0])
    raft, control = records["RAFT", 0], records["random", 0]
    raft_kept = [r["kept"] for r in raft["iterations"] if r["iteration"] > 0]
    assert [r["kept"] for r in control["iterations"] if r["iteration"] > 0] == raft_kept and min(raft_kept) > 0
    curve, per_problem = R.frames(records, SETTINGS)
    assert set(per_problem.groupby(["method", "iteration"]).size()) == {16}  # every problem, every iteration
    start = curve[curve["iteration"] == 0].set_index("method")["pass_at_1"]
    assert start["RAFT"] == start["random"] == start["GRPO"]  # one base model, one evaluation stream per seed
    assert curve.groupby("method")["iteration"].max().to_dict() == {"RAFT": 2, "GRPO": 2, "random": 2}
    assert all(0.0 <= r["validation_pass_at_1"] <= 1.0 for r in records.values())
    again = R.all_runs(root, SETTINGS, problems, {"RAFT": 3e-4, "GRPO": 3e-4}, ["RAFT", "GRPO", "random"], [0])
    assert again == records  # cached: read back, not rerun


def test_per_problem_rows_and_the_average_over_sets():
    rows = [
        {"prompt_id": p, "reward/correct": r, "completion_token_count": 2, "entropy": 1.0}
        for p, r in [(0, 1.0), (0, 0.0), (1, None), (1, 0.0), (2, 1.0), (2, 1.0)]
    ]
    problems = R.per_problem(rows, {0: "a", 1: "a", 2: "b"})
    assert [(p["pass_at_1"], p["pass_at_n"], p["unparsable"]) for p in problems] == [
        (0.5, 1.0, 0.0),
        (0.0, 0.0, 0.5),
        (1.0, 1.0, 0.0),
    ]
    point = R.curve_point(problems)
    assert point["pass_at_1"] == pytest.approx((0.25 + 1.0) / 2)  # each set's mean, then their mean
    assert point["a/pass_at_1"] == 0.25 and point["entropy"] == pytest.approx(0.5)


# ---- statistics -----------------------------------------------------------------------------------------


def test_pass_at_k_matches_brute_force_enumeration():
    outcomes = [True, False, False, True, False]
    for k in range(1, 6):
        subsets = list(itertools.combinations(outcomes, k))
        expected = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(5, 2, k) == pytest.approx(expected)


def frame_of(values: dict[str, list[tuple[float, float]]], seeds: int = 5) -> pd.DataFrame:
    """values[method] = [(pass@1, entropy) at iteration 0, 1, 2, ...], per seed plus a small seeded jitter."""
    rng = np.random.default_rng(0)
    rows = []
    for method, points in values.items():
        for seed in range(seeds):
            for t, (acc, ent) in enumerate(points):
                jitter = 0.0 if t == 0 else 0.005 * rng.standard_normal()
                rows.append(
                    {
                        "method": method,
                        "seed": seed,
                        "iteration": t,
                        "pass_at_1": acc + 0.01 * seed + jitter,
                        "entropy": ent + 0.01 * seed + jitter,
                    }
                )
    return pd.DataFrame(rows)


NO_PROBLEMS = pd.DataFrame(columns=["method", "seed", "iteration", "problem"])


def test_the_entropy_story_is_three_paired_changes():
    pattern = frame_of({"RAFT++": [(0.2, 0.9), (0.4, 0.6), (0.5, 0.3)], "GRPO": [(0.2, 0.9), (0.3, 0.85), (0.55, 0.8)]})
    parts = RR.pattern_comparisons(pattern, NO_PROBLEMS, "RAFT++", early=1)
    assert RR.pattern_verdict(parts) == "appears" and parts["n_seeds"].tolist() == [5, 5, 5]
    assert parts.iloc[0]["t"].mean == pytest.approx(0.1, abs=0.01) and parts.iloc[2]["t"].mean == pytest.approx(
        0.15, abs=0.01
    )
    no_lead = frame_of({"RAFT++": [(0.2, 0.9), (0.2, 0.6), (0.5, 0.3)], "GRPO": [(0.2, 0.9), (0.3, 0.85), (0.55, 0.8)]})
    assert RR.pattern_verdict(RR.pattern_comparisons(no_lead, NO_PROBLEMS, "RAFT++", early=1)) == "does not appear"
    level = frame_of({"RAFT++": [(0.2, 0.9), (0.4, 0.6), (0.4, 0.3)], "GRPO": [(0.2, 0.9), (0.3, 0.85), (0.3, 0.8)]})
    # GRPO never catches up: the lead does not shrink, so the third part fails to reproduce (level is not "caught up")
    assert RR.pattern_verdict(RR.pattern_comparisons(level, NO_PROBLEMS, "RAFT++", early=1)) != "appears"
    # eval_every 2 over 2 iterations: iterations 0 and 2 evaluated, no early window, no verdict (not a KeyError)
    only_last = pattern[pattern["iteration"] != 1]
    assert RR.pattern_comparisons(only_last, NO_PROBLEMS, "RAFT++", early=1) is None
    # eval_every 2 over 4 iterations with early = 1: the early window ends at the first evaluated iteration (2)
    skipping = frame_of({m: [*v, v[-1]] for m, v in {"RAFT++": [(0.2, 0.9), (0.4, 0.6), (0.5, 0.3)],
                                                    "GRPO": [(0.2, 0.9), (0.3, 0.85), (0.55, 0.8)]}.items()})  # fmt: skip
    skipping = skipping[skipping["iteration"].isin([0, 2, 3])]
    assert RR.pattern_comparisons(skipping, NO_PROBLEMS, "RAFT++", early=1)["when"].iloc[0] == "iterations 1-2"


def test_paper_table_names_the_version_and_the_primary_claim():
    frame = frame_of({m: [(0.2, 0.9), (0.3, 0.8)] for m in R.METHODS})
    table = RR.paper_table(frame)
    assert table.loc["RAFT++", "paper v2 (%)"] == 56.1 and table.loc["base", "seeds"] == 5
    assert table.loc["RAFT", "ours (%), iteration 1"].startswith("32.0 [")
    final = RR.final_comparisons(frame, NO_PROBLEMS, R.METHODS)
    claims = RR.claims(final, {})
    assert [c.claim for c in claims if c.primary] == ["RAFT++ above RAFT, held-out pass@1 (iteration 1)"]


TINY_PROBLEMS = {
    "train_dataset": "",
    "eval_problems": 8,
    "validation_problems": 8,
    "base_model": "assets/tiny-math",
    "max_new_tokens": 6,
}
"""The arithmetic task's problem files at 8 held-out and 8 validation problems (tests/test_precision.py too)."""


def test_grpo_s_evaluation_never_starts_an_engine_only_the_main_process_joins(tmp_path):
    """GRPO evaluates on the main process while the others wait: raftlib's vLLM engine (which joins the
    launcher's process group, and would sit beside TRL's colocated engine) gives way to the static decoder
    there; one process without TRL's engine keeps RAFT's backend. A sharded LoRA GRPO is refused up front."""
    files = R.problem_files(tmp_path / "problems", TINY_PROBLEMS)
    alone = R.ReasoningSettings(base_model="assets/tiny-math", generation_backend="vllm")
    assert R.grpo_evaluation_config(alone, files, 0).generation.backend == "vllm"
    for settings in (
        R.ReasoningSettings(base_model="assets/tiny-math", generation_backend="vllm", num_processes=2),
        R.ReasoningSettings(base_model="assets/tiny-math", generation_backend="vllm", grpo_use_vllm=True),
    ):
        config = R.grpo_evaluation_config(settings, files, 0)
        assert config.generation.backend == "static"
        assert config.seed == R.evaluation_config(settings, files, 0).seed  # RAFT's streams otherwise
    sharded = R.ReasoningSettings(
        base_model="assets/tiny-math", lora_rank=4, num_processes=2, accelerate_config="examples/accelerate/fsdp.yaml"
    )
    with pytest.raises(ValueError, match="lora_rank 4 under the FSDP accelerate_config"):
        R.check_grpo_sharding(sharded)
    fsdp1 = tmp_path / "fsdp1.yaml"
    fsdp1.write_text(Path("examples/accelerate/fsdp.yaml").read_text().replace("fsdp_version: 2", "fsdp_version: 1"))
    with pytest.raises(ValueError, match="fsdp_version 1; GRPO's held-out evaluation gathers FSDP2 weights only"):
        R.check_grpo_sharding(R.ReasoningSettings(base_model="assets/tiny-math", accelerate_config=str(fsdp1)))
    R.check_grpo_sharding(
        R.ReasoningSettings(base_model="assets/tiny-math", accelerate_config="examples/accelerate/ddp.yaml")
    )


def test_the_hh_grpo_baseline_refuses_a_sharded_launch():
    from raftsuite import hh_methods

    settings = hh_methods.MethodSettings(
        sft_model="unused", reward_model="unused", accelerate_config="examples/accelerate/fsdp.yaml"
    )
    with pytest.raises(ValueError, match="measures its held-out reward on the main process alone"):
        hh_methods.refuse_sharded_grpo(settings)
    hh_methods.refuse_sharded_grpo(hh_methods.MethodSettings(sft_model="unused", reward_model="unused"))
