"""The ablations' seeded tables: settings as config overrides, held-out prompts kept out of every seed's training,
paired changes along a sweep and against the random-selection control, verdicts from intervals (hand-computed)."""

import json
import math

import pandas as pd
import pytest

import raftlib
from raftlib.data import Prompt
from raftsuite import ablations, stats


def _rows(values: dict[float, list[float]], sweep: str = "K") -> pd.DataFrame:
    """One row per (setting, seed): values[setting][i] is seed i's final reward."""
    return pd.DataFrame(
        [
            {sweep: setting, "seed": seed, "run": f"{sweep}{setting}", "proxy_reward": value}
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


def test_train_only_prompts_drops_exactly_the_held_out_rows(tmp_path):
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"p{i}", "reference": f"r{i}"}) + "\n" for i in range(6)))
    held_out = [Prompt(prompt_id=1, text="p1"), Prompt(prompt_id=4, text="p4")]
    path = ablations.train_only_prompts(source, held_out, tmp_path / "work" / "train.jsonl")
    assert [json.loads(line)["prompt"] for line in path.read_text().splitlines()] == ["p0", "p2", "p3", "p5"]
    assert ablations.train_only_prompts(source, held_out, path) == path  # written again: same content
    with pytest.raises(ValueError, match="2 held-out prompts but 1 rows"):
        ablations.train_only_prompts(source, [Prompt(prompt_id=1, text="p1"), Prompt(0, "not there")], path)


def test_changes_are_paired_by_seed_with_verdicts_against_the_paper():
    # seed by seed: K16 - K8 = 0.1, 0.2, 0.3; K32 - K8 = 0.2, 0.3, 0.4; K32 - K16 = 0.1, 0.1, 0.1
    rows = _rows({8: [0.0, 1.0, 2.0], 16: [0.1, 1.2, 2.3], 32: [0.2, 1.3, 2.4]})
    table = ablations.changes(rows, "K", "proxy_reward", ablations.PAPER["K"])
    assert list(table.index) == ["K 8 → 32", "K 8 → 16", "K 16 → 32"]
    first = table.loc["K 8 → 32"]
    # 3 seeds: the percentile interval is the per-seed differences' [min, max]; the unpaired means' ranges overlap
    assert (first["mean"], first["ci95_low"], first["ci95_high"]) == pytest.approx((0.3, 0.2, 0.4))
    assert first["n_seeds"] == 3 and first["paper_change"] == pytest.approx(2.329 - 2.180)
    assert first["verdict"] == stats.REPRODUCES
    assert table.loc["K 16 → 32", "ci95_low"] == pytest.approx(0.1)  # every seed agrees: a zero-width interval
    falling = ablations.changes(
        _rows({8: [1.0, 2.0, 3.0], 32: [0.5, 1.6, 2.9]}), "K", "proxy_reward", ablations.PAPER["K"]
    )
    assert falling.loc["K 8 → 32", "verdict"] == stats.OPPOSITE
    mixed = ablations.changes(
        _rows({8: [1.0, 2.0, 3.0], 32: [1.5, 1.6, 3.1]}), "K", "proxy_reward", ablations.PAPER["K"]
    )
    assert mixed.loc["K 8 → 32", "verdict"] == stats.NOT_RESOLVED
    # the paper's Table 7 falls: a fall here reproduces it; identical runs (beta too small to flip a choice) do not
    beta = ablations.changes(
        _rows({0.0: [0.5, 0.6, 0.7], 0.005: [0.5, 0.6, 0.7], 0.1: [0.4, 0.5, 0.65]}, "kl_coef"),
        "kl_coef",
        "proxy_reward",
        ablations.PAPER["kl_coef"],
    )
    assert beta.loc["kl_coef 0 → 0.1", "verdict"] == stats.REPRODUCES
    assert beta.loc["kl_coef 0 → 0.005", "verdict"] == stats.NOT_RESOLVED  # [0, 0] touches 0
    beta_rows = _rows({0.0: [0.5, 0.6, 0.7], 0.005: [0.5, 0.6, 0.7], 0.1: [0.4, 0.5, 0.65]}, "kl_coef")
    sentence = ablations.change_sentence(
        "kl_coef", "β", beta, stats.summarize(beta_rows, ["proxy_reward"], by="kl_coef"), ablations.PAPER["kl_coef"]
    )
    assert sentence == (
        "β = 0 / 0.005 / 0.1: the paper's final reward falls (2.143 / 2.087 / 2.029); ours (mean over 3 seed(s)) "
        "0.600 / 0.600 / 0.517, last − first -0.083 [-0.100, -0.050] → **reproduces**."
    )


def test_one_seed_gives_no_interval_and_no_verdict():
    table = ablations.changes(_rows({8: [1.0], 32: [2.0]}), "K", "proxy_reward", ablations.PAPER["K"])
    row = table.loc["K 8 → 32"]
    assert row["mean"] == pytest.approx(1.0) and math.isnan(row["ci95_low"]) and row["n_seeds"] == 1
    assert row["verdict"] == stats.NOT_RESOLVED
    assert (
        "no paper value" in ablations.changes(_rows({2: [1.0], 4: [2.0]}), "K", "proxy_reward", {}).iloc[0]["verdict"]
    )


def test_control_difference_is_raft_minus_random_by_seed():
    results = pd.DataFrame(
        {
            "run": ["K8", "K8", "K8", "random_K8", "random_K8", "random_K8"],
            "seed": [0, 1, 2, 2, 0, 1],  # listed in another order: paired by seed, not by position
            "proxy_reward": [0.5, 0.7, 0.9, 0.6, 0.1, 0.2],
        }
    )
    interval = ablations.control_difference(results, "K8", "random_K8")
    assert interval.as_tuple() == pytest.approx((0.4, 0.3, 0.5))  # per seed 0.4, 0.5, 0.3
    assert "**reproduces**" in ablations.control_sentence("K8", interval)
    with pytest.raises(ValueError, match="only one of the two"):
        ablations.control_difference(results[results["seed"] != 1].iloc[1:], "K8", "random_K8")
