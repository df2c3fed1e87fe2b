"""The ablations' seeded tables (raftsuite.ablations): settings as config overrides, held-out prompts kept out of
every seed's training, paired changes along a sweep and against the random-selection control with Student-t
intervals over seeds (df = n - 1, hand-computed), "identical runs", claims; and real tiny runs through
`run_settings` (a tiny GPT-2 policy and reward model built in code) for the SFT rows, the cache, the kept-set
overlaps, the control table and the figure."""

import json
import math
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import raftlib
from raftlib import testing
from raftlib.data import Prompt
from raftsuite import ablations, hh_methods, stats

T975 = {1: 12.706204736174694, 2: 4.302652729749462}  # Student-t 0.975 quantiles, df = 1, 2
T80 = {2: 1.0606601717798214}  # the 0.80 quantile, df = 2 (detectable effect at 80 % power)


def _t(mean: float, sd: float, n: int) -> tuple[float, float, float]:
    half = T975[n - 1] * sd / math.sqrt(n)
    return (mean, mean - half, mean + half)


def _rows(values: dict[float, list[float]], sweep: str = "K", metric: str = "proxy_reward") -> pd.DataFrame:
    """One row per (setting, seed): values[setting][i] is seed i's final value."""
    return pd.DataFrame(
        [
            {sweep: setting, "seed": seed, "run": f"{sweep}{setting}", metric: value}
            for setting, per_seed in values.items()
            for seed, value in enumerate(per_seed)
        ]
    )


def test_settings_are_config_overrides_and_the_control_only_swaps_the_reward(tmp_path):
    base = raftlib.RAFTConfig.from_dict(
        {"model": {"path": "m"}, "data": {"prompts": "p.jsonl"}, "reward": {"fn": "reward_model"}, "output_dir": "w"}
    )
    raft = base.replace(ablations.setting_overrides(16, 0.85, 0.01))
    random = base.replace(ablations.setting_overrides(16, 0.85, 0.01) + ablations.RANDOM_SELECTION)
    assert ablations.describe(raft) == {"K": 16, "temperature": 0.85, "kl_coef": 0.01, "selection": "RAFT"}
    assert ablations.describe(random) == {"K": 16, "temperature": 0.85, "kl_coef": 0.01, "selection": "random"}
    assert random.replace(["reward.fn=reward_model"]) == raft  # nothing else differs: same loop, same samples
    assert ablations.run_name(16, 0.85, 0.01) == "K16_T0.85_beta0.01"
    assert ablations.run_name(8, 1.0, selection="random") == "random_K8_T1_beta0"
    assert ablations.setting_label(8, 1.0) == "K = 8, λ = 1, β = 0"


def test_sweep_settings_share_runs_and_each_sweep_has_its_control():
    smoke = {
        "k_values": [2, 4],
        "k_sweep_temperature": 1.0,
        "temperatures": [0.7, 1.0],
        "temperature_sweep_k": 2,
        "kl_coefs": [0.0, 0.1],
        "kl_sweep_k": 2,
        "kl_sweep_temperature": 1.0,
    }
    sweeps = ablations.sweep_settings(smoke)
    assert sweeps == {
        "K": {2: (2, 1.0, 0.0), 4: (4, 1.0, 0.0)},
        "temperature": {0.7: (2, 0.7, 0.0), 1.0: (2, 1.0, 0.0)},
        "kl_coef": {0.0: (2, 1.0, 0.0), 0.1: (2, 1.0, 0.1)},
    }
    controls = ablations.control_settings(smoke)
    assert controls == {"K": (2, 1.0, 0.0), "temperature": (2, 1.0, 0.0), "kl_coef": (2, 1.0, 0.0)}
    base = raftlib.RAFTConfig.from_dict(
        {"model": {"path": "m"}, "data": {"prompts": "p.jsonl"}, "reward": {"fn": "reward_model"}, "output_dir": "w"}
    )
    configs = ablations.configs(base, sweeps, controls)
    # K = 2, lambda = 1, beta = 0 serves all three sweeps once; its control likewise
    assert list(configs) == ["K2_T1_beta0", "K4_T1_beta0", "K2_T0.7_beta0", "K2_T1_beta0.1", "random_K2_T1_beta0"]
    assert {n: ablations.describe(c)["selection"] for n, c in configs.items()}["random_K2_T1_beta0"] == "random"
    # the tiny profile: the temperature control sits at the K sweep's temperature when the sweep has it, else first
    tiny = smoke | {
        "k_values": [8, 16, 32],
        "k_sweep_temperature": 0.85,
        "temperatures": [0.7, 0.85, 1.0],
        "temperature_sweep_k": 8,
        "kl_sweep_k": 8,
    }
    assert ablations.control_settings(tiny)["temperature"] == (8, 0.85, 0.0)
    assert ablations.control_settings(tiny | {"temperatures": [0.7, 1.0]})["temperature"] == (8, 0.7, 0.0)


def test_train_only_prompts_drops_exactly_the_held_out_rows(tmp_path):
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"p{i}", "reference": f"r{i}"}) + "\n" for i in range(6)))
    held_out = [Prompt(prompt_id=1, text="p1"), Prompt(prompt_id=4, text="p4")]
    path = ablations.train_only_prompts(source, held_out, tmp_path / "work" / "train.jsonl")
    assert [json.loads(line)["prompt"] for line in path.read_text().splitlines()] == ["p0", "p2", "p3", "p5"]
    assert ablations.train_only_prompts(source, held_out, path) == path  # written again: same content
    with pytest.raises(ValueError, match="2 held-out prompts but 1 rows"):
        ablations.train_only_prompts(source, [Prompt(prompt_id=1, text="p1"), Prompt(0, "not there")], path)


def test_changes_are_paired_by_seed_with_t_intervals_and_verdicts_against_the_paper():
    # seed by seed: K32 - K8 = 0.2, 0.3, 0.4; K16 - K8 = 0.1, 0.2, 0.3; K32 - K16 = 0.1, 0.1, 0.1
    rows = _rows({8: [0.0, 1.0, 2.0], 16: [0.1, 1.2, 2.3], 32: [0.2, 1.3, 2.4]})
    # the sweep's order is the order its settings first appear; within a setting seeds are paired by seed, not row
    reordered = rows.sort_values(["K", "seed"], ascending=[True, False])
    table = ablations.changes(reordered, "K", "proxy_reward", ablations.PAPER["K"])
    assert list(table.index) == ["K 8 → 32", "K 8 → 16", "K 16 → 32"]
    assert list(table.columns) == [
        "ours",
        "n_seeds",
        "crossed_interval",
        "detectable_at_80pct_power",
        "paper_change",
        "verdict",
        "direction",
        "identical",
        "t",
    ]
    first = table.loc["K 8 → 32"]
    # mean 0.3, sd 0.1, t(0.975, df 2) = 4.303: 0.3 +- 0.248 (the unpaired means' spreads overlap; the pairs do not)
    assert first["t"].as_tuple() == pytest.approx(_t(0.3, 0.1, 3)) and first["t"].method == "t"
    assert first["ours"] == "0.300 [0.052, 0.548]" and first["n_seeds"] == 3
    assert first["paper_change"] == pytest.approx(2.329 - 2.180) and first["direction"] == "up"
    assert first["verdict"] == stats.REPRODUCES and not first["identical"]
    assert first["detectable_at_80pct_power"] == pytest.approx((T975[2] + T80[2]) * 0.1 / math.sqrt(3))
    # 0.1, 0.2, 0.3: all positive, but the interval [-0.148, 0.348] holds 0
    assert table.loc["K 8 → 16", "t"].as_tuple() == pytest.approx(_t(0.2, 0.1, 3))
    assert table.loc["K 8 → 16", "verdict"] == stats.NOT_RESOLVED
    assert table.loc["K 16 → 32", "t"].as_tuple() == pytest.approx((0.1, 0.1, 0.1))  # every seed agrees
    assert table.loc["K 16 → 32", "verdict"] == stats.REPRODUCES
    assert table.loc["K 16 → 32", "detectable_at_80pct_power"] == pytest.approx(0.0, abs=1e-12)
    # a seed run at one end only is left out of the pairs
    extra = pd.concat([rows, pd.DataFrame([{"K": 8, "seed": 3, "run": "K8", "proxy_reward": 9.0}])])
    assert ablations.changes(extra, "K", "proxy_reward", ablations.PAPER["K"]).loc["K 8 → 32", "n_seeds"] == 3

    # -0.3, -0.4, -0.2 against the paper's rise: [-0.548, -0.052]
    falling = ablations.changes(
        _rows({8: [1.0, 2.0, 3.0], 32: [0.7, 1.6, 2.8]}), "K", "proxy_reward", ablations.PAPER["K"]
    )
    assert list(falling.index) == ["K 8 → 32"]  # two settings: no adjacent pairs besides the ends
    assert falling.loc["K 8 → 32", "verdict"] == stats.OPPOSITE
    mixed = ablations.changes(
        _rows({8: [1.0, 2.0, 3.0], 32: [1.5, 1.6, 3.1]}), "K", "proxy_reward", ablations.PAPER["K"]
    )
    assert mixed.loc["K 8 → 32", "verdict"] == stats.NOT_RESOLVED

    # the paper's Table 7 falls: a fall here reproduces it; identical runs (beta too small to flip a choice) are
    # "identical runs", not an unresolved zero
    beta_rows = _rows({0.0: [0.5, 0.6, 0.7], 0.005: [0.5, 0.6, 0.7], 0.1: [0.4, 0.5, 0.65]}, "kl_coef")
    beta = ablations.changes(beta_rows, "kl_coef", "proxy_reward", ablations.PAPER["kl_coef"])
    assert beta.loc["kl_coef 0 → 0.1", "t"].as_tuple() == pytest.approx(_t(-0.25 / 3, math.sqrt(0.05**2 / 3), 3))
    assert beta.loc["kl_coef 0 → 0.1", "verdict"] == stats.REPRODUCES
    assert beta.loc["kl_coef 0.005 → 0.1", "verdict"] == stats.REPRODUCES
    assert beta.loc["kl_coef 0 → 0.005", "verdict"] == stats.NOT_RESOLVED  # [0, 0] touches 0
    same = ablations.changes(beta_rows, "kl_coef", "proxy_reward", ablations.PAPER["kl_coef"], {(0.0, 0.005)})
    assert same.loc["kl_coef 0 → 0.005", "verdict"] == stats.IDENTICAL and same.loc["kl_coef 0 → 0.005", "identical"]
    assert same.loc["kl_coef 0 → 0.1", "verdict"] == stats.REPRODUCES and not same.loc["kl_coef 0 → 0.1", "identical"]


def test_one_seed_gives_no_interval_and_no_verdict():
    table = ablations.changes(_rows({8: [1.0], 32: [2.0]}), "K", "proxy_reward", ablations.PAPER["K"])
    row = table.loc["K 8 → 32"]
    assert row["t"].mean == pytest.approx(1.0) and math.isnan(row["t"].low) and row["t"].method == "none"
    assert row["ours"] == "1.000 [one seed: no interval]" and row["n_seeds"] == 1
    assert row["verdict"] == stats.NOT_RESOLVED and math.isnan(row["detectable_at_80pct_power"])
    # two seeds: df = 1 (t = 12.7): 1.0, 1.2 does not resolve
    two = ablations.changes(_rows({8: [1.0, 2.0], 32: [2.0, 3.2]}), "K", "proxy_reward", ablations.PAPER["K"])
    assert two.loc["K 8 → 32", "t"].as_tuple() == pytest.approx(_t(1.1, math.sqrt(0.02), 2))
    assert two.loc["K 8 → 32", "verdict"] == stats.NOT_RESOLVED
    # no paper value for these settings: no direction, no verdict against it
    other = ablations.changes(_rows({2: [1.0, 1.5], 4: [2.0, 2.7]}), "K", "proxy_reward", ablations.PAPER["K"])
    assert other.iloc[0]["verdict"] == "no paper value" and other.iloc[0]["direction"] is None
    assert math.isnan(other.iloc[0]["paper_change"])
    flagged = ablations.changes(_rows({2: [1.0, 1.5], 4: [1.0, 1.5]}), "K", "proxy_reward", {}, {(2, 4)})
    assert flagged.iloc[0]["verdict"] == stats.IDENTICAL


def test_claims_are_the_changes_with_a_paper_direction_one_primary():
    table = ablations.changes(
        _rows({8: [0.0, 1.0, 2.0], 16: [0.1, 1.2, 2.3], 32: [0.2, 1.3, 2.4]}), "K", "proxy_reward", ablations.PAPER["K"]
    )
    claims = ablations.claims("Table 5", table, "proxy_reward", primary="K 8 → 32")
    assert [(c.claim, c.paper, c.primary) for c in claims] == [
        ("K 8 → 32, proxy reward", "+0.149", True),
        ("K 8 → 16, proxy reward", "+0.071", False),
        ("K 16 → 32, proxy reward", "+0.078", False),
    ]
    assert [c.row()["verdict"] for c in claims] == [stats.REPRODUCES, stats.NOT_RESOLVED, stats.REPRODUCES]
    assert claims[0].interval is table.loc["K 8 → 32", "t"] and {c.table for c in claims} == {"Table 5"}
    assert claims[1].row()["detectable_at_80pct_power"] == pytest.approx(
        table.loc["K 8 → 16", "detectable_at_80pct_power"]
    )
    # changes without a paper direction make no claim
    none = ablations.changes(_rows({2: [1.0, 1.5], 4: [2.0, 2.7]}), "K", "proxy_reward", ablations.PAPER["K"])
    assert ablations.claims("Table 5", none, "proxy_reward") == []
    # the start-of-run best-of-K claim (Table 6): falls from lambda 0.7 to 1.0 in the paper; here too
    start = _rows({0.7: [3.0, 3.2, 3.1], 1.0: [2.5, 2.8, 2.6]}, "temperature", "start_best_of_k")
    [claim] = ablations.start_best_of_k_claim(start)
    assert claim.table == "Table 6" and claim.paper == "3.41 -> 2.48" and claim.direction == "down"
    assert claim.interval.as_tuple() == pytest.approx(
        _t(-1.4 / 3, math.sqrt(((0.1 / 3) ** 2 * 2 + (0.2 / 3) ** 2) / 2), 3)
    )
    assert claim.row()["verdict"] == stats.REPRODUCES
    assert ablations.start_best_of_k_claim(_rows({0.85: [3.0], 1.0: [2.5]}, "temperature", "start_best_of_k")) == []


def test_control_difference_is_raft_minus_random_by_seed():
    results = pd.DataFrame(
        {
            "run": ["K8", "K8", "K8", "random_K8", "random_K8", "random_K8"],
            "seed": [0, 1, 2, 2, 0, 1],  # listed in another order: paired by seed, not by position
            "proxy_reward": [0.5, 0.7, 0.9, 0.6, 0.1, 0.2],
        }
    )
    interval = ablations.control_difference(results, "K8", "random_K8")
    assert interval.as_tuple() == pytest.approx(_t(0.4, 0.1, 3))  # per seed 0.4, 0.5, 0.3
    assert stats.verdict(interval, "up") == stats.REPRODUCES
    with pytest.raises(ValueError, match="only one of the two"):
        ablations.control_difference(results[results["seed"] != 1].iloc[1:], "K8", "random_K8")


# ----------------------------------------------------------------------------------------------
# Real tiny runs: two settings that keep the same samples, and the matched control
# ----------------------------------------------------------------------------------------------

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The KL sweep beta = 0 / 0.1 at K = 2 with its random control, one iteration, seeds 0 and 1.

    In the first iteration pi_theta = pi_0, so the KL term of the ranking key is exactly 0 and beta = 0.1 keeps
    what beta = 0 keeps: two identical runs, whatever the seed. The control keeps other samples.
    """
    root = tmp_path_factory.mktemp("ablations")
    sft, rm = testing.build_gpt2(root / "sft"), testing.build_gpt2_reward_model(root / "rm")
    prompts = testing.write_prompts(root / "prompts.jsonl", count=24)
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    held_out = [
        Prompt(prompt_id=i, text=rows[i]["prompt"], columns={"reference": rows[i]["reference"]}) for i in range(4)
    ]
    work = root / "work"
    train = ablations.train_only_prompts(prompts, held_out, work / "train.jsonl")
    settings = hh_methods.MethodSettings(
        sft_model=str(sft),
        reward_model=str(rm),
        samples_per_prompt=2,
        max_new_tokens=8,
        prompts_per_iteration=4,
        iterations=1,
        epochs=1,
        micro_batch_size=4,
        eval_samples_per_prompt=1,
        prompts_per_batch=4,
    )
    base = raftlib.RAFTConfig.from_dict(
        hh_methods.raft_config(settings, train, 4, hh_methods.MethodRun("raft", 3e-3, 0), work)
    )
    sweeps = {"kl_coef": {0.0: (2, 1.0, 0.0), 0.1: (2, 1.0, 0.1)}}
    controls = {"kl_coef": (2, 1.0, 0.0)}
    configs = ablations.configs(base, sweeps, controls)
    runs = ablations.AblationRuns(settings, held_out, work, SEEDS)
    results, per_prompt = ablations.run_settings(configs, runs)
    names = {value: ablations.run_name(*s) for value, s in sweeps["kl_coef"].items()}
    return SimpleNamespace(
        configs=configs,
        runs=runs,
        work=work,
        held_out=held_out,
        results=results,
        per_prompt=per_prompt,
        controls=controls,
        rows=ablations.sweep_rows(results, "kl_coef", names),
    )


def test_run_settings_evaluates_every_run_and_the_sft_model_per_seed(sweep):
    results, per_prompt = sweep.results, sweep.per_prompt
    assert list(sweep.configs) == ["K2_T1_beta0", "K2_T1_beta0.1", "random_K2_T1_beta0"]
    assert list(zip(results["run"], results["seed"])) == [(r, s) for r in ["SFT", *sweep.configs] for s in SEEDS]
    sft = results[results["run"] == "SFT"]
    assert set(sft["selection"]) == {"none"} and sft["K"].isna().all()
    assert sft["eval_kl"].abs().max() < 1e-4  # the SFT model against itself
    raft = results[results["selection"] == "RAFT"]
    assert set(raft["K"]) == {2} and set(raft["kl_coef"]) == {0.0, 0.1} and (raft["minutes"] > 0).all()
    assert raft["start_best_of_k"].notna().all()  # RAFT ranks by the RM: its best-of-K is the RM's
    assert results.loc[results["selection"] == "random", "start_best_of_k"].isna().all()  # a hash's is not
    # one row per (run, seed, held-out prompt); with one sample per prompt a run's reward is its prompts' mean
    assert len(per_prompt) == len(results) * len(sweep.held_out)
    assert set(per_prompt["prompt"]) == {p.prompt_id for p in sweep.held_out}
    means = per_prompt.groupby(["method", "seed"])["proxy_reward"].mean()
    for row in results.itertuples():
        assert row.proxy_reward == pytest.approx(means[(row.run, row.seed)])
    # every run moved away from the SFT model it started from
    assert (raft.set_index(["run", "seed"])["eval_kl"].abs() > 1e-4).all()


def test_run_settings_reads_finished_runs_and_evaluations_back(sweep):
    class Untouchable(ablations.AblationRuns):
        def evaluate(self, model_dir, seed, label):
            raise AssertionError(f"evaluated {label} seed {seed} again")

    runs = Untouchable(sweep.runs.settings, sweep.held_out, sweep.work, SEEDS)
    results, per_prompt = ablations.run_settings(sweep.configs, runs)
    pd.testing.assert_frame_equal(results, sweep.results)
    pd.testing.assert_frame_equal(per_prompt, sweep.per_prompt)
    with pytest.raises(AssertionError, match="evaluated"):  # a seed not made yet is made (and evaluated)
        ablations.run_settings(sweep.configs, Untouchable(sweep.runs.settings, sweep.held_out, sweep.work, [2]))


def test_identical_runs_are_detected_from_the_kept_samples_and_called_so(sweep):
    rows, work = sweep.rows, sweep.work
    assert list(rows.columns[:2]) == ["kl_coef", "seed"] and list(rows["kl_coef"]) == [0.0, 0.0, 0.1, 0.1]
    overlap = ablations.kept_overlaps(rows, "kl_coef", work, "K2_T1_beta0")
    assert overlap["kept_overlap_with_beta0"].tolist() == [1.0] * 4
    identical = ablations.identical_pairs(rows, "kl_coef", work)
    assert identical == {(0.0, 0.1)}
    # the same samples kept, the same final model: every metric agrees seed by seed
    metrics = ["proxy_reward", "gold_reward", "perplexity", "distinct_2", "eval_kl"]
    by_beta = rows.set_index(["kl_coef", "seed"])[metrics]
    pd.testing.assert_frame_equal(by_beta.loc[0.0], by_beta.loc[0.1])
    unflagged = ablations.changes(rows, "kl_coef", "proxy_reward", ablations.PAPER["kl_coef"])
    assert unflagged.loc["kl_coef 0 → 0.1", "t"].as_tuple() == (0.0, 0.0, 0.0)
    assert unflagged.loc["kl_coef 0 → 0.1", "verdict"] == stats.NOT_RESOLVED
    table = ablations.changes(rows, "kl_coef", "proxy_reward", ablations.PAPER["kl_coef"], identical)
    assert table.loc["kl_coef 0 → 0.1", "verdict"] == stats.IDENTICAL
    [claim] = ablations.claims("Table 7", table, "proxy_reward", primary=table.index[0])
    assert claim.identical and claim.primary and claim.row()["verdict"] == stats.IDENTICAL
    assert claim.row()["detectable_at_80pct_power"] is None
    # RAFT against its control: other samples kept, so not identical
    against = ablations.sweep_rows(sweep.results, "selection", {0: "K2_T1_beta0", 1: "random_K2_T1_beta0"})
    assert ablations.identical_pairs(against, "selection", work) == set()
    assert (ablations.kept_overlaps(against, "selection", work, "K2_T1_beta0")["kept_overlap_with_beta0"] < 1).any()
    with pytest.raises(KeyError, match="no results for run"):
        ablations.sweep_rows(sweep.results, "kl_coef", {0.0: "K2_T1_beta0", 0.5: "K2_T1_beta0.5"})


def test_the_learning_rate_is_chosen_on_validation_prompts_within_the_perplexity_limit(sweep):
    # validation prompts: not the held-out ones (in the notebook they are also out of every run's training)
    rows = [json.loads(line) for line in (sweep.work.parent / "prompts.jsonl").read_text().splitlines()]
    validation = [
        Prompt(prompt_id=i, text=rows[i]["prompt"], columns={"reference": rows[i]["reference"]}) for i in (4, 5, 6)
    ]
    base = sweep.configs["K2_T1_beta0"]
    table = ablations.learning_rate_sweep(base, (2, 1.0), [3e-3], sweep.runs, validation)
    [row] = table.to_dict("records")
    assert (row["method"], row["learning_rate"], row["seed"], row["chosen"]) == ("raft", 3e-3, SEEDS[0], True)
    sft = json.loads((sweep.work / "lr_sweep" / "SFT.json").read_text())
    run = json.loads((sweep.work / "lr_sweep" / "lr_0.003" / f"seed_{SEEDS[0]}.json").read_text())
    assert {p["prompt"] for p in run["result"]["prompts"]} == {4, 5, 6}  # scored on validation, never held-out
    assert row["validation_reward"] == run["result"]["row"]["proxy_reward"]
    ratio = run["result"]["row"]["perplexity"] / sft["result"][0]["perplexity"]
    assert row["perplexity_over_sft"] == pytest.approx(ratio)
    assert row["admissible"] == (ratio <= hh_methods.MAX_VALIDATION_PERPLEXITY_RATIO)
    assert ablations.chosen_rate(table) == 3e-3
    again = ablations.learning_rate_sweep(base, (2, 1.0), [3e-3], sweep.runs, validation)  # read back, not rerun
    pd.testing.assert_frame_equal(again, table)


def test_control_table_pairs_raft_with_its_control_by_seed(sweep):
    results = sweep.results
    table = ablations.control_table(results, sweep.controls | {"K": (2, 1.0, 0.0)}, hh_data=False)
    assert list(table["metric"]) == ["proxy_reward", "gold_reward"]  # one control serving two sweeps: one row each
    assert set(table["setting"]) == {"K = 2, λ = 1, β = 0"} and set(table["run"]) == {"K2_T1_beta0"}
    assert set(table["serves sweeps"]) == {"kl_coef, K"}
    for row in table.itertuples():
        by_seed = results.set_index(["run", "seed"])[row.metric]
        differences = [by_seed[("K2_T1_beta0", s)] - by_seed[("random_K2_T1_beta0", s)] for s in SEEDS]
        assert row.t.as_tuple() == pytest.approx(stats.mean_ci(differences).as_tuple())
        assert row.n_seeds == 2 and row.t.method == "t" and row.verdict == stats.verdict(row.t, "up")
        assert row.ours == str(row.t)
    assert list(ablations.control_table(results, sweep.controls, hh_data=True)["metric"]) == ["proxy_reward"]
    claims = ablations.control_claims(table)
    assert [c.claim for c in claims] == [
        "RAFT above random selection at K = 2, λ = 1, β = 0, proxy reward",
        "RAFT above random selection at K = 2, λ = 1, β = 0, gold reward",
    ]
    assert {(c.table, c.direction, c.primary) for c in claims} == {("Tables 5-7: random controls", "up", False)}
    assert [c.interval for c in claims] == list(table["t"])


def test_sweep_table_starts_from_the_sft_row_with_the_papers_reward(sweep):
    summary = stats.summarize(sweep.rows, ablations.TABLE_METRICS, by="kl_coef")
    sft = sweep.results[sweep.results["run"] == "SFT"]
    table = ablations.with_sft_and_paper(summary, sft, ablations.PAPER["kl_coef"])
    assert list(table.index) == ["SFT (start)", 0.0, 0.1]
    assert table["paper final reward"].iloc[1:].tolist() == [2.143, 2.029] and math.isnan(
        table["paper final reward"].iloc[0]
    )
    assert table.loc["SFT (start)", "proxy_reward"] == str(stats.mean_ci(sft["proxy_reward"]))
    assert table.loc[0.0, "proxy_reward"] == table.loc[0.1, "proxy_reward"]  # identical runs
    assert table.loc["SFT (start)", "start_best_of_k"] == "—" and table["seeds"].tolist() == [2, 2, 2]
    assert "msttr_100" not in table  # 8-token completions have no 100-word window: the column is left out


def test_plot_sweeps_draws_the_papers_row_and_ours(sweep):
    metrics = {"proxy_reward": "proxy reward", "msttr_100": "MSTTR-100"}
    k_rows = _rows({8: [1.0, 1.2], 32: [1.5, 1.6]}).assign(msttr_100=np.nan)
    fig = ablations.plot_sweeps({"kl_coef": sweep.rows, "K": k_rows}, {"kl_coef": "β", "K": "K"}, metrics)
    axes = np.array(fig.axes).reshape(3, 2)
    assert axes[0, 0].get_title() == "paper: final reward by β" and axes[0, 1].get_title() == "paper: final reward by K"
    assert axes[0, 0].get_ylim()[0] == 0  # the paper's values on an axis from 0
    assert axes[1, 0].get_title() == "β: proxy reward" and axes[1, 1].get_title() == "K: proxy reward"
    assert not axes[2, 0].axison and not axes[2, 1].axison  # no MSTTR values: nothing to draw
    plt.close(fig)
    # settings the paper has no value for: no paper panel
    fig = ablations.plot_sweeps({"K": _rows({2: [1.0, 1.2], 4: [1.5, 1.6]})}, {"K": "K"}, {"proxy_reward": "proxy"})
    assert not fig.axes[0].axison and fig.axes[1].get_title() == "K: proxy"
    plt.close(fig)


def test_changes_and_controls_give_the_crossed_interval_over_seeds_and_prompts():
    """Beside each seed-level t-interval, the crossed seeds x prompts interval from the per-prompt rows: the same
    mean (a seed's value is the mean over its prompts) and never narrower; prompts that differ in how much a
    setting helps widen it, as a new draw of prompts would move the mean."""
    from raftsuite import stats

    rng = np.random.default_rng(0)
    prompt_effect = rng.normal(0, 0.5, 16)  # how much K 32 helps, prompt by prompt
    per_prompt = pd.DataFrame(
        [
            {"seed": seed, "method": f"K{k}", "prompt": prompt, "proxy_reward": base + (k == 32) * (0.3 + effect)}
            for seed in range(5)
            for prompt, effect in enumerate(prompt_effect)
            for k, base in ((8, rng.normal(seed / 10, 0.1)), (32, rng.normal(seed / 10, 0.1)))
        ]
    )
    rows = per_prompt.groupby(["method", "seed"], as_index=False)["proxy_reward"].mean()
    rows = rows.assign(K=rows["method"].str[1:].astype(int), run=rows["method"]).sort_values(["K", "seed"])
    table = ablations.changes(rows, "K", "proxy_reward", ablations.PAPER["K"], per_prompt=per_prompt)
    seeds, crossed = table.loc["K 8 → 32", "t"], table.loc["K 8 → 32", "crossed_interval"]
    expected = stats.crossed_paired_difference(
        per_prompt.pivot_table(index=["seed", "prompt"], columns="method", values="proxy_reward").reset_index(),
        "K32",
        "K8",
    )
    assert crossed == str(expected) and expected.mean == pytest.approx(seeds.mean)
    assert expected.high - expected.low > 1.5 * (seeds.high - seeds.low)  # the prompts' spread counts
    assert ablations.changes(rows, "K", "proxy_reward", ablations.PAPER["K"]).loc["K 8 → 32", "crossed_interval"] == "—"
    controls = per_prompt.replace({"method": {"K32": "random_K8_T0.85_beta0", "K8": "K8_T0.85_beta0"}})
    results = (
        controls.groupby(["method", "seed"], as_index=False)["proxy_reward"].mean().rename(columns={"method": "run"})
    )
    control = ablations.control_table(results, {"K": (8, 0.85, 0.0)}, True, controls)
    assert control.loc[0, "crossed_interval"] == str(
        stats.crossed_between(controls, "K8_T0.85_beta0", "random_K8_T0.85_beta0", "proxy_reward")
    )
    assert control.loc[0, "ours"].startswith(f"{-seeds.mean:.3f}")
