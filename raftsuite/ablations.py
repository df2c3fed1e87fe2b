"""The K / temperature / KL sweeps of the paper's Tables 5-7: on the tiny HH-RLHF setting, or on HH-RLHF itself.

Each setting is one RAFT run through `raftsuite.launch.run` (in the kernel, or under `accelerate launch` when the
notebook asks for several processes); its final model is evaluated on the accelerator.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import raftlib
from raftlib.data import Prompt
from raftsuite import hh, launch, report, stats
from raftsuite import seeds as seeds_mod

PAPER: dict[str, dict[float, float]] = {
    "K": {8: 2.180, 16: 2.251, 32: 2.329},  # Table 5, lambda = 0.85
    "temperature": {0.7: 2.198, 0.85: 2.180, 1.0: 2.143},  # Table 6, K = 8
    "kl_coef": {0.0: 2.143, 0.005: 2.087, 0.01: 2.038, 0.1: 2.029},  # Table 7, K = 8, lambda = 1.0
}
"""The paper's final mean reward per setting (LLaMA-7B, HH-RLHF), for the reference columns."""

EVAL_TEMPERATURE = 1.0
"""Every final model is evaluated at this temperature, so the columns compare models, not samplers."""


def run_name(k: int, temperature: float, kl_coef: float = 0.0, selection: str = "RAFT") -> str:
    """'K8_T0.85_beta0' (RAFT) or 'random_K8_T0.85_beta0' (the matched random-selection control)."""
    return ("random_" if selection == "random" else "") + f"K{k}_T{temperature:g}_beta{kl_coef:g}"


def setting_overrides(k: int, temperature: float, kl_coef: float = 0.0) -> list[str]:
    """The dotted overrides of one sweep setting, for `RAFTConfig.replace`."""
    return [
        f"generation.samples_per_prompt={k}",
        f"generation.temperature={temperature}",
        "selection.strategy=local",
        f"selection.kl_coef={kl_coef}",
    ]


RANDOM_SELECTION = ["reward.fn=raftsuite.hh:random_reward", "reward.args={}"]
"""Overrides that turn a RAFT run into its matched control: the same loop, K and sample count, but the kept
sample of each prompt is chosen by a hash of its text (uniform, unrelated to the reward): SFT on random samples."""


def train_only_prompts(prompts_file: str | Path, held_out: list[Prompt], destination: str | Path) -> Path:
    """The prompts file without the held-out prompts (rows whose text is a held-out prompt's text).

    Each RAFT run splits its prompts file with its own seed; on the full file a seed other than the setup's
    would train on some of the prompts the tables evaluate on. On this file no seed can.
    """
    texts = {p.text for p in held_out}
    rows = [line for line in Path(prompts_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line)["prompt"] not in texts]
    if len(rows) - len(kept) != len(texts):
        raise ValueError(
            f"train_only_prompts: {len(texts)} held-out prompts but {len(rows) - len(kept)} rows of {prompts_file} match"
        )
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(kept) + "\n"
    if not destination.is_file() or destination.read_text(encoding="utf-8") != text:
        tmp = destination.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, destination)
    return destination


def describe(config: raftlib.RAFTConfig) -> dict[str, Any]:
    """A run's setting as table columns: K, temperature, kl_coef and selection (RAFT | random)."""
    random = config.reward.fn == RANDOM_SELECTION[0].partition("=")[2]
    return {
        "K": config.generation.samples_per_prompt,
        "temperature": config.generation.temperature,
        "kl_coef": config.selection.kl_coef,
        "selection": "random" if random else "RAFT",
    }


def run_settings(
    configs: dict[str, raftlib.RAFTConfig],
    seeds: list[int],
    work: Path,
    held_out,
    scorer,
    *,
    max_new_tokens: int,
    num_processes: int = 1,
    accelerate_config: str = "",
    policy_dtype: str = "float32",
    gold: bool = True,
    prompts_per_batch: int = 16,
    eval_samples_per_prompt: int = 2,
) -> pd.DataFrame:
    """Run every setting with every seed and evaluate each final model: one row per (run, seed).

    Run `name` with seed s lives in WORK/name/seed_s (an unfinished run resumes, a finished one is reused);
    its evaluation is kept in WORK/name/seed_s.json (`seeds.for_each_seed`), so a rerun after a kill redoes
    at most one evaluation. Seed s sets the run's config seed (prompt order, sampling, fine-tuning) and the
    evaluation's sampling seed: two settings with the same seed are scored on the same held-out prompts with
    the same sampling seed, so differences between settings are paired by seed.
    `num_processes` / `accelerate_config`: as `raftsuite.launch.run`; `gold=False` where there is no hidden
    gold preference (HH-RLHF).
    """
    frames = []
    for name, config in configs.items():
        setting = describe(config)

        def one_seed(seed: int, name=name, config=config, setting=setting) -> dict[str, Any]:
            run_config = config.replace([f"seed={seed}", f"output_dir={work / name / f'seed_{seed}'}"])
            started = time.perf_counter()
            result = launch.run(run_config, num_processes, accelerate_config)
            minutes = (time.perf_counter() - started) / 60
            model, tokenizer = hh.load_causal_lm(result.final_dir, policy_dtype)
            evaluation = hh.evaluate(
                model,
                tokenizer,
                held_out,
                scorer,
                temperature=EVAL_TEMPERATURE,
                max_new_tokens=max_new_tokens,
                samples_per_prompt=eval_samples_per_prompt,
                seed=seed,
                gold=gold,
                prompts_per_batch=prompts_per_batch,
            )
            del model  # one final model on the device at a time
            metrics = report.read_metrics(result.run_dir)
            ranked = setting["selection"] == "RAFT"  # a random run's own rewards are hashes, not the RM's
            return {
                "run": name,
                **setting,
                **evaluation,
                "eval_kl": float(metrics["eval_kl"].iloc[-1]),
                "start_best_of_k": float(metrics.loc[1, "best_of_k_reward_mean"]) if ranked else float("nan"),
                "start_sample_distinct_2": float(metrics.loc[1, "sample_distinct_2"]),
                "minutes": minutes,
            }

        params = {
            "config": {k: v for k, v in config.to_dict().items() if k not in ("seed", "output_dir")},
            "held_out": [p.text for p in held_out],
            "max_new_tokens": max_new_tokens,
            "eval_samples_per_prompt": eval_samples_per_prompt,
            "eval_temperature": EVAL_TEMPERATURE,
        }
        frames.append(seeds_mod.for_each_seed(seeds, one_seed, cache_dir=work / name, params=params))
    return pd.concat(frames, ignore_index=True)


def sweep_rows(results: pd.DataFrame, sweep: str, mapping: dict[float, str]) -> pd.DataFrame:
    """The per-seed rows of one sweep, in the sweep's order, with the swept value as column `sweep`."""
    parts = []
    for value, name in mapping.items():
        rows = results[results["run"] == name]
        if rows.empty:
            raise KeyError(f"sweep {sweep}: no results for run {name!r}")
        parts.append(rows.assign(**{sweep: value}))
    frame = pd.concat(parts, ignore_index=True)
    return frame[[sweep, "seed", *(c for c in frame if c not in (sweep, "seed"))]]


TABLE_METRICS = [
    "proxy_reward",
    "gold_reward",
    "perplexity",
    "msttr_100",
    "distinct_2",
    "length_words",
    "eval_kl",
    "start_best_of_k",
]


def changes(
    rows: pd.DataFrame, sweep: str, metric: str, paper: dict[float, float], adjacent: bool = True
) -> pd.DataFrame:
    """Paired changes along a sweep, seed by seed: last minus first, then (given `adjacent`) each adjacent pair
    when the sweep has more than two settings. Each with its 95 % interval, the paper's change between the
    same two settings and `stats.verdict` of ours against the paper's direction."""
    order = list(dict.fromkeys(rows[sweep]))
    pairs = [(order[0], order[-1])]
    if adjacent and len(order) > 2:
        pairs += list(itertools.pairwise(order))
    out = []
    for first, last in pairs:
        chosen = rows[rows[sweep].isin([first, last])].dropna(subset=[metric])
        both = chosen.groupby("seed")[sweep].nunique() == 2
        chosen = chosen[chosen["seed"].isin(both[both].index)]
        if chosen.empty:
            continue
        interval = stats.trend(chosen, sweep, metric, first, last)
        if first in paper and last in paper and paper[first] != paper[last]:
            paper_change = paper[last] - paper[first]
            verdict = stats.verdict(interval, stats.paper_direction(paper[first], paper[last]))
        else:
            paper_change, verdict = float("nan"), "no paper value to compare"
        out.append(
            {
                "change": f"{sweep} {first:g} → {last:g}",
                "mean": interval.mean,
                "ci95_low": interval.low,
                "ci95_high": interval.high,
                "n_seeds": interval.n,
                "paper_change": paper_change,
                "verdict": verdict,
            }
        )
    return pd.DataFrame(out).set_index("change")


def control_difference(results: pd.DataFrame, raft: str, random: str, metric: str = "proxy_reward") -> stats.Interval:
    """RAFT minus its matched random-selection control, paired by seed (same prompts, same sampling seeds)."""
    ours = results[results["run"] == raft].set_index("seed")[metric]
    control = results[results["run"] == random].set_index("seed")[metric]
    return stats.paired_difference(ours, control)


def change_sentence(sweep: str, label: str, table: pd.DataFrame, summary: pd.DataFrame, paper: dict) -> str:
    """One sentence per sweep, every word of it from the numbers: the paper's direction, our per-setting means,
    the paired last-minus-first change with its interval, and the verdict."""
    values = list(summary.index)
    ours = " / ".join(f"{v:.3f}" for v in summary["proxy_reward"])
    settings = " / ".join(f"{v:g}" for v in values)
    first = table.iloc[0]
    interval = stats.Interval(first["mean"], first["ci95_low"], first["ci95_high"], int(first["n_seeds"]))
    if values[0] in paper and values[-1] in paper:
        direction = "rises" if paper[values[-1]] > paper[values[0]] else "falls"
        theirs = f"the paper's final reward {direction} ({' / '.join(f'{paper[v]:.3f}' for v in values if v in paper)})"
    else:
        theirs = "the paper reports no numbers for these settings"
    return (
        f"{label} = {settings}: {theirs}; ours (mean over {interval.n} seed(s)) {ours}, "
        f"last − first {interval} → **{first['verdict']}**."
    )


def control_sentence(label: str, interval: stats.Interval) -> str:
    verdict = stats.verdict(interval, "up")
    meaning = {
        stats.REPRODUCES: "ranking by the reward beats keeping a random sample",
        stats.OPPOSITE: "keeping a random sample beats ranking by the reward",
        stats.NOT_RESOLVED: "ranking is not distinguishable from random selection",
    }[verdict]
    return f"{label}: RAFT − random selection (same K, same sample count) {interval} → **{verdict}**: {meaning} here."


def trend_word(values) -> str:
    """Legacy (one run per setting; tests/test_suite_units.py still calls it): the shape of a sequence. The
    notebook's verdicts come from `changes`, over seeds."""
    values = np.asarray(values, dtype=float)
    steps = np.diff(values)
    if len(steps) == 0:
        return "single setting"
    if (steps >= 0).all():
        return "rises"
    if (steps <= 0).all():
        return "falls"
    return f"non-monotonic (first to last: {'rises' if values[-1] > values[0] else 'falls'})"


def trend_sentence(sweep: str, table: pd.DataFrame, paper: dict[float, float]) -> str:
    """Legacy, one run per setting (tests/test_suite_units.py still calls it); the notebook uses `changes` and
    `change_sentence`, whose verdicts come from intervals over seeds."""
    ours = table["proxy_reward"].to_numpy()
    theirs = np.array([paper[v] for v in table.index if v in paper])
    settings = " / ".join(f"{v:g}" for v in table.index)
    if len(theirs) < 2 or len(theirs) != len(ours):
        return f"{sweep} = {settings}: the paper reports no numbers for these settings; ours: {' / '.join(f'{v:.3f}' for v in ours)}."
    our_word, paper_word = trend_word(ours), trend_word(theirs)
    same = np.sign(ours[-1] - ours[0]) == np.sign(theirs[-1] - theirs[0])
    verdict = (
        "**reproduces**"
        if our_word == paper_word
        else ("matches first-to-last only" if same else "**does not reproduce**")
    )
    return (
        f"{sweep} = {settings}: the paper's final reward {paper_word} "
        f"({' / '.join(f'{v:.3f}' for v in theirs)}); ours {our_word} "
        f"({' / '.join(f'{v:.3f}' for v in ours)}): the trend {verdict} here (one seed per setting, so small "
        f"differences are within noise)."
        + (
            ""
            if table["gold_reward"].isna().all()  # HH-RLHF: no hidden gold preference
            else f" Gold reward: {' / '.join(f'{v:.3f}' for v in table['gold_reward'])}."
        )
    )


def start_best_of_k_sentence(rows: pd.DataFrame, sweep: str = "temperature") -> str:
    """The paper's second temperature claim: the best-of-K reward of the first iteration's samples falls as λ
    rises (3.41 → 2.48); ours as a paired last-minus-first change with its interval and verdict."""
    table = changes(rows, sweep, "start_best_of_k", {0.7: 3.41, 1.0: 2.48}, adjacent=False)
    if table.empty:
        return "Best-of-K reward of the first iteration's samples: no RAFT rows to compare."
    row = table.iloc[0]
    interval = stats.Interval(row["mean"], row["ci95_low"], row["ci95_high"], int(row["n_seeds"]))
    means = rows.groupby(sweep, sort=False)["start_best_of_k"].mean()
    return (
        f"Best-of-K reward of the first iteration's samples: {' / '.join(f'{v:.3f}' for v in means)} "
        f"(λ = {' / '.join(f'{v:g}' for v in means.index)}); {row.name}: {interval} "
        f"(the paper: falls 3.41 → 2.48 from λ = 0.7 to 1.0) → **{row['verdict']}**."
    )


def plot_sweeps(rows: dict[str, pd.DataFrame], labels: dict[str, str], metrics: dict[str, str]):
    """One column per sweep, one row per metric: each seed as a dot, the mean with its 95 % interval, and on
    the top row the paper's final reward on its own right-hand axis (its reward model's scale is not ours)."""
    import matplotlib.pyplot as plt

    from raftsuite import plots

    plots.use_style()
    fig, axes = plt.subplots(len(metrics), len(rows), figsize=(5.4 * len(rows), 4.0 * len(metrics)), squeeze=False)
    for column, (sweep, frame) in enumerate(rows.items()):
        for row, (metric, ylabel) in enumerate(metrics.items()):
            if frame[metric].isna().all():
                axes[row, column].set_axis_off()
                continue
            plots.plot_sweep(
                frame.dropna(subset=[metric]),
                sweep,
                metric,
                title=f"{labels[sweep]}: {ylabel}",
                xlabel=labels[sweep],
                ylabel=ylabel,
                paper={v: p for v, p in PAPER.get(sweep, {}).items() if v in set(frame[sweep])} if row == 0 else None,
                ax=axes[row, column],
            )
    fig.tight_layout()
    return fig


def kept_overlap(run_dir: Path, reference_dir: Path | None) -> float:
    """Mean over iterations of the Jaccard overlap of two runs' kept (prompt, completion) sets (same seed).

    1.0 means the two runs kept exactly the same samples: e.g. a KL coefficient too small to flip
    any best-of-K ranking, so the run is the beta = 0 run.
    """
    import pyarrow.parquet as pq

    if reference_dir is None:
        return float("nan")
    overlaps = []
    for path in sorted(Path(run_dir).glob("iter_*/kept.parquet")):
        other = Path(reference_dir) / path.parent.name / "kept.parquet"
        if not other.is_file():
            continue
        a = {(r["prompt_id"], r["completion"]) for r in pq.read_table(path).to_pylist()}
        b = {(r["prompt_id"], r["completion"]) for r in pq.read_table(other).to_pylist()}
        overlaps.append(len(a & b) / max(1, len(a | b)))
    return float(np.mean(overlaps)) if overlaps else float("nan")
