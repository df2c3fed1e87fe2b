"""The two diffusion notebooks' shared steps (paper §5): the reward of each task, the config every run is made
from, RAFT and its matched random-selection control per seed, the comparison with the paper, claims, headline.

    task = sd.TASKS["resolution"]                       # or "alignment"
    reward, text = sd.reward_section(task, params)      # tiny: the digit scorers; else the paper's CLIP rewards
    runs, seconds = sd.run_arms(task, params, work, out) # {arm: {seed: run dir}}, wall seconds per run

Both notebooks differ only in their task (`Task`): the reward, the measures they claim a direction for, the
paper's numbers and their titles. Everything is read from the run directories raftlib wrote (`raftsuite.images`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from raftsuite import images, launch, report, stats
from raftsuite.report import Claim


@dataclass(frozen=True)
class Task:
    name: str
    """resolution | alignment"""
    table: str
    """Where the paper makes its claim (the results page sorts by it)."""
    title: str
    reward_name: dict[bool, str]
    """{tiny: the reward's name in tables}."""
    shown: tuple[str, ...]
    """The measures the tables and figures show (those a profile has)."""
    expected: dict[str, str]
    """{measure: the direction the paper claims}: the verdicts drawn (the rest are read as rises / falls)."""
    paper_rows: dict[str, dict[str, float]] = field(default_factory=dict)
    """The paper's numbers for the comparison table (docs/paper.md)."""


TASKS = {
    "resolution": Task(
        "resolution",
        "§5 resolution adaptation",
        "SD resolution adaptation",
        {True: "held-out reward (quality)", False: "held-out aesthetic score"},
        ("eval_reward", "diversity", "frechet_distance", "nearest_real_distance", "p_prompted_digit"),
        {"eval_reward": "up"},
        {
            "paper: RAFT (SD 1.5, 256 px, 1x A40)": {"wall_minutes": 8.4},
            "paper: DDPO (same task)": {"wall_minutes": 415.0},
        },
    ),
    "alignment": Task(
        "alignment",
        "§5 text-image alignment",
        "SD text-image alignment",
        {True: "held-out p(prompted digit)", False: "held-out CLIP score"},
        ("eval_reward", "prompted_digit_accuracy", "diversity", "frechet_distance", "nearest_real_distance"),
        {"eval_reward": "up", "prompted_digit_accuracy": "up"},
        {"paper: RAFT (SD 1.5, 512 px, CLIP reward)": {"eval_reward": float("nan")}},
    ),
}


def is_tiny(parameters: Mapping[str, Any]) -> bool:
    """The digit models (tiny, smoke) have no CLIP; dryrun, gpu and paper run Stable Diffusion."""
    return not parameters.get("clip_model")


def describe_tiny_model(model: str) -> str:
    """The tiny model's build record, in a sentence (`make tiny-digits` writes BUILD.json)."""
    record = next(p / "BUILD.json" for p in (Path(model), Path(model).parent) if (p / "BUILD.json").is_file())
    build = json.loads(record.read_text())
    return (
        f"**The tiny model** (`{model}`, built by `make tiny-digits`, record in `{record}`): a class-conditional "
        f"UNet of {build['unet_parameters']:,} parameters trained at 8x8 on {build['data']}. Digit classifier "
        f"held-out accuracy {build['classifier_heldout_accuracy_8px']:.1%}; quality scorer held-out balanced "
        f"accuracy {build['quality_scorer_heldout_balanced_accuracy']:.1%} (real against degraded 16x16 digits)."
    )


def reward_section(task: Task, p: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """(the reward section of the task's runs, a sentence saying what it is)."""
    if task.name == "resolution" and is_tiny(p):
        return (
            {"fn": "raftsuite.digits:quality_reward", "args": {"path": p["quality_scorer"]}},
            "Reward: the quality scorer's logit, the log-odds of a well-formed digit at 16x16 (unbounded, as "
            "LAION's score).",
        )
    if task.name == "resolution":
        from raftlib.diffusion.rewards import check_aesthetic_head

        check_aesthetic_head(p["aesthetic_head"])  # before any model loads: a missing head names its fetch command
        args = {
            "clip": p["clip_model"],
            "head": p["aesthetic_head"],
            "batch_size": p["reward_batch_size"],
            "dtype": p["reward_dtype"],
        }
        return {
            "fn": "aesthetic",
            "args": args,
        }, f"Reward: LAION aesthetic predictor `{p['aesthetic_head']}` on `{p['clip_model']}` image embeddings."
    if is_tiny(p):
        args = {
            "classifier": "raftsuite.digits:digit_probabilities",
            "classifier_args": {"path": p["classifier"]},
            "label_column": "label",
        }
        return {
            "fn": "classifier_probability",
            "args": args,
        }, "Reward: the digit classifier's probability of the prompted digit (0 to 1)."
    args = {"clip": p["clip_model"], "batch_size": p["reward_batch_size"], "dtype": p["reward_dtype"]}
    return {
        "fn": "clip_score",
        "args": args,
    }, f"Reward: CLIP score (100 x cosine of image and prompt) under `{p['clip_model']}`."


CONTROL_REWARD = {"fn": "raftsuite.images:random_reward"}
"""The matched control's reward: a uniform number per image (a hash of its pixels): the same count kept at random."""


def config_dict(task: Task, p: Mapping[str, Any], seed: int, arm: str, work: str | Path) -> dict[str, Any]:
    """The DiffusionConfig (as a dict) of one run: RAFT, or its random-selection control (another reward only)."""
    reward = reward_section(task, p)[0] if arm == "RAFT" else CONTROL_REWARD
    return {
        "model": {
            "path": p["model"],
            "kind": p["model_kind"],
            "dtype": p["dtype"],
            "lora": {"r": p["lora_rank"], "alpha": p["lora_rank"]} if p["lora_rank"] else None,
        },
        "data": {"prompts": p["prompts"], "eval_prompts": p["eval_prompts"]},
        "generation": {
            "samples_per_prompt": p["samples_per_prompt"],
            "num_inference_steps": p["num_inference_steps"],
            "guidance_scale": p["guidance_scale"],
            "scheduler": p["scheduler"],
            "height": p["height"] or None,
            "width": p["width"] or None,
            "prompts_per_batch": p["prompts_per_batch"],
            "decode_batch_size": p["decode_batch_size"],
        },
        "reward": reward,
        "selection": {"strategy": "local", "max_kept": p["max_kept"] or None},
        "training": {
            "learning_rate": p["learning_rate"],
            "lr_scheduler": p["lr_scheduler"],
            "epochs": p["epochs"],
            "micro_batch_size": p["micro_batch_size"],
            "mixed_precision": p["mixed_precision"],
            "gradient_checkpointing": p["gradient_checkpointing"],
        },
        "loop": {
            "iterations": p["iterations"],
            "prompts_per_iteration": p["prompts_per_iteration"],
            "eval_samples_per_prompt": p["eval_samples_per_prompt"],
        },
        "logging": {"progress_bars": p["show_progress"], "tensorboard": False},
        "seed": seed,
        "output_dir": str(Path(work) / images.run_name(arm, seed)),
    }


def run_arms(task: Task, p: Mapping[str, Any], work: str | Path, out: str | Path):
    """RAFT and its control for every seed (`raftsuite.launch.run`: in this process, or `accelerate launch`
    workers with their output streamed here; a re-executed cell resumes). Returns ({arm: {seed: run dir}},
    a frame of wall minutes per (arm, seed))."""
    from raftlib.diffusion import DiffusionConfig

    runs, minutes = {arm: {} for arm in images.ARMS}, []
    for arm in images.ARMS:
        with report.stage(f"{arm} ({len(p['seeds'])} seeds)", out):
            for seed in p["seeds"]:
                started = time.time()
                config = DiffusionConfig.from_dict(config_dict(task, p, seed, arm, work))
                runs[arm][seed] = launch.run(config, p["num_processes"], p["accelerate_config"]).run_dir
                minutes.append({"arm": arm, "seed": seed, "wall_minutes": (time.time() - started) / 60})
    return runs, pd.DataFrame(minutes)


def paper_comparison(
    task: Task, rows: pd.DataFrame, minutes: pd.DataFrame, profile: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-seed rows, table): the paper's numbers beside ours (base, RAFT and control at the last iteration:
    held-out reward and wall minutes, mean [95 % t-interval] over seeds)."""
    last = int(rows["iteration"].max())
    per_seed = []
    for seed in sorted(rows["seed"].unique()):
        at = rows[rows.seed == seed].set_index(["arm", "iteration"])
        wall = minutes[minutes.seed == seed].set_index("arm")["wall_minutes"]
        per_seed += [
            {
                "setting": f"ours: base model ({profile})",
                "seed": seed,
                "eval_reward": at.loc[("RAFT", 0), "eval_reward"],
            },
            {
                "setting": f"ours: RAFT, {last} iterations",
                "seed": seed,
                "eval_reward": at.loc[("RAFT", last), "eval_reward"],
                "wall_minutes": wall["RAFT"],
            },
            {
                "setting": f"ours: random selection, {last} iterations",
                "seed": seed,
                "eval_reward": at.loc[("random selection", last), "eval_reward"],
                "wall_minutes": wall["random selection"],
            },
        ]
    per_seed = pd.DataFrame(per_seed)
    ours = report.interval_table(
        stats.summarize(per_seed, ["eval_reward", "wall_minutes"], by="setting"), ["eval_reward", "wall_minutes"]
    )
    paper = pd.DataFrame(task.paper_rows).T.rename_axis("setting")
    paper = paper.reindex(columns=["eval_reward", "wall_minutes"]).map(lambda v: "—" if pd.isna(v) else f"{v:g}")
    return per_seed, pd.concat([paper, ours])


def claims(task: Task, summary: pd.DataFrame, tiny: bool) -> list[Claim]:
    """A claim per measure with a paper direction, before -> after and against the control. Primary (docs/
    statistics.md): RAFT above its random-selection control on the held-out reward, the ranking's own effect."""
    out = []
    words = {
        images.BEFORE_AFTER: "RAFT after iteration T above the base model",
        images.AGAINST_CONTROL: "RAFT above its random-selection control",
    }
    for measure, direction in task.expected.items():
        name = task.reward_name[tiny] if measure == "eval_reward" else images.MEASURES[measure]
        for comparison, text in words.items():
            if (measure, comparison) not in summary.index:
                continue
            primary = measure == "eval_reward" and comparison == images.AGAINST_CONTROL
            paper = "the reward rises (image grids; no number quoted)" if comparison == images.BEFORE_AFTER else "—"
            out.append(
                Claim(
                    task.table,
                    f"{text}: {name}",
                    paper,
                    images.interval_of(summary, measure, comparison),
                    direction,
                    primary=primary,
                )
            )
    return out


def headline(
    task: Task, summary: pd.DataFrame, minutes: pd.DataFrame, tiny: bool, extra: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """The numbers the report opens with: the reward's change and verdicts, diversity, the `extra` (measure,
    comparison) changes where the profile has them, and the wall time per run."""
    name = task.reward_name[tiny]
    numbers: dict[str, Any] = {}
    for comparison, label in (
        (images.BEFORE_AFTER, "RAFT after - before"),
        (images.AGAINST_CONTROL, "RAFT - random selection"),
    ):
        interval = images.interval_of(summary, "eval_reward", comparison)
        numbers[f"{name}, {label}"] = stats.reading(interval, "up")
    for measure, comparison in [("diversity", images.BEFORE_AFTER), *extra]:
        if (measure, comparison) in summary.index:
            label = "RAFT after - before" if comparison == images.BEFORE_AFTER else "RAFT - random selection"
            numbers[f"{images.MEASURES[measure]}, {label}"] = images.interval_of(summary, measure, comparison)
    numbers["RAFT wall time per run (min)"] = stats.mean_ci(minutes[minutes.arm == "RAFT"]["wall_minutes"])
    return numbers
