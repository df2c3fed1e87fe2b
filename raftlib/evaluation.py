"""The held-out evaluation, one path for everything: the loop's per-iteration evaluation, and any other policy
(a baseline's, the base model, an SFT model) evaluated the way the loop evaluates.

    evaluation = evaluate_policy(model, config)          # the config's held-out prompts, reward and decoder
    evaluation.metrics["eval_reward_mean"], evaluation.rows  # one row per (prompt, sample), for Parquet

Completions are drawn by the run's decoder (`generation.backend`) on the policy's own device, from the seed
stream `EVAL_STREAM` (the same random numbers for every policy and every iteration, so curves and paired
comparisons are less noisy), `loop.eval_samples_per_prompt` per prompt; they are scored with the run's reward
(data columns included), and measured: reward statistics, the modality's sample measures (text: diversity,
length, entropy), pass@k when `loop.pass_threshold` is set, and the modality's own measures (text: KL to the
initial model, reference perplexity).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from raftlib import metrics as M
from raftlib.batches import Batches
from raftlib.data import PromptSplits, columns_by_prompt, load_prompts
from raftlib.records import Prompt, Scores
from raftlib.scoring import score_samples

EVAL_STREAM = 999_983
"""Seed stream of evaluation: the same random numbers at every iteration and for every policy."""


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, Any]
    """eval_reward_mean and the rest (docs/metrics.md)."""
    samples: list
    scores: Scores
    rows: list[dict[str, Any]]
    """One row per sample: the sample's columns, its reward (and components), the modality's extra columns."""


def draw(modality, policy, prompts: Sequence[Prompt], config, batches: Batches | None = None) -> list:
    """The held-out samples of `policy` (in batches: `batches` says which are done and which are this process's)."""
    return modality.generate(
        policy, prompts, stream=EVAL_STREAM, samples_per_prompt=config.loop.eval_samples_per_prompt, batches=batches
    )


def measure(modality, reward, policy, samples: list, prompts: Sequence[Prompt], config, iteration: int) -> Evaluation:
    """Score and measure held-out samples (iteration 0 is the initial model: its KL to itself is 0)."""
    scores = score_samples(
        reward,
        samples,
        columns_by_prompt(prompts),
        inputs=modality.reward_inputs,
        batch_size=config.reward.batch_size,
        batches=Batches(progress=False),
    )
    metrics: dict[str, Any] = M.reward_stats(scores.reward, "eval_reward")
    metrics |= modality.sample_metrics(samples, "eval")
    loop = config.loop
    if loop.pass_threshold is not None:  # a verifier's reward: pass@1 and pass@k of the held-out split
        k = loop.pass_k or loop.eval_samples_per_prompt
        metrics |= M.pass_at_k_metrics([s.prompt_id for s in samples], scores.reward, loop.pass_threshold, k)
    extra_metrics, extra_columns = modality.eval_metrics(policy, samples, prompts, iteration)
    metrics |= extra_metrics
    rows = []
    for i, (sample, extra) in enumerate(zip(samples, extra_columns, strict=True)):
        components = {f"reward/{name}": values[i] for name, values in scores.components.items()}
        rows.append(sample.to_row() | {"reward": scores.reward[i]} | components | extra)
    return Evaluation(metrics, samples, scores, rows)


def evaluate_policy(policy, config, prompts: Sequence[Prompt] | None = None, *, reward=None, iteration: int = 1):
    """Evaluate any `policy` as raftlib's loop evaluates an iteration's model (see the module docstring).

    `config` (a RAFTConfig or DiffusionConfig) gives the decoder, sampling settings, reward and, unless
    `prompts` are given, the held-out prompts (`data.eval_prompts` of `data.prompts`, split as a run splits
    them). The policy is evaluated where it is (its device) and left there.
    """
    from raftlib.modality import device_of, modality_for
    from raftlib.rewards import build_reward

    modality = modality_for(config, device_of(policy))
    held_out = list(prompts) if prompts is not None else load_prompts(config.data, config.seed).eval
    held_out = modality.prepare(PromptSplits(train=held_out, eval=[])).train  # encoded once; too-long ones dropped
    reward = reward if reward is not None else build_reward(config.reward)
    try:
        samples = draw(modality, policy, held_out, config, Batches(progress=config.logging.progress_bars))
        return measure(modality, reward, policy, samples, held_out, config, iteration)
    finally:
        modality.close()
