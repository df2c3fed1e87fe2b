"""Table 3 (Dong et al. 2023) in the HH notebooks: every model scored on the held-out prompts, one seed at a time.

Each model is evaluated by raftlib's one evaluation path (`raftsuite.hh_methods.held_out_evaluation`, i.e.
`raftlib.evaluation.evaluate_policy`: the runs' decoder and sampling settings, the seed's evaluation stream, the
proxy reward and, in the tiny setting, the hidden gold preference beside it at weight 0). This module only reads
those evaluations: the Table 3 columns, best-of-K at inference (the proxy's pick among K draws per prompt), and
one row per (seed, model, prompt) for the per-prompt Parquet file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raftlib import metrics as M
from raftlib.records import Prompt
from raftsuite import hh, hh_methods
from raftsuite.cache import cached

METRICS = ["proxy_reward", "gold_reward", "perplexity", "msttr_100", "distinct_1", "distinct_2", "length_words"]
"""Table 3's columns here (the paper's reward is its reward model: our proxy; gold only in the tiny setting)."""


@dataclass(frozen=True)
class Table3:
    """What Table 3 needs: the settings every model is evaluated with, the held-out prompts, and the models."""

    settings: hh_methods.MethodSettings
    held_out: Sequence[Prompt]
    shared: Mapping[str, Mapping[str, Any]]
    """Models evaluated with every seed (not trained per seed): label -> {"path", optional "best_of"}."""
    trained: Mapping[str, Mapping[int, Mapping[str, Any]]]
    """Models trained per seed: label -> seed -> {"path", optional "extra": columns added to its row}."""

    def models(self, seed: int) -> dict[str, Mapping[str, Any]]:
        """The models of one seed's Table 3, by label."""
        return dict(self.shared) | {label: by_seed[seed] for label, by_seed in self.trained.items()}

    def params(self, seed: int) -> dict[str, Any]:
        """What a seed's rows depend on (the run cache's key)."""
        return {
            "seed": seed,
            "models": self.models(seed),
            "held_out": [p.prompt_id for p in self.held_out],
            "settings": asdict(self.settings),
        }


def labels(samples_per_prompt: int, best_of_k: int) -> dict[str, str]:
    """Table 3's row label of each method (`hh_methods` names: sft, best_of_k, random, raft, grpo)."""
    return {
        "sft": "SFT model",
        "best_of_k": f"best-of-{best_of_k} at inference (SFT)",
        "random": "SFT on random samples",
        "raft": f"RAFT-K{samples_per_prompt}",
        "grpo": "GRPO (TRL)",
    }


def of_runs(
    settings: hh_methods.MethodSettings,
    held_out: Sequence[Prompt],
    sft_model: str,
    records: Mapping[tuple[str, int], Mapping[str, Any]],
    chosen: Mapping[str, float],
    names: Mapping[str, str],
    best_of_k: int,
) -> Table3:
    """Table 3 of the SFT model, best-of-K at inference and every trained method's final model per seed
    (`records`: (method, seed) -> its run record; `chosen`: the sweep's rate per method, GRPO's own or RAFT's)."""
    shared = {names["sft"]: {"path": sft_model}, names["best_of_k"]: {"path": sft_model, "best_of": best_of_k}}
    trained: dict[str, dict[int, dict[str, Any]]] = {}
    for (method, seed), record in records.items():
        rate = chosen["grpo" if method == "grpo" else "raft"]
        extra = {"learning_rate": f"{rate:g}", "train_seconds": record["curve"][-1]["train_seconds"]}
        trained.setdefault(names[method], {})[seed] = {"path": record["model_dir"], "extra": extra}
    return Table3(settings, held_out, shared, trained)


def best_of(rows: Sequence[Mapping[str, Any]], k: int) -> list[Mapping[str, Any]]:
    """Per prompt, the row the proxy ranks first among each consecutive group of `k` samples (best-of-K at
    inference); `k` = 1 keeps every row."""
    if k == 1:
        return list(rows)
    by_prompt: dict[int, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    kept = []
    for group in by_prompt.values():
        group = sorted(group, key=lambda r: r["sample_index"])
        for start in range(0, len(group), k):
            chunk = group[start : start + k]
            kept.append(max(chunk, key=lambda r: -math.inf if r["reward"] is None else r["reward"]))
    return kept


def columns(rows: Sequence[Mapping[str, Any]], perplexity: float) -> dict[str, float]:
    """The Table 3 columns of a model's (selected) held-out rows."""
    completions = [r["completion"] for r in rows]
    gold = [r["reward/gold"] for r in rows if r.get("reward/gold") is not None]
    return {
        "proxy_reward": float(np.mean([r["reward"] for r in rows if r["reward"] is not None])),
        "gold_reward": float(np.mean(gold)) if gold else math.nan,
        "perplexity": perplexity,
        "msttr_100": M.msttr(completions),
        "distinct_1": M.distinct_n(completions, 1),
        "distinct_2": M.distinct_n(completions, 2),
        "length_words": float(np.mean([len(M.words(c)) for c in completions])),
    }


def per_prompt(rows: Sequence[Mapping[str, Any]], label: str, seed: int) -> list[dict[str, Any]]:
    """One row per held-out prompt: its mean proxy and gold reward and length over the model's samples."""
    by_prompt: dict[int, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    out = []
    for prompt_id, group in sorted(by_prompt.items()):
        gold = [r["reward/gold"] for r in group if r.get("reward/gold") is not None]
        out.append(
            {
                "seed": seed,
                "method": label,
                "prompt": prompt_id,
                "proxy_reward": float(np.mean([r["reward"] for r in group if r["reward"] is not None])),
                "gold_reward": float(np.mean(gold)) if gold else math.nan,
                "length_words": float(np.mean([len(M.words(r["completion"])) for r in group])),
            }
        )
    return out


def seed_rows(table: Table3, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Every model of `table` on the held-out prompts with `seed`'s evaluation stream: {"rows": one Table 3 row
    per model, "prompts": one row per (model, prompt)}."""
    settings, reward = table.settings, hh_methods.evaluation_reward(table.settings)
    reward.setup()  # the reward model loads once for every model of the seed
    rows, prompts = [], []
    try:
        for label, model in table.models(seed).items():
            k = int(model.get("best_of", 1))
            policy, _ = hh.load_causal_lm(model["path"], settings.policy_dtype)
            config = hh_methods.evaluation_config(settings, seed, settings.eval_samples_per_prompt * k)
            from raftlib.evaluation import evaluate_policy

            evaluation = evaluate_policy(policy, config, table.held_out, reward=reward)
            chosen = best_of(evaluation.rows, k)
            perplexity = evaluation.metrics.get("eval_reference_ppl", math.nan)
            rows.append({"seed": seed, "method": label} | columns(chosen, perplexity) | dict(model.get("extra", {})))
            prompts += per_prompt(chosen, label, seed)
            del policy
    finally:
        reward.teardown()
    return {"rows": rows, "prompts": prompts}


def evaluate_seeds(table: Table3, seeds: Sequence[int], cache_dir: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table 3 for every seed, each seed cached by its parameters (`raftsuite.cache`): (one row per seed and
    model, one row per seed, model and prompt)."""
    rows, prompts = [], []
    for seed in seeds:
        result = cached(
            Path(cache_dir) / f"seed_{seed}.json", table.params(seed), lambda seed=seed: seed_rows(table, seed)
        )
        rows += result["rows"]
        prompts += result["prompts"]
    return pd.DataFrame(rows), pd.DataFrame(prompts)
