"""The K / temperature / KL sweeps of the paper's Tables 5-7: on the tiny HH-RLHF setting, or on HH-RLHF itself.

Each setting is one RAFT run through `raftsuite.launch.run` (in the kernel, or under `accelerate launch` when the
notebook asks for several processes); its final model, and the SFT model every run starts from, are evaluated by
raftlib's one evaluation path (`raftsuite.hh_methods.held_out_evaluation`) on the held-out prompts, per seed.
Changes along a sweep are paired by seed (t-intervals); two settings whose runs kept the very same samples are
"identical runs", not a difference left unresolved.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import raftlib
from raftlib.data import Prompt
from raftsuite import hh, hh_methods, hh_table3, launch, report, stats, sweeps
from raftsuite.cache import cached
from raftsuite.report import Claim

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


def setting_label(k: int, temperature: float, kl_coef: float = 0.0) -> str:
    """'K = 8, λ = 0.85, β = 0': a setting as the paper writes it (tables and claims; run names stay ASCII)."""
    return f"K = {k}, λ = {temperature:g}, β = {kl_coef:g}"


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


@dataclass(frozen=True)
class AblationRuns:
    """How every setting of the sweeps runs and is evaluated."""

    settings: hh_methods.MethodSettings
    """The evaluation's settings (its sampling temperature is `EVAL_TEMPERATURE` whatever a run's lambda)."""
    held_out: Sequence[Prompt]
    work: Path
    seeds: Sequence[int]
    num_processes: int = 1
    accelerate_config: str = ""

    def evaluate(self, model_dir: str | Path, seed: int, label: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Table columns of one final model (KL to the SFT model included) and its per-prompt rows."""
        model, _ = hh.load_causal_lm(model_dir, self.settings.policy_dtype)
        evaluation = hh_methods.held_out_evaluation(model, self.settings, self.held_out, seed)
        del model  # one final model on the device at a time
        columns = hh_table3.columns(evaluation.rows, evaluation.metrics.get("eval_reference_ppl", float("nan")))
        return columns | {"eval_kl": evaluation.metrics["eval_kl"]}, hh_table3.per_prompt(evaluation.rows, label, seed)


def run_settings(configs: Mapping[str, raftlib.RAFTConfig], runs: AblationRuns) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run every setting with every seed and evaluate each final model, plus the SFT model (row "SFT"): (one row per
    (run, seed), one row per (run, seed, held-out prompt)).

    Run `name` with seed s lives in WORK/name/seed_s (an unfinished run resumes, a finished one is reused); its
    evaluation is cached beside it by its parameters (`raftsuite.cache`). Seed s sets the run's config seed and the
    evaluation's random stream: settings with the same seed are scored on the same prompts with the same random
    numbers, so differences between settings are paired by seed.
    """
    rows, prompts = [], []
    sft = next(iter(configs.values())).model.path
    for seed in runs.seeds:
        params = {
            "model": sft,
            "seed": seed,
            "held_out": [p.prompt_id for p in runs.held_out],
            "settings": asdict(runs.settings),
        }  # the evaluation's sampling and reward, as the runs' keys
        result = cached(
            runs.work / "SFT" / f"seed_{seed}.json", params, lambda seed=seed: runs.evaluate(sft, seed, "SFT")
        )
        rows.append({"run": "SFT", "seed": seed, "selection": "none", **result[0]})
        prompts += result[1]
    for name, config in configs.items():
        for seed in runs.seeds:
            result = _cached_run(name, config, seed, runs)
            rows.append(result["row"])
            prompts += result["prompts"]
    return pd.DataFrame(rows), pd.DataFrame(prompts)


def _cached_run(name: str, config: raftlib.RAFTConfig, seed: int, runs: AblationRuns) -> dict[str, Any]:
    """One setting's run with one seed and its evaluation, read back when made with these parameters."""
    params = {
        "config": {k: v for k, v in config.to_dict().items() if k not in ("seed", "output_dir")},
        "seed": seed,
        "held_out": [p.prompt_id for p in runs.held_out],
        "settings": asdict(runs.settings),
    }
    return cached(runs.work / name / f"seed_{seed}.json", params, lambda: _one_run(name, config, seed, runs))


def learning_rate_sweep(
    base: raftlib.RAFTConfig,
    setting: tuple[int, float],
    rates: Sequence[float],
    runs: AblationRuns,
    validation: Sequence[Prompt],
) -> pd.DataFrame:
    """The ablations' own learning rate, chosen as hh_rlhf chooses its: RAFT at `setting` (K, lambda; the run the
    K and temperature sweeps share: the paper fixes one rate for all settings) with each rate (the first seed),
    its final model scored on `validation` prompts that no run trains on and no table reports;
    the best validation proxy reward among rates whose validation perplexity is at most
    `hh_methods.MAX_VALIDATION_PERPLEXITY_RATIO` x the SFT model's, the grid extended until that rate is interior
    (`raftsuite.sweeps`). Runs and scores are cached under WORK/lr_sweep. One row per rate: seed,
    validation_reward, validation_perplexity, perplexity_over_sft, admissible, minutes, chosen, interior."""
    seed = runs.seeds[0]
    on_validation = replace(runs, held_out=list(validation), work=runs.work / "lr_sweep")
    sft = base.model.path
    params = {
        "model": sft,
        "seed": seed,
        "validation": [p.prompt_id for p in validation],
        "settings": asdict(runs.settings),  # how it is evaluated, as every run's key says
    }
    sft_columns = cached(on_validation.work / "SFT.json", params, lambda: on_validation.evaluate(sft, seed, "SFT"))[0]
    at_setting = base.replace(setting_overrides(*setting))

    def score(method: str, rate: float) -> dict[str, Any]:
        config = at_setting.replace([f"training.learning_rate={rate!r}"])
        row = _cached_run(f"lr_{rate:g}", config, seed, on_validation)["row"]
        ratio = row["perplexity"] / sft_columns["perplexity"]
        return {
            "seed": seed,
            "validation_reward": row["proxy_reward"],
            "validation_perplexity": row["perplexity"],
            "perplexity_over_sft": ratio,
            "admissible": bool(np.isnan(ratio) or ratio <= hh_methods.MAX_VALIDATION_PERPLEXITY_RATIO),
            "minutes": row["minutes"],
        }

    return sweeps.sweep_until_interior({"raft": list(rates)}, score, max_extensions=6)


def chosen_rate(sweep: pd.DataFrame) -> float:
    """The rate `learning_rate_sweep` chose."""
    return sweeps.chosen_rates(sweep)["raft"]


def _one_run(name: str, config: raftlib.RAFTConfig, seed: int, runs: AblationRuns) -> dict[str, Any]:
    run_config = config.replace([f"seed={seed}", f"output_dir={runs.work / name / f'seed_{seed}'}"])
    started = time.perf_counter()
    result = launch.run(run_config, runs.num_processes, runs.accelerate_config)
    minutes = (time.perf_counter() - started) / 60
    columns, per_prompt = runs.evaluate(result.final_dir, seed, name)
    metrics = report.read_metrics(result.run_dir)
    setting = describe(config)
    ranked = setting["selection"] == "RAFT"  # a random run's own rewards are hashes, not the RM's
    row = {
        "run": name,
        "seed": seed,
        **setting,
        **columns,
        "start_best_of_k": float(metrics.loc[1, "best_of_k_reward_mean"]) if ranked else float("nan"),
        "start_sample_distinct_2": float(metrics.loc[1, "sample_distinct_2"]),
        "minutes": minutes,
    }
    return {"row": row, "prompts": per_prompt}


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
    rows: pd.DataFrame,
    sweep: str,
    metric: str,
    paper: Mapping[float, float],
    identical: set | None = None,
    per_prompt: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Paired changes along a sweep, seed by seed: last minus first, then each adjacent pair when the sweep has more
    than two settings. Each with its 95 % t-interval over seeds (column `t`, what the verdict reads), the paper's
    change between the same two settings and the verdict against the paper's direction; `identical` holds the pairs
    of settings whose runs kept the very same samples (`kept_overlap` 1.0 for every seed): "identical runs". With
    `per_prompt` (`run_settings`' rows: seed, method = run name, prompt, metrics), beside it the crossed seeds x
    prompts interval (every seed's final model scores the same held-out prompts)."""
    order = list(dict.fromkeys(rows[sweep]))
    pairs = [(order[0], order[-1])] + (list(itertools.pairwise(order)) if len(order) > 2 else [])
    out = []
    for first, last in pairs:
        chosen = rows[rows[sweep].isin([first, last])].dropna(subset=[metric])
        both = chosen.groupby("seed")[sweep].nunique() == 2
        chosen = chosen[chosen["seed"].isin(both[both].index)]
        if chosen.empty:
            continue
        interval = stats.trend(chosen, sweep, metric, first, last)
        runs = {value: chosen.loc[chosen[sweep] == value, "run"].iloc[0] for value in (first, last)}
        crossed = stats.crossed_between(per_prompt, runs[last], runs[first], metric)
        same = bool(identical) and (first, last) in identical
        if first in paper and last in paper and paper[first] != paper[last]:
            direction = stats.paper_direction(paper[first], paper[last])
            paper_change, verdict = paper[last] - paper[first], stats.verdict(interval, direction, same)
        else:
            direction, paper_change, verdict = None, float("nan"), stats.IDENTICAL if same else "no paper value"
        out.append(
            {
                "change": f"{sweep} {first:g} → {last:g}",
                "ours": str(interval),
                "n_seeds": interval.n,
                "crossed_interval": "—" if crossed is None else str(crossed),
                "detectable_at_80pct_power": stats.detectable_effect(interval),
                "paper_change": paper_change,
                "verdict": verdict,
                "direction": direction,
                "identical": same,
                "t": interval,
            }
        )
    if not out:  # no pair of settings has values (e.g. a metric every run left empty)
        return pd.DataFrame(columns=["ours", "direction", "t"]).rename_axis("change")
    return pd.DataFrame(out).set_index("change")


def claims(table: str, changes_table: pd.DataFrame, metric: str, primary: str | None = None) -> list[Claim]:
    """A sweep's changes as claims (those with a paper direction); `primary` names the change that is the table's
    primary verdict (docs/statistics.md)."""
    out = []
    for change, row in changes_table.iterrows():
        if not isinstance(row["direction"], str):  # no paper direction (None, or NaN in a mixed column)
            continue
        paper = f"{row['paper_change']:+.3f}"
        out.append(
            Claim(
                table,
                f"{change}, {metric.replace('_', ' ')}",
                paper,
                row["t"],
                row["direction"],
                primary=change == primary,
                identical=bool(row["identical"]),
            )
        )
    return out


def control_difference(results: pd.DataFrame, raft: str, random: str, metric: str = "proxy_reward") -> stats.Interval:
    """RAFT minus its matched random-selection control, paired by seed (same prompts, same sampling seeds)."""
    ours = results[results["run"] == raft].set_index("seed")[metric]
    control = results[results["run"] == random].set_index("seed")[metric]
    return stats.paired_difference(ours, control)


def identical_pairs(rows: pd.DataFrame, sweep: str, work: Path) -> set[tuple]:
    """Pairs of adjacent-or-end settings of a sweep whose runs kept the very same samples in every seed."""
    order = list(dict.fromkeys(rows[sweep]))
    runs = rows.drop_duplicates(sweep).set_index(sweep)["run"]
    seeds = sorted(rows["seed"].unique())
    pairs = {(order[0], order[-1])} | set(itertools.pairwise(order))
    same = set()
    for first, last in pairs:
        overlaps = [kept_overlap(work / runs[last] / f"seed_{s}", work / runs[first] / f"seed_{s}") for s in seeds]
        if overlaps and all(o == 1.0 for o in overlaps):
            same.add((first, last))
    return same


def start_best_of_k_claim(rows: pd.DataFrame, sweep: str = "temperature") -> list[Claim]:
    """The paper's second temperature claim: the best-of-K reward of the first iteration's samples falls as lambda
    rises (3.41 -> 2.48 from 0.7 to 1.0); ours as a paired change over seeds."""
    table = changes(rows, sweep, "start_best_of_k", {0.7: 3.41, 1.0: 2.48})
    if table.empty or not isinstance(table.iloc[0]["direction"], str):
        return []
    row = table.iloc[0]
    return [
        Claim(
            "Table 6",
            f"{row.name}, best-of-K reward of the first iteration's samples",
            "3.41 -> 2.48",
            row["t"],
            row["direction"],
        )
    ]


def plot_sweeps(rows: dict[str, pd.DataFrame], labels: dict[str, str], metrics: dict[str, str]):
    """One column per sweep: the paper's final reward on a row of its own (axis from 0), then one row per metric of
    ours: each seed as a dot, the mean with its 95 % t-interval."""
    import matplotlib.pyplot as plt

    from raftsuite import plots

    plots.use_style()
    fig, axes = plt.subplots(
        len(metrics) + 1, len(rows), figsize=(5.4 * len(rows), 3.6 * (len(metrics) + 1)), squeeze=False
    )
    for column, (sweep, frame) in enumerate(rows.items()):
        order = list(dict.fromkeys(frame[sweep]))
        paper = {v: p for v, p in PAPER.get(sweep, {}).items() if v in set(order)}
        if paper:
            plots.plot_paper_values(
                axes[0, column], paper, order, labels[sweep], f"paper: final reward by {labels[sweep]}"
            )
        else:
            axes[0, column].set_axis_off()
        for row, (metric, ylabel) in enumerate(metrics.items(), start=1):
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


# ----------------------------------------------------------------------------------------------
# The notebook's settings, tables and controls
# ----------------------------------------------------------------------------------------------

Setting = tuple[int, float, float]
"""(K, temperature lambda, KL coefficient beta)."""


def sweep_settings(p: Mapping[str, Any]) -> dict[str, dict[float, Setting]]:
    """{sweep: {swept value: setting}} from the notebook's parameters (Tables 5, 6, 7)."""
    return {
        "K": {k: (k, p["k_sweep_temperature"], 0.0) for k in p["k_values"]},
        "temperature": {t: (p["temperature_sweep_k"], t, 0.0) for t in p["temperatures"]},
        "kl_coef": {b: (p["kl_sweep_k"], p["kl_sweep_temperature"], b) for b in p["kl_coefs"]},
    }


def control_settings(p: Mapping[str, Any]) -> dict[str, Setting]:
    """{sweep: the setting its matched random-selection control sits beside}."""
    temperature = p["k_sweep_temperature"] if p["k_sweep_temperature"] in p["temperatures"] else p["temperatures"][0]
    return {
        "K": (p["k_values"][0], p["k_sweep_temperature"], 0.0),
        "temperature": (p["temperature_sweep_k"], temperature, 0.0),
        "kl_coef": (p["kl_sweep_k"], p["kl_sweep_temperature"], 0.0),
    }


def configs(base: raftlib.RAFTConfig, sweeps: Mapping, controls: Mapping) -> dict[str, raftlib.RAFTConfig]:
    """Every run's config by name: each sweep setting once (shared settings are one run) and each control."""
    runs = {run_name(*s): base.replace(setting_overrides(*s)) for sweep in sweeps.values() for s in sweep.values()}
    for s in controls.values():
        runs[run_name(*s, selection="random")] = base.replace(setting_overrides(*s) + RANDOM_SELECTION)
    return runs


def with_sft_and_paper(summary: pd.DataFrame, sft_rows: pd.DataFrame, paper: Mapping[float, float]) -> pd.DataFrame:
    """A sweep's table as text cells, the SFT model (every run's start) as its first row and the paper's final
    reward as a column."""
    metrics = [m for m in TABLE_METRICS if m in summary and not summary[m].isna().all()]
    sft = stats.summarize(sft_rows.assign(setting="SFT (start)"), [m for m in metrics if m in sft_rows], by="setting")
    table = report.interval_table(pd.concat([sft, summary]), metrics)
    table["paper final reward"] = [
        paper.get(v, float("nan")) if v != "SFT (start)" else float("nan") for v in table.index
    ]
    return table


def kept_overlaps(rows: pd.DataFrame, sweep: str, work: Path, reference: str | None) -> pd.DataFrame:
    """Each run's kept-set overlap with the same seed's `reference` run (`kept_overlap`), one row per run and seed."""
    overlap = rows[[sweep, "seed", "run"]].copy()
    overlap["kept_overlap_with_beta0"] = [
        kept_overlap(work / run / f"seed_{seed}", work / reference / f"seed_{seed}" if reference else None)
        for run, seed in zip(overlap["run"], overlap["seed"], strict=True)
    ]
    return overlap


def control_table(
    results: pd.DataFrame, controls: Mapping[str, Setting], hh_data: bool, per_prompt: pd.DataFrame | None = None
) -> pd.DataFrame:
    """RAFT minus its random-selection control per control run and metric (one row per run: a control may serve
    several sweeps), with the t-interval (column `t`) and its verdict against "ranking helps", and with
    `per_prompt` the crossed seeds x prompts interval beside it."""
    served: dict[Setting, list[str]] = {}
    for sweep, setting in controls.items():
        served.setdefault(setting, []).append(sweep)
    rows = []
    for setting, served_sweeps in served.items():
        raft, random = run_name(*setting), run_name(*setting, selection="random")
        for metric in ["proxy_reward"] + ([] if hh_data else ["gold_reward"]):
            interval = control_difference(results, raft, random, metric)
            crossed = stats.crossed_between(per_prompt, raft, random, metric)
            rows.append(
                {
                    "setting": setting_label(*setting),
                    "run": raft,
                    "serves sweeps": ", ".join(served_sweeps),
                    "metric": metric,
                    "ours": str(interval),
                    "n_seeds": interval.n,
                    "crossed_interval": "—" if crossed is None else str(crossed),
                    "detectable_at_80pct_power": stats.detectable_effect(interval),
                    "verdict": stats.verdict(interval, "up"),
                    "t": interval,
                }
            )
    return pd.DataFrame(rows)


def control_claims(table: pd.DataFrame) -> list[Claim]:
    """Each control comparison as a claim (exploratory: the paper has no random control)."""
    return [
        Claim(
            "Tables 5-7: random controls",
            f"RAFT above random selection at {r.setting}, {r.metric.replace('_', ' ')}",
            "—",
            r.t,
            "up",
        )
        for r in table.itertuples()
    ]
