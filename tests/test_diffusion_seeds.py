"""The diffusion notebooks' seeds and control (raftsuite.images, raftsuite.sd): the random-selection reward, RAFT and
its matched control made from one config (`sd.config_dict`, `sd.run_arms`) with the tiny digit models, held-out
re-scoring per image with the real reward, per-prompt-text measures, paired changes with Student-t intervals over
seeds (df = n - 1, hand-computed) and the crossed seeds x prompt-texts interval, and the claims. No network."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raftlib.config import load_config
from raftlib.data import load_prompts
from raftlib.diffusion import DiffusionConfig
from raftlib.rewards import build_reward
from raftlib.store import RunStore
from raftsuite import images, sd, stats

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "assets" / "tiny-digits"
T975 = {1: 12.706204736174694, 2: 4.302652729749462}  # Student-t 0.975 quantiles, df = 1, 2
T80 = {2: 1.0606601717798214}  # the 0.80 quantile, df = 2 (detectable effect at 80 % power)


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


def test_the_committed_real_digits_are_the_ones_the_build_recorded_and_split_disjointly():
    import hashlib

    from raftsuite import digits

    recorded = json.loads((TINY / "BUILD.json").read_text())["data_file"]
    data = TINY / recorded["file"]
    assert hashlib.sha256(data.read_bytes()).hexdigest() == recorded["sha256"]
    everything, labels = digits.real_digits("all", data)
    assert everything.shape == (1797, 8, 8) and everything.dtype == np.uint8
    assert set(np.unique(everything)) <= {round(v / 16 * 255) for v in range(17)}  # 0-16 scaled to 0-255
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # load_digits' classes
    held_x, _ = digits.real_digits("heldout", data)
    train_x, _ = digits.real_digits("train", data)
    assert len(held_x) == digits.HELD_OUT and len(held_x) + len(train_x) == len(everything)
    as_rows = lambda images: sorted(image.tobytes() for image in images)  # noqa: E731
    assert as_rows(np.concatenate([held_x, train_x])) == as_rows(everything)  # a split of the same images


def test_missing_real_digits_name_the_file_and_the_command_that_writes_them(tmp_path):
    from raftsuite import digits

    with pytest.raises(FileNotFoundError, match=r"real-digits\.safetensors.*make tiny-digits"):
        digits.real_digits("heldout", tmp_path / digits.DATA_FILE)


def test_the_suite_environment_leaves_scikit_learn_out():
    # installed, transformers imports it in every process (1.6 s each here); only `make tiny-digits` needs it
    import re
    import subprocess
    import sys

    listed = subprocess.run(
        [sys.executable, "tools/requirements_from_env.py", "environment.yml"], cwd=ROOT, capture_output=True, text=True
    )
    names = [re.split(r"[<>=!~ ]", line, maxsplit=1)[0].lower() for line in listed.stdout.split()]
    assert listed.returncode == 0 and "transformers" in names and "scikit-learn" not in names


def test_seed_zero_keeps_the_single_seed_run_directory():
    assert [images.run_name("RAFT", s) for s in (0, 1, 2)] == ["raft", "raft_seed1", "raft_seed2"]
    assert images.run_name("random selection", 0) == "random"
    assert images.run_name("random selection", 3) == "random_seed3"
    with pytest.raises(ValueError, match="arm must be one of"):
        images.run_name("GRPO", 0)


# ----------------------------------------------------------------------------------------------
# Paired changes and their t-intervals, hand-computed
# ----------------------------------------------------------------------------------------------


def _rows() -> pd.DataFrame:
    """3 seeds x 2 arms x iterations 0 and 2, two measures; the base model (iteration 0) is shared by arms.

    Per seed: RAFT after - before reward 1.0, 1.2, 1.1; random 0.2, 0.3, 0.1; RAFT - random (after) 0.8, 0.9, 1.0.
    Distance: RAFT after - before -1.0, -1.2, -1.1; RAFT - random (after) -2.0, -0.2, -0.1.
    """
    before = {0: (1.0, 10.0), 1: (2.0, 12.0), 2: (3.0, 11.0)}
    after = {  # (arm, seed): (reward, distance)
        ("RAFT", 0): (2.0, 9.0),
        ("RAFT", 1): (3.2, 10.8),
        ("RAFT", 2): (4.1, 9.9),
        ("random selection", 0): (1.2, 11.0),
        ("random selection", 1): (2.3, 11.0),
        ("random selection", 2): (3.1, 10.0),
    }
    rows = []
    for (arm, seed), (reward, distance) in after.items():
        rows.append(
            {
                "arm": arm,
                "seed": seed,
                "iteration": 0,
                "eval_reward": before[seed][0],
                "frechet_distance": before[seed][1],
            }
        )
        rows.append({"arm": arm, "seed": seed, "iteration": 2, "eval_reward": reward, "frechet_distance": distance})
    return pd.DataFrame(rows)


def _t(mean: float, sd: float, n: int) -> tuple[float, float, float]:
    half = T975[n - 1] * sd / math.sqrt(n)
    return (mean, mean - half, mean + half)


def test_changes_are_paired_by_seed_and_verdicts_follow_the_t_intervals():
    per_seed = images.changes(_rows(), ["eval_reward", "frechet_distance"], first=0, last=2)
    assert len(per_seed) == 2 * 3 * 3  # measures x comparisons x seeds
    pick = per_seed.set_index(["measure", "comparison", "seed"])["change"]
    assert [pick[("eval_reward", images.BEFORE_AFTER, s)] for s in (0, 1, 2)] == pytest.approx([1.0, 1.2, 1.1])
    assert [pick[("eval_reward", images.CONTROL_BEFORE_AFTER, s)] for s in (0, 1, 2)] == pytest.approx([0.2, 0.3, 0.1])
    assert [pick[("eval_reward", images.AGAINST_CONTROL, s)] for s in (0, 1, 2)] == pytest.approx([0.8, 0.9, 1.0])

    summary = images.change_summary(per_seed, {"eval_reward": "up"})
    assert list(summary.columns) == [
        "change",
        "n_seeds",
        "crossed_interval",
        "detectable_at_80pct_power",
        "expected",
        "verdict",
        "t",
    ]
    # 1.0, 1.2, 1.1: mean 1.1, sd 0.1, t(0.975, df 2) = 4.303: 1.1 +- 0.248
    raft = images.interval_of(summary, "eval_reward", images.BEFORE_AFTER)
    assert isinstance(raft, stats.Interval) and raft.method == "t" and raft.n == 3
    assert raft.as_tuple() == pytest.approx(_t(1.1, 0.1, 3)) and raft.sd == pytest.approx(0.1)
    row = summary.loc[("eval_reward", images.BEFORE_AFTER)]
    assert row.change == "1.100 [0.852, 1.348]" and row.n_seeds == 3 and row.expected == "up"
    assert row.verdict == stats.REPRODUCES and row.crossed_interval == "—"  # no per-prompt frame given
    assert row.detectable_at_80pct_power == pytest.approx((T975[2] + T80[2]) * 0.1 / math.sqrt(3))
    # the control's 0.2, 0.3, 0.1 are all above 0, yet their t-interval [-0.048, 0.448] holds it (a percentile
    # bootstrap over 3 seeds, their [min, max], would have called this a rise)
    control = images.interval_of(summary, "eval_reward", images.CONTROL_BEFORE_AFTER)
    assert control.as_tuple() == pytest.approx(_t(0.2, 0.1, 3)) and control.low < 0 < control.high
    assert summary.loc[("eval_reward", images.CONTROL_BEFORE_AFTER), "verdict"] == stats.NOT_RESOLVED
    against = images.interval_of(summary, "eval_reward", images.AGAINST_CONTROL)
    assert against.as_tuple() == pytest.approx(_t(0.9, 0.1, 3))
    assert summary.loc[("eval_reward", images.AGAINST_CONTROL), "verdict"] == stats.REPRODUCES
    # no claimed direction: read as rises / falls; RAFT's distance -1.0, -1.2, -1.1 falls; RAFT - random holds 0
    assert summary.loc[("frechet_distance", images.BEFORE_AFTER), "verdict"] == "falls"
    assert summary.loc[("frechet_distance", images.BEFORE_AFTER), "expected"] == ""
    assert summary.loc[("frechet_distance", images.AGAINST_CONTROL), "verdict"] == stats.NOT_RESOLVED
    # a claimed direction the data go against
    claimed_up = images.change_summary(per_seed, {"frechet_distance": "up"})
    assert claimed_up.loc[("frechet_distance", images.BEFORE_AFTER), "verdict"] == stats.OPPOSITE
    assert claimed_up.loc[("eval_reward", images.BEFORE_AFTER), "verdict"] == "rises"

    text = images.verdict(summary)
    assert "RAFT after − before 1.100 [0.852, 1.348] (3 seeds; reproduces)" in text
    assert "random selection after − before 0.200 [-0.048, 0.448] (3 seeds; not resolved at this sample size)" in text
    assert "moved toward the real digits" in text  # the reward reproduces and the distance falls
    table = images.change_table(summary)
    assert "t" not in table and table.loc[(images.MEASURES["eval_reward"], images.BEFORE_AFTER), "change"] == row.change
    assert table.loc[(images.MEASURES["frechet_distance"], images.BEFORE_AFTER), "expected"] == "—"


def test_two_seeds_use_df_1_and_a_distance_that_rises_reads_as_fewer_modes():
    rows = _rows()
    two = images.change_summary(images.changes(rows[rows.seed < 2], ["eval_reward"], 0, 2), {"eval_reward": "up"})
    # 1.0, 1.2: t(0.975, df 1) = 12.71, not the normal 1.96 (which would give [0.90, 1.30] and "reproduces")
    interval = images.interval_of(two, "eval_reward", images.BEFORE_AFTER)
    assert interval.as_tuple() == pytest.approx(_t(1.1, math.sqrt(0.02), 2)) and interval.n == 2
    assert two.loc[("eval_reward", images.BEFORE_AFTER), "verdict"] == stats.NOT_RESOLVED
    # reward up, Fréchet distance up and diversity down: the reading names concentration on fewer modes
    flipped = rows.assign(frechet_distance=-rows["frechet_distance"], diversity=rows["frechet_distance"])
    summary = images.change_summary(
        images.changes(flipped, ["eval_reward", "frechet_distance", "diversity"], 0, 2), {"eval_reward": "up"}
    )
    assert summary.loc[("frechet_distance", images.BEFORE_AFTER), "verdict"] == "rises"
    assert summary.loc[("diversity", images.BEFORE_AFTER), "verdict"] == "falls"
    assert "concentrated on fewer modes" in images.verdict(summary)


def test_one_seed_gives_no_interval_and_no_verdict():
    rows = _rows()
    per_seed = images.changes(rows[rows.seed == 0], ["eval_reward"], first=0, last=2)
    summary = images.change_summary(per_seed, {"eval_reward": "up"})
    assert set(summary["verdict"]) == {stats.NOT_RESOLVED} and set(summary["n_seeds"]) == {1}
    interval = images.interval_of(summary, "eval_reward", images.BEFORE_AFTER)
    assert interval.method == "none" and interval.mean == 1.0 and math.isnan(interval.low)
    assert interval.label == "no interval: n = 1"
    assert summary["detectable_at_80pct_power"].isna().all()
    assert images.change_table(summary).iloc[0]["change"] == "1.000 [one seed: no interval]"
    assert "(1 seed; not resolved at this sample size)" in images.verdict(summary)


def test_the_crossed_interval_counts_seeds_and_prompt_texts():
    """Two seeds hold out different prompt rows of the same texts: keyed by text, every seed scores every prompt."""
    texts = ["a handwritten digit 1", "a handwritten digit 4"]
    values = {  # (arm, iteration, seed, text): mean reward of that text's images
        **{("RAFT", 0, s, t): 0.0 for s in (0, 1) for t in texts},
        **{("random selection", 0, s, t): 0.0 for s in (0, 1) for t in texts},
        ("RAFT", 1, 0, texts[0]): 0.6,
        ("RAFT", 1, 0, texts[1]): 0.2,
        ("RAFT", 1, 1, texts[1]): 0.5,
        ("RAFT", 1, 1, texts[0]): 0.3,  # listed in another order
        ("random selection", 1, 0, texts[0]): 0.1,
        ("random selection", 1, 0, texts[1]): 0.1,
        ("random selection", 1, 1, texts[0]): 0.2,
        ("random selection", 1, 1, texts[1]): 0.0,
    }
    per_prompt = pd.DataFrame(
        [
            {"arm": a, "seed": s, "iteration": i, "prompt": t, "images": 2, "eval_reward": v}
            for (a, i, s, t), v in values.items()
        ]
    )
    rows = per_prompt.groupby(["arm", "seed", "iteration"], as_index=False)["eval_reward"].mean()
    summary = images.change_summary(images.changes(rows, ["eval_reward"], 0, 1), {}, per_prompt, first=0, last=1)
    # RAFT - random after: seed 0 (0.5, 0.1), seed 1 (0.1, 0.5) by text: mean 0.3
    expected = stats.crossed_paired_difference(
        pd.DataFrame(
            {"seed": [0, 0, 1, 1], "prompt": [0, 1, 0, 1], "ours": [0.5, 0.1, 0.1, 0.5], "baseline": [0.0] * 4}
        ),
        "ours",
        "baseline",
    )
    assert expected.mean == pytest.approx(0.3) and expected.n == 2 and expected.method == "crossed t"
    assert summary.loc[("eval_reward", images.AGAINST_CONTROL), "crossed_interval"] == str(expected)
    # both seeds' means agree (0.3, 0.3): the seed-level t-interval has zero width; the crossed one, which counts
    # the (seed, prompt) residual variance too, does not
    assert images.interval_of(summary, "eval_reward", images.AGAINST_CONTROL).as_tuple() == pytest.approx((0.3,) * 3)
    assert expected.high - expected.low > 0.1
    # a text one seed did not score (each seed holds out its own rows) leaves the crossed table: the interval is
    # over the texts every seed scored
    missing = per_prompt[~((per_prompt["seed"] == 1) & (per_prompt["prompt"] == texts[1]))]
    fewer = images.change_summary(images.changes(rows, ["eval_reward"], 0, 1), {}, missing, 0, 1)
    only_first = stats.crossed_paired_difference(
        pd.DataFrame({"seed": [0, 1], "prompt": [0, 0], "ours": [0.5, 0.1], "baseline": [0.0, 0.0]}), "ours", "baseline"
    )
    assert fewer.loc[("eval_reward", images.AGAINST_CONTROL), "crossed_interval"] == str(only_first)


# ----------------------------------------------------------------------------------------------
# The notebooks' steps (raftsuite.sd), made for real with the tiny digit models
# ----------------------------------------------------------------------------------------------


def _parameters(prompts: Path, **changes) -> dict:
    """The notebooks' parameters, tiny profile, shrunk to a few seconds a run."""
    return {
        "model": str(TINY / "noisy-labels"),
        "model_kind": "auto",
        "dtype": "auto",
        "lora_rank": 0,
        "prompts": str(prompts),
        "eval_prompts": 6,
        "samples_per_prompt": 3,
        "num_inference_steps": 3,
        "guidance_scale": 1.0,
        "scheduler": "default",
        "height": 0,
        "width": 0,
        "prompts_per_batch": 4,
        "decode_batch_size": 8,
        "max_kept": 0,
        "learning_rate": 1e-3,
        "lr_scheduler": "linear",
        "epochs": 1,
        "micro_batch_size": 4,
        "mixed_precision": "no",
        "gradient_checkpointing": False,
        "iterations": 1,
        "prompts_per_iteration": 4,
        "eval_samples_per_prompt": 2,
        "show_progress": False,
        "classifier": str(TINY / "classifier.safetensors"),
        "quality_scorer": str(TINY / "quality.safetensors"),
        "clip_model": "",
        "seeds": [0, 1],
        "num_processes": 1,
        "accelerate_config": "",
    } | changes


@pytest.fixture(scope="module")
def arms(tmp_path_factory):
    """The alignment notebook's runs: RAFT and its control for seeds 0 and 1 (one iteration), and their measures.

    12 prompt rows of 3 texts; each seed holds out 6 rows of its own, so prompt texts repeat within a seed's
    held-out set and the two seeds' held-out rows differ while their texts are shared.
    """
    root = tmp_path_factory.mktemp("arms")
    prompts = root / "digits.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"a handwritten digit {d}", "label": d}) + "\n" for _ in range(4) for d in (1, 4, 7)
        )
    )
    p, task = _parameters(prompts), sd.TASKS["alignment"]
    runs, minutes = sd.run_arms(task, p, root / "work", root / "out")
    real = build_reward(DiffusionConfig.from_dict(sd.config_dict(task, p, 0, "RAFT", root / "work")).reward)
    rows, per_prompt = images.measure_runs(runs, real, TINY / "classifier.safetensors")
    return SimpleNamespace(
        p=p,
        task=task,
        work=root / "work",
        out=root / "out",
        runs=runs,
        minutes=minutes,
        real=real,
        rows=rows,
        per_prompt=per_prompt,
    )


def test_config_dict_makes_the_control_from_the_raft_config_by_its_reward_alone(tmp_path):
    prompts = tmp_path / "p.jsonl"
    for name, tiny_reward in (
        ("alignment", "classifier_probability"),
        ("resolution", "raftsuite.digits:quality_reward"),
    ):
        task, p = sd.TASKS[name], _parameters(prompts)
        raft, control = (
            sd.config_dict(task, p, 2, "RAFT", tmp_path),
            sd.config_dict(task, p, 2, "random selection", tmp_path),
        )
        assert {k for k in raft if raft[k] != control[k]} == {"reward", "output_dir"}
        assert raft["reward"]["fn"] == tiny_reward and control["reward"] == sd.CONTROL_REWARD
        assert (raft["output_dir"], control["output_dir"]) == (
            str(tmp_path / "raft_seed2"),
            str(tmp_path / "random_seed2"),
        )
        assert raft["seed"] == 2 and raft["reward"] == sd.reward_section(task, p)[0]
        other_seed = sd.config_dict(task, p, 0, "RAFT", tmp_path)
        assert {k for k in raft if raft[k] != other_seed[k]} == {"seed", "output_dir"}
    # the tiny alignment reward scores the prompted digit with the classifier; with a CLIP model: the CLIP score
    assert raft["reward"]["args"] == {"path": p["quality_scorer"]}
    alignment = sd.config_dict(sd.TASKS["alignment"], p, 0, "RAFT", tmp_path)["reward"]
    assert (
        alignment["args"]["classifier_args"] == {"path": p["classifier"]}
        and alignment["args"]["label_column"] == "label"
    )
    clip = _parameters(prompts, clip_model="openai/clip", reward_batch_size=8, reward_dtype="float32")
    assert not sd.is_tiny(clip) and sd.is_tiny(p)
    assert sd.config_dict(sd.TASKS["alignment"], clip, 0, "RAFT", tmp_path)["reward"] == {
        "fn": "clip_score",
        "args": {"clip": "openai/clip", "batch_size": 8, "dtype": "float32"},
    }
    assert sd.config_dict(sd.TASKS["alignment"], clip, 0, "random selection", tmp_path)["reward"] == sd.CONTROL_REWARD


def test_run_arms_runs_each_config_and_the_control_keeps_as_many_images_at_random(arms):
    assert {arm: {s: Path(d).name for s, d in by_seed.items()} for arm, by_seed in arms.runs.items()} == {
        "RAFT": {0: "raft", 1: "raft_seed1"},
        "random selection": {0: "random", 1: "random_seed1"},
    }
    assert sorted(zip(arms.minutes.arm, arms.minutes.seed)) == sorted((a, s) for a in images.ARMS for s in (0, 1))
    assert (arms.minutes.wall_minutes > 0).all()
    stages = json.loads((arms.out / "stages.json").read_text())
    assert list(stages) == ["RAFT (2 seeds)", "random selection (2 seeds)"]  # one timed stage per arm
    for arm in images.ARMS:  # each run is the config config_dict gave
        for seed in (0, 1):
            written = load_config(Path(arms.runs[arm][seed]) / "config.yaml")
            assert written == DiffusionConfig.from_dict(sd.config_dict(arms.task, arms.p, seed, arm, arms.work))
    a = pq.read_table(arms.runs["RAFT"][0] / "iter_0001" / "samples.parquet").to_pylist()
    b = pq.read_table(arms.runs["random selection"][0] / "iter_0001" / "samples.parquet").to_pylist()
    # the same base model, prompts and image seeds: the same candidates; only the choice differs
    assert [(r["prompt_id"], r["seed"], r["image_png"]) for r in a] == [
        (r["prompt_id"], r["seed"], r["image_png"]) for r in b
    ]
    assert sum(r["kept"] for r in a) == sum(r["kept"] for r in b) == 4  # one per prompt in both arms
    assert [r["kept"] for r in a] != [r["kept"] for r in b]  # the random picks differ somewhere
    by_prompt = {}
    for row in a:
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    assert all(max(group, key=lambda r: r["reward"])["kept"] for group in by_prompt.values())  # RAFT: the best


def test_held_out_scores_are_per_image_and_re_score_both_arms_with_the_real_reward(arms):
    raft, control = arms.runs["RAFT"][0], arms.runs["random selection"][0]
    scores = images.heldout_scores(raft, arms.real)
    assert sorted(scores) == [0, 1] and all(len(v) == 6 * 2 for v in scores.values())  # prompts x samples
    assert all(0.0 <= s <= 1.0 for v in scores.values() for s in v)  # a probability of the prompted digit
    logged = {row["iteration"]: row["eval_reward_mean"] for row in RunStore(raft).read_metrics()}
    assert {i: float(np.mean(v)) for i, v in scores.items()} == pytest.approx(logged)  # the loop's own number
    control_scores = images.heldout_scores(control, arms.real)
    assert control_scores[0] == pytest.approx(scores[0], abs=1e-6)  # the same base model, prompts and seeds
    assert control_scores[1] != pytest.approx(scores[1], abs=1e-6)  # fine-tuned on other images
    control_logged = {row["iteration"]: row["eval_reward_mean"] for row in RunStore(control).read_metrics()}
    assert control_logged[0] != pytest.approx(float(np.mean(control_scores[0])))  # its own number is random


def test_measures_give_per_iteration_rows_and_per_prompt_text_rows(arms):
    rows, per_prompt = arms.rows, arms.per_prompt
    assert list(rows.columns) == [
        "arm",
        "seed",
        "iteration",
        "diversity",
        "frechet_distance",
        "nearest_real_distance",
        "eval_reward",
        "p_prompted_digit",
        "prompted_digit_accuracy",
    ]
    assert len(rows) == 2 * 2 * 2  # arms x seeds x iterations 0, 1
    base = rows[rows.iteration == 0].set_index(["seed", "arm"]).drop(columns="iteration")
    for seed in (0, 1):  # the base model is the same in both arms
        assert base.loc[(seed, "RAFT")].to_numpy() == pytest.approx(base.loc[(seed, "random selection")].to_numpy())
    # the alignment reward is the classifier's probability of the prompted digit
    assert rows["eval_reward"].to_numpy() == pytest.approx(rows["p_prompted_digit"].to_numpy(), abs=1e-6)
    assert list(per_prompt.columns) == [
        "arm",
        "seed",
        "iteration",
        "prompt",
        "images",
        "eval_reward",
        "p_prompted_digit",
        "prompted_digit_accuracy",
    ]
    texts = {f"a handwritten digit {d}" for d in (1, 4, 7)}
    for (arm, seed, iteration), group in per_prompt.groupby(["arm", "seed", "iteration"]):
        assert group["prompt"].is_unique and set(group["prompt"]) <= texts  # one row per distinct text
        assert group["images"].sum() == 6 * 2 and (group["images"] % 2 == 0).all()  # 2 images per held-out row
        row = rows[(rows.arm == arm) & (rows.seed == seed) & (rows.iteration == iteration)].iloc[0]
        weighted = (group["eval_reward"] * group["images"]).sum() / group["images"].sum()
        assert weighted == pytest.approx(row["eval_reward"])  # the image mean is the text means weighted
    assert per_prompt["images"].max() > 2  # some text is held out more than once
    held = {s: load_prompts(load_config(arms.runs["RAFT"][s] / "config.yaml").data, s).eval for s in (0, 1)}
    assert {p.prompt_id for p in held[0]} != {p.prompt_id for p in held[1]}  # each seed holds out other rows ...
    shared = set(per_prompt[per_prompt.seed == 0]["prompt"]) & set(per_prompt[per_prompt.seed == 1]["prompt"])
    assert shared == {p.text for p in held[0]} & {p.text for p in held[1]}  # ... whose texts are shared


def test_change_summary_of_the_runs_crosses_seeds_with_prompt_texts(arms):
    per_seed = images.changes(arms.rows, list(arms.task.shown), 0, 1)
    summary = images.change_summary(per_seed, arms.task.expected, arms.per_prompt, first=0, last=1)
    assert set(summary["n_seeds"]) == {2} and summary.loc[("eval_reward", images.BEFORE_AFTER), "expected"] == "up"
    rows = arms.rows.set_index(["arm", "seed", "iteration"])["eval_reward"]
    ours = [rows[("RAFT", s, 1)] - rows[("random selection", s, 1)] for s in (0, 1)]
    interval = images.interval_of(summary, "eval_reward", images.AGAINST_CONTROL)
    assert interval == stats.mean_ci(ours) and interval.n == 2  # the seed-level t-interval, df = 1
    assert summary.loc[("eval_reward", images.AGAINST_CONTROL), "verdict"] == images.reading(interval, "up")
    # the crossed interval pairs the arms by (seed, prompt text)
    pp = arms.per_prompt.set_index(["arm", "iteration", "seed", "prompt"])["eval_reward"]
    texts = sorted(f"a handwritten digit {d}" for d in (1, 4, 7))
    for seed in (0, 1):  # every seed holds out every text: a complete seeds x texts design
        assert sorted(arms.per_prompt[arms.per_prompt.seed == seed]["prompt"].unique()) == texts
    wide = pd.DataFrame(
        [
            {"seed": s, "prompt": t, "ours": pp[("RAFT", 1, s, t)], "baseline": pp[("random selection", 1, s, t)]}
            for s in (0, 1)
            for t in texts
        ]
    )
    crossed = stats.crossed_paired_difference(wide, "ours", "baseline")
    assert summary.loc[("eval_reward", images.AGAINST_CONTROL), "crossed_interval"] == str(crossed)
    assert crossed.mean == pytest.approx(float(np.mean(wide["ours"] - wide["baseline"])))
    for measure in ("diversity", "frechet_distance", "nearest_real_distance"):  # not per image: no crossed interval
        assert set(summary.loc[measure, "crossed_interval"]) == {"—"}
    assert summary.loc[("prompted_digit_accuracy", images.BEFORE_AFTER), "crossed_interval"] != "—"


def _claims_by_text(claims) -> dict:
    return {c.claim: c for c in claims}


def test_claims_name_one_primary_per_task_raft_above_its_control_on_the_reward(arms):
    summary = images.change_summary(
        images.changes(arms.rows, list(arms.task.shown), 0, 1), arms.task.expected, arms.per_prompt, 0, 1
    )
    alignment = _claims_by_text(sd.claims(sd.TASKS["alignment"], summary, tiny=True))
    assert set(alignment) == {
        "RAFT after iteration T above the base model: held-out p(prompted digit)",
        "RAFT above its random-selection control: held-out p(prompted digit)",
        "RAFT after iteration T above the base model: share of images the classifier reads as the prompted digit",
        "RAFT above its random-selection control: share of images the classifier reads as the prompted digit",
    }
    primary = [c for c in alignment.values() if c.primary]
    assert [c.claim for c in primary] == ["RAFT above its random-selection control: held-out p(prompted digit)"]
    assert primary[0].interval == images.interval_of(summary, "eval_reward", images.AGAINST_CONTROL)
    assert {(c.table, c.direction) for c in alignment.values()} == {("§5 text-image alignment", "up")}
    row = primary[0].row()
    assert row["verdict"] == summary.loc[("eval_reward", images.AGAINST_CONTROL), "verdict"] and row["n"] == 2
    assert row["primary"] and row["interval"] == "95 % t-interval, n = 2"
    # the resolution task claims a direction for its reward only; a profile without CLIP names it by the scorer
    rows = _rows()
    resolution = sd.claims(
        sd.TASKS["resolution"],
        images.change_summary(
            images.changes(rows, ["eval_reward", "frechet_distance"], 0, 2), sd.TASKS["resolution"].expected
        ),
        tiny=False,
    )
    assert [(c.claim, c.primary) for c in resolution] == [
        ("RAFT after iteration T above the base model: held-out aesthetic score", False),
        ("RAFT above its random-selection control: held-out aesthetic score", True),
    ]
    assert [c.row()["verdict"] for c in resolution] == [stats.REPRODUCES, stats.REPRODUCES]
    # without the control arm there is no primary claim to make
    alone = images.change_summary(
        images.changes(rows[rows.arm == "RAFT"], ["eval_reward"], 0, 2), {"eval_reward": "up"}
    )
    assert [c.primary for c in sd.claims(sd.TASKS["resolution"], alone, tiny=True)] == [False]


def test_paper_comparison_and_headline_read_the_runs(arms):
    task = arms.task
    per_seed, table = sd.paper_comparison(task, arms.rows, arms.minutes, "tiny")
    assert len(per_seed) == 3 * 2  # base, RAFT, control per seed
    at = arms.rows.set_index(["arm", "seed", "iteration"])["eval_reward"]
    raft = per_seed[per_seed.setting == "ours: RAFT, 1 iterations"].set_index("seed")["eval_reward"]
    assert raft.to_dict() == pytest.approx({s: at[("RAFT", s, 1)] for s in (0, 1)})
    assert list(table.index) == [
        *task.paper_rows,
        "ours: base model (tiny)",
        "ours: RAFT, 1 iterations",
        "ours: random selection, 1 iterations",
    ]
    assert table.loc["paper: RAFT (SD 1.5, 512 px, CLIP reward)", "eval_reward"] == "—"  # no number in the paper
    assert table.loc["ours: RAFT, 1 iterations", "eval_reward"] == str(stats.mean_ci(raft))
    summary = images.change_summary(images.changes(arms.rows, list(task.shown), 0, 1), task.expected)
    numbers = sd.headline(task, summary, arms.minutes, True, [("prompted_digit_accuracy", images.AGAINST_CONTROL)])
    reading = numbers["held-out p(prompted digit), RAFT - random selection"]
    assert reading == stats.reading(images.interval_of(summary, "eval_reward", images.AGAINST_CONTROL), "up")
    assert reading.startswith(f"{summary.loc[('eval_reward', images.AGAINST_CONTROL), 'verdict']}: ")
    assert numbers[f"{images.MEASURES['prompted_digit_accuracy']}, RAFT - random selection"] == images.interval_of(
        summary, "prompted_digit_accuracy", images.AGAINST_CONTROL
    )
    wall = numbers["RAFT wall time per run (min)"]
    assert wall.n == 2 and wall.mean == pytest.approx(arms.minutes[arms.minutes.arm == "RAFT"]["wall_minutes"].mean())
