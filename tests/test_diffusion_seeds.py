"""The diffusion notebooks' seeds and control: the random-selection reward, the matched control run, held-out
re-scoring with the real reward, and the paired changes with their verdicts (hand-computed). No network."""

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raftlib import run
from raftlib.config import RewardSection
from raftlib.diffusion import DiffusionConfig
from raftlib.diffusion import testing as T
from raftlib.rewards import build_reward
from raftlib.store import RunStore
from raftsuite import images, stats


def brightness(images_: list, prompts: list[str], **columns) -> list[float]:
    """The 'real' reward of these tests: mean pixel value in [0, 1]."""
    return [float(np.asarray(i, dtype=np.float64).mean() / 255.0) for i in images_]


def _image(value: int) -> Image.Image:
    return Image.fromarray(np.full((8, 8), value, dtype=np.uint8))


def test_random_reward_is_a_uniform_hash_of_pixels_and_prompt_not_of_quality():
    pictures = [_image(v) for v in range(0, 250, 10)]
    values = images.random_reward(pictures, ["a digit 1"] * len(pictures))
    assert all(0.0 <= v < 1.0 for v in values) and len(set(values)) == len(values)
    assert images.random_reward(pictures, ["a digit 1"] * len(pictures)) == values  # deterministic: resume-safe
    assert images.random_reward(pictures[:1], ["a digit 2"]) != values[:1]  # the prompt is part of the hash
    # not a function of brightness: the ranking by the random value is not the ranking by the pixel value
    assert sorted(range(len(values)), key=values.__getitem__) != list(range(len(values)))
    with pytest.raises(ValueError):
        images.random_reward(pictures, ["one prompt"])


def test_seed_zero_keeps_the_single_seed_run_directory():
    assert [images.run_name("RAFT", s) for s in (0, 1, 2)] == ["raft", "raft_seed1", "raft_seed2"]
    assert images.run_name("random selection", 0) == "random"
    assert images.run_name("random selection", 3) == "random_seed3"
    with pytest.raises(ValueError, match="arm must be one of"):
        images.run_name("GRPO", 0)


def _rows() -> pd.DataFrame:
    """3 seeds x 2 arms x iterations 0 and 2, two measures; the base model (iteration 0) is shared by arms."""
    before = {0: (1.0, 10.0), 1: (2.0, 12.0), 2: (3.0, 11.0)}
    after = {  # (arm, seed): (reward, distance)
        ("RAFT", 0): (2.0, 9.0), ("RAFT", 1): (4.0, 10.0), ("RAFT", 2): (6.0, 10.0),
        ("random selection", 0): (1.5, 11.0), ("random selection", 1): (2.0, 11.0),
        ("random selection", 2): (3.5, 10.0),
    }  # fmt: skip
    rows = []
    for (arm, seed), (reward, distance) in after.items():
        rows.append({"arm": arm, "seed": seed, "iteration": 0, "eval_reward": before[seed][0],
                     "frechet_distance": before[seed][1]})  # fmt: skip
        rows.append({"arm": arm, "seed": seed, "iteration": 2, "eval_reward": reward, "frechet_distance": distance})
    return pd.DataFrame(rows)


def test_changes_are_paired_by_seed_and_verdicts_follow_the_intervals():
    per_seed = images.changes(_rows(), ["eval_reward", "frechet_distance"], first=0, last=2)
    assert len(per_seed) == 2 * 3 * 3  # measures x comparisons x seeds
    pick = per_seed.set_index(["measure", "comparison", "seed"])["change"]
    # RAFT after - before: 2-1, 4-2, 6-3; random: 0.5, 0, 0.5; RAFT - random at iteration 2: 0.5, 2, 2.5
    assert [pick[("eval_reward", images.BEFORE_AFTER, s)] for s in (0, 1, 2)] == [1.0, 2.0, 3.0]
    assert [pick[("eval_reward", images.CONTROL_BEFORE_AFTER, s)] for s in (0, 1, 2)] == [0.5, 0.0, 0.5]
    assert [pick[("eval_reward", images.AGAINST_CONTROL, s)] for s in (0, 1, 2)] == [0.5, 2.0, 2.5]
    summary = images.change_summary(per_seed, {"eval_reward": "up"})
    # with 3 seeds the 95 % percentile interval is [min, max] (docs/statistics.md)
    row = summary.loc[("eval_reward", images.BEFORE_AFTER)]
    assert (row.change, row.change_ci95_low, row.change_ci95_high, row.n_seeds) == pytest.approx((2.0, 1.0, 3.0, 3))
    assert row.verdict == stats.REPRODUCES and row.expected == "up"
    assert summary.loc[("eval_reward", images.CONTROL_BEFORE_AFTER), "verdict"] == stats.NOT_RESOLVED  # touches 0
    assert summary.loc[("eval_reward", images.AGAINST_CONTROL), "verdict"] == stats.REPRODUCES
    # no claimed direction: read as rises / falls; RAFT's distance -1, -2, -1 falls; RAFT - random -2, -1, 0 holds 0
    assert summary.loc[("frechet_distance", images.BEFORE_AFTER), "verdict"] == "falls"
    assert summary.loc[("frechet_distance", images.AGAINST_CONTROL), "verdict"] == stats.NOT_RESOLVED
    assert summary.loc[("frechet_distance", images.BEFORE_AFTER), "expected"] == ""
    assert images.interval_of(summary, "eval_reward", images.BEFORE_AFTER) == stats.Interval(2.0, 1.0, 3.0, 3)
    text = images.verdict(summary)
    assert "2.000 [1.000, 3.000] (3 seeds; reproduces)" in text
    assert "moved toward the real digits" in text  # reward reproduces and the distance falls
    table = images.change_table(summary)
    assert table.loc[(images.MEASURES["eval_reward"], images.BEFORE_AFTER), "change"] == "2.000 [1.000, 3.000]"


def test_one_seed_gives_no_interval_and_no_verdict():
    rows = _rows()
    per_seed = images.changes(rows[rows.seed == 0], ["eval_reward"], first=0, last=2)
    summary = images.change_summary(per_seed, {"eval_reward": "up"})
    assert set(summary["verdict"]) == {stats.NOT_RESOLVED}
    assert "no interval: one seed" in images.change_table(summary).iloc[0]["change"]


@pytest.fixture(scope="module")
def matched_runs(tmp_path_factory):
    """A RAFT run under the brightness reward and its random-selection control, same seed, one iteration."""
    from raftsuite.digits import write_prompts

    root = tmp_path_factory.mktemp("control")
    model = T.build_class_conditional(root / "model")
    prompts = write_prompts(root / "digits.jsonl", per_digit=2)

    def config(arm: str, reward: dict) -> DiffusionConfig:
        return DiffusionConfig.from_dict({
            "model": {"path": str(model)},
            "data": {"prompts": str(prompts), "eval_prompts": 6},
            "generation": {"samples_per_prompt": 3, "num_inference_steps": 3, "prompts_per_batch": 4},
            "reward": reward,
            "training": {"learning_rate": 1e-2, "epochs": 1, "micro_batch_size": 4},
            "loop": {"iterations": 1, "prompts_per_iteration": 8, "eval_samples_per_prompt": 2},
            "logging": {"tensorboard": False, "progress_bars": False},
            "seed": 3,
            "output_dir": str(root / images.run_name(arm, 3)),
        })  # fmt: skip

    real = {"fn": f"{__name__}:brightness"}
    raft = run(config("RAFT", real)).run_dir
    control = run(config("random selection", {"fn": "raftsuite.images:random_reward"})).run_dir
    return raft, control, build_reward(RewardSection(fn=real["fn"]))


def test_the_control_draws_the_same_images_and_keeps_as_many_at_random(matched_runs):
    raft, control, _ = matched_runs
    a = pq.read_table(raft / "iter_0001" / "samples.parquet").to_pylist()
    b = pq.read_table(control / "iter_0001" / "samples.parquet").to_pylist()
    # the same base model, prompts and image seeds: the same candidates; only the choice differs
    assert [(r["prompt_id"], r["seed"], r["image_png"]) for r in a] == [
        (r["prompt_id"], r["seed"], r["image_png"]) for r in b
    ]
    assert sum(r["kept"] for r in a) == sum(r["kept"] for r in b) == 8  # one per prompt in both arms
    assert [r["kept"] for r in a] != [r["kept"] for r in b]  # 8 prompts x 3: random picks differ somewhere
    # RAFT kept the brightest of each prompt's three; the control's pick is its hash's
    by_prompt = {}
    for row in a:
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    assert all(max(group, key=lambda r: r["reward"])["kept"] for group in by_prompt.values())


def test_held_out_measures_re_score_both_arms_with_the_real_reward(matched_runs):
    raft, control, real = matched_runs
    logged = {row["iteration"]: row["eval_reward_mean"] for row in RunStore(raft).read_metrics()}
    rescored = images.heldout_rewards(raft, real)
    assert rescored == pytest.approx(logged)  # for RAFT the re-scoring is the loop's own number
    control_logged = {row["iteration"]: row["eval_reward_mean"] for row in RunStore(control).read_metrics()}
    control_rescored = images.heldout_rewards(control, real)
    assert control_rescored[0] == pytest.approx(rescored[0])  # the same base model, prompts and image seeds
    assert control_logged[0] != pytest.approx(control_rescored[0])  # its own number is the random reward's
    rows = images.measure_runs({"RAFT": {3: raft}, "random selection": {3: control}}, real)
    assert list(rows.columns) == ["arm", "seed", "iteration", "eval_reward", "diversity"]
    assert len(rows) == 4 and rows.loc[rows.iteration == 0, "diversity"].nunique() == 1
    assert Path(raft).name == "raft_seed3" and Path(control).name == "random_seed3"
