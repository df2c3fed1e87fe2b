"""The K / temperature / KL sweeps of the paper's Tables 5-7: on the tiny HH-RLHF setting, or on HH-RLHF itself.

Each setting is one RAFT run through `raftsuite.launch.run` (in the kernel, or under `accelerate launch` when the
notebook asks for several processes); its final model is evaluated on the accelerator.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import raftlib
from raftsuite import hh, launch, report

PAPER: dict[str, dict[float, float]] = {
    "K": {8: 2.180, 16: 2.251, 32: 2.329},  # Table 5, lambda = 0.85
    "temperature": {0.7: 2.198, 0.85: 2.180, 1.0: 2.143},  # Table 6, K = 8
    "kl_coef": {0.0: 2.143, 0.005: 2.087, 0.01: 2.038, 0.1: 2.029},  # Table 7, K = 8, lambda = 1.0
}
"""The paper's final mean reward per setting (LLaMA-7B, HH-RLHF), for the reference columns."""

EVAL_TEMPERATURE = 1.0
"""Every final model is evaluated at this temperature, so the columns compare models, not samplers."""


def run_name(k: int, temperature: float, kl_coef: float) -> str:
    return f"K{k}_T{temperature:g}_beta{kl_coef:g}"


def sweep_settings(
    k_values: list[int],
    k_temperature: float,
    temperatures: list[float],
    temperature_k: int,
    kl_coefs: list[float],
    kl_k: int,
    kl_temperature: float,
) -> dict[str, dict[float, str]]:
    """{sweep: {setting value: run name}}; runs shared between sweeps get one name (run once)."""
    return {
        "K": {k: run_name(k, k_temperature, 0.0) for k in k_values},
        "temperature": {t: run_name(temperature_k, t, 0.0) for t in temperatures},
        "kl_coef": {b: run_name(kl_k, kl_temperature, b) for b in kl_coefs},
    }


def _parse(name: str) -> tuple[int, float, float]:
    k, t, b = name.split("_")
    return int(k[1:]), float(t[1:]), float(b[4:])


def run_sweeps(
    base: dict[str, Any],
    settings: dict[str, dict[float, str]],
    work: Path,
    held_out,
    scorer,
    *,
    max_new_tokens: int,
    seed: int,
    num_processes: int = 1,
    accelerate_config: str = "",
    policy_dtype: str = "float32",
    gold: bool = True,
    prompts_per_batch: int = 16,
) -> pd.DataFrame:
    """Run every distinct setting once (resuming unfinished and reusing finished ones) and evaluate its final model.

    `num_processes` / `accelerate_config`: as `raftsuite.launch.run`. The evaluation loads each final model on
    the accelerator in `policy_dtype`; `gold=False` where there is no hidden gold preference (HH-RLHF).
    """
    names = sorted({name for sweep in settings.values() for name in sweep.values()})
    rows = {}
    for name in names:
        k, temperature, kl_coef = _parse(name)
        raw = copy.deepcopy(base)
        raw["generation"] |= {"samples_per_prompt": k, "temperature": temperature}
        raw["selection"] = {"strategy": "local", "kl_coef": kl_coef}
        raw["output_dir"] = str(work / name)
        started = time.perf_counter()
        result = launch.run(raftlib.RAFTConfig.from_dict(raw), num_processes, accelerate_config)
        minutes = (time.perf_counter() - started) / 60
        model, tokenizer = hh.load_causal_lm(result.final_dir, policy_dtype)
        evaluation = hh.evaluate(
            model,
            tokenizer,
            held_out,
            scorer,
            temperature=EVAL_TEMPERATURE,
            max_new_tokens=max_new_tokens,
            seed=seed,
            gold=gold,
            prompts_per_batch=prompts_per_batch,
        )
        del model  # one final model on the device at a time
        metrics = report.read_metrics(result.run_dir)
        rows[name] = {
            "K": k,
            "temperature": temperature,
            "kl_coef": kl_coef,
            **evaluation,
            "eval_kl": float(metrics["eval_kl"].iloc[-1]),
            "start_best_of_k": float(metrics.loc[1, "best_of_k_reward_mean"]),
            "start_sample_distinct_2": float(metrics.loc[1, "sample_distinct_2"]),
            "minutes": minutes,
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def sweep_table(
    results: pd.DataFrame, sweep: str, mapping: dict[float, str], paper: dict[float, float]
) -> pd.DataFrame:
    columns = [
        "proxy_reward",
        "gold_reward",
        "perplexity",
        "msttr_100",
        "distinct_2",
        "length_words",
        "eval_kl",
        "start_best_of_k",
    ]
    table = results.loc[[mapping[v] for v in mapping], columns].copy()
    table.index = pd.Index(list(mapping), name=sweep)
    table["paper_reward"] = [paper.get(v, np.nan) for v in mapping]
    return table


def trend_word(values) -> str:
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
    """One sentence, computed from the numbers: does our trend of the final reward match the paper's?"""
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


def start_best_of_k_sentence(table: pd.DataFrame) -> str:
    values = table["start_best_of_k"].to_numpy()
    return (
        f"Best-of-K reward of the first iteration's samples: {' / '.join(f'{v:.3f}' for v in values)} "
        f"({trend_word(values)} with temperature; the paper: falls 3.41 → 2.48)."
    )


def plot_sweeps(tables: dict[str, pd.DataFrame]):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(tables), figsize=(5 * len(tables), 6.4))
    for column, (name, table) in enumerate(tables.items()):
        x = [str(v) for v in table.index]
        top, bottom = axes[0, column], axes[1, column]
        top.plot(x, table["proxy_reward"], marker="o", label="ours: proxy reward")
        top.plot(x, table["gold_reward"], marker="s", label="ours: gold reward")
        twin = top.twinx()
        twin.plot(x, table["paper_reward"], marker="^", color="grey", linestyle="--", label="paper reward (right axis)")
        top.set_title(name)
        top.legend(fontsize=8, loc="upper left")
        twin.legend(fontsize=8, loc="lower right")
        bottom.plot(x, table["distinct_2"], marker="o", label="distinct-2")
        bottom.plot(x, table["msttr_100"], marker="s", label="MSTTR-100")
        bottom.set_xlabel(name)
        bottom.legend(fontsize=8)
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def kept_overlap(run_dir: Path, reference_dir: Path | None) -> float:
    """Mean over iterations of the Jaccard overlap of two runs' kept (prompt, completion) sets.

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
