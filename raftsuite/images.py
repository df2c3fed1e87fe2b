"""What the two diffusion notebooks show: per-iteration measures of the held-out images over seeds, RAFT against
its matched random-selection control, changes with their intervals and verdicts, and image grids.

Reads only the run directories raftlib wrote (config.yaml, iter_*/samples.parquet, iter_*/eval_samples.parquet).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from raftlib.batches import Batches
from raftlib.diffusion.metrics import within_prompt_diversity
from raftlib.diffusion.pipelines import ImageSample
from raftlib.store import read_parquet
from raftsuite import digits, stats

if TYPE_CHECKING:
    from raftlib.rewards import WeightedReward


def eval_images(run_dir: Path, iteration: int) -> list[ImageSample]:
    return [
        ImageSample.from_row(r) for r in read_parquet(Path(run_dir) / f"iter_{iteration:04d}" / "eval_samples.parquet")
    ]


def iterations_of(run_dir: Path) -> list[int]:
    return sorted(
        int(p.name.split("_")[1]) for p in Path(run_dir).glob("iter_*") if (p / "eval_samples.parquet").is_file()
    )


ARMS = ("RAFT", "random selection")
"""The two arms of each notebook: RAFT's ranking, and the matched control that keeps as many images at random."""


def run_name(arm: str, seed: int) -> str:
    """A run's directory under the notebook's work dir: `raft`, `raft_seed1`, ..., `random`, `random_seed1`, ...

    Seed 0 keeps the name a single-seed run had, so a run made before seeds existed is resumed, not redone.
    """
    stem = {"RAFT": "raft", "random selection": "random"}.get(arm)
    if stem is None:
        raise ValueError(f"run_name: arm must be one of {ARMS}, got {arm!r}")
    return stem if seed == 0 else f"{stem}_seed{seed}"


def random_reward(images: list, prompts: list[str], **columns: Any) -> list[float]:
    """The matched random-selection control: a uniform number in [0, 1) per image, from a hash of its prompt
    and pixels (not of its quality).

    RAFT run with it keeps what RAFT keeps (one image per prompt, capped by `max_kept` alike) but chosen at
    random, then fine-tunes the same way: any gain it shows comes from fine-tuning on the model's own images,
    not from ranking. Deterministic, so a resumed run re-scores an image to the same value.
    """
    values = []
    for image, prompt in zip(images, prompts, strict=True):
        digest = hashlib.sha256(prompt.encode() + b"\x00" + np.asarray(image).tobytes()).hexdigest()
        values.append(int(digest[:8], 16) / 16**8)
    return values


def heldout_scores(run_dir: Path, reward: WeightedReward, batch_size: int = 64) -> dict[int, list[float | None]]:
    """{iteration: the reward of each held-out image}, re-scored with `reward` (the experiment's real reward) from
    eval_samples.parquet.

    The random-selection control ranks by a random reward, so its own eval_reward_mean is random too; both
    arms are compared on this re-scoring instead (for a RAFT run its mean equals metrics.jsonl's eval_reward_mean).
    The prompts' columns (a prompt's label, say) come from the run's own config and held-out split.
    """
    from raftlib.config import load_config
    from raftlib.data import columns_by_prompt, load_prompts
    from raftlib.diffusion.modality import ImageModality
    from raftlib.scoring import score_samples

    config = load_config(Path(run_dir) / "config.yaml")
    columns = columns_by_prompt(load_prompts(config.data, config.seed).eval)
    return {
        iteration: score_samples(
            reward,
            eval_images(run_dir, iteration),
            columns,
            inputs=ImageModality.reward_inputs,
            batch_size=batch_size,
            batches=Batches(progress=False),
        ).reward
        for iteration in iterations_of(run_dir)
    }


MEASURES = {
    "eval_reward": "held-out reward (the experiment's reward, re-scored)",
    "diversity": "diversity: RMS pixel distance between images of one prompt",
    "frechet_distance": "Fréchet distance to real held-out digits (classifier features)",
    "nearest_real_distance": "RMS pixel distance to the nearest real digit",
    "p_prompted_digit": "p(prompted digit) under the digit classifier",
    "prompted_digit_accuracy": "share of images the classifier reads as the prompted digit",
}
"""Every per-iteration measure `measures` can give, with the label the tables and figures use."""

PER_IMAGE = ("eval_reward", "p_prompted_digit", "prompted_digit_accuracy")
"""The measures defined per image, so also per prompt (the others are measures of a set of images)."""


def _mean(values: Sequence[float | None]) -> float:
    finite = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(finite.mean()) if finite.size else math.nan


def measures(
    run_dir: Path, reward: WeightedReward, classifier: Path | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per iteration (0 = the base model), on the held-out images: the reward, diversity and, with the digit
    classifier (tiny profile), the distances to the real digits and the prompted digit's probability; and the
    per-image measures per prompt (one row per iteration and distinct prompt text: the held-out prompts repeat
    their strings, so a prompt is its text, the unit a crossed interval resamples).

    - `eval_reward`: `heldout_scores` (the same scorer for RAFT and the control);
    - `diversity`: mean RMS pixel distance between images of the same prompt (0 = collapsed);
    - `frechet_distance`: between digit-classifier features of these images and of the real held-out digits
      (FID's formula in the classifier's 64-d feature space; lower = closer to the data);
    - `nearest_real_distance`: mean RMS distance of each image to its nearest real digit at the same size;
    - `p_prompted_digit`: the classifier's mean probability of the prompted digit (p(prompted class));
    - `prompted_digit_accuracy`: how often the classifier reads the prompted digit.
    Reward hacking shows as reward up while the distances grow.
    """
    rewards = heldout_scores(run_dir, reward)
    if classifier is not None:
        held_x, _ = digits.real_digits("heldout", Path(classifier).parent / digits.DATA_FILE)  # its asset's
        model = digits.load_classifier(classifier)
        real_features = digits.classifier_features(held_x, model)
    rows, per_prompt = [], []
    for iteration in iterations_of(run_dir):
        samples = eval_images(run_dir, iteration)
        images = [s.image for s in samples]
        per_image = {"eval_reward": rewards[iteration]}
        row = {"iteration": iteration, "diversity": within_prompt_diversity(images, [s.prompt for s in samples])}
        if classifier is not None:
            with torch.no_grad():
                probabilities = model(digits.as_tensor(images)).softmax(-1).numpy()  # (N, 10)
            labels = np.array([s.class_label for s in samples])
            per_image |= {
                "p_prompted_digit": probabilities[np.arange(len(labels)), labels].tolist(),
                "prompted_digit_accuracy": (probabilities.argmax(-1) == labels).astype(float).tolist(),
            }
            row |= {
                "frechet_distance": digits.frechet_distance(digits.classifier_features(images, model), real_features),
                "nearest_real_distance": digits.nearest_real_distance(images, held_x),
            }
        rows.append(row | {name: _mean(values) for name, values in per_image.items()})
        by_text: dict[str, list[int]] = {}
        for index, sample in enumerate(samples):
            by_text.setdefault(sample.prompt, []).append(index)
        for text, members in by_text.items():
            per_prompt.append(
                {"iteration": iteration, "prompt": text, "images": len(members)}
                | {name: _mean([values[i] for i in members]) for name, values in per_image.items()}
            )
    return pd.DataFrame(rows), pd.DataFrame(per_prompt)


def measure_runs(
    runs: Mapping[str, Mapping[int, Path]], reward: WeightedReward, classifier: Path | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`measures` of every run, stacked: (one row per arm x seed x iteration, one per arm x seed x iteration x
    prompt text), columns arm, seed, iteration and the measures. runs: {arm: {seed: run directory}}."""
    frames, prompt_frames = [], []
    for arm, by_seed in runs.items():
        for seed, run_dir in by_seed.items():
            rows, per_prompt = measures(run_dir, reward, classifier)
            frames.append(rows.assign(arm=arm, seed=seed))
            prompt_frames.append(per_prompt.assign(arm=arm, seed=seed))
    frame, prompts = pd.concat(frames, ignore_index=True), pd.concat(prompt_frames, ignore_index=True)
    first = ["arm", "seed", "iteration"]
    return frame[[*first, *(c for c in frame if c not in first)]], prompts[
        [*first, *(c for c in prompts if c not in first)]
    ]


def plot_measures(rows: pd.DataFrame, metrics: Sequence[str], title: str):
    """One panel per measure against the iteration: each arm's seeds as thin lines, their mean as a thick one
    and its 95 % t-interval over seeds as a band; the legend sits in the first panel."""
    import matplotlib.pyplot as plt

    from raftsuite import plots

    plots.use_style()
    columns = min(3, len(metrics))  # at most 3 panels a row: the figure stays readable at a page's width
    lines = math.ceil(len(metrics) / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.8 * lines), squeeze=False)
    for axis in axes.ravel()[len(metrics) :]:
        axis.set_visible(False)
    for index, (axis, metric) in enumerate(zip(axes.ravel(), metrics, strict=False)):
        plots.plot_iteration_bands(
            rows,
            metric,
            MEASURES.get(metric, metric),
            metric.replace("_", " "),
            hue="arm",
            xlabel="iteration (0 = base model)",
            ax=axis,
        )
        axis.title.set_fontsize(9)
        if index:
            axis.get_legend().remove()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# Changes with their intervals, and verdicts read from them
# ----------------------------------------------------------------------------------------------

BEFORE_AFTER = "RAFT: after - before"
CONTROL_BEFORE_AFTER = "random selection: after - before"
AGAINST_CONTROL = "RAFT - random selection (after)"


def changes(rows: pd.DataFrame, metrics: Sequence[str], first: int, last: int) -> pd.DataFrame:
    """Per seed and measure, three paired differences (one row each, column `change`):

    - RAFT after - before: the last iteration minus the base model, on the same held-out prompts and image
      seeds (the eval images of iteration 0 and of the last one share their seeds);
    - the same for the random-selection control;
    - RAFT - random selection at the last iteration: the two arms of one seed share the base model, the
      prompts and every image seed, so the difference is the ranking's own effect.
    """
    out = []
    for metric in metrics:
        table = rows.pivot_table(index="seed", columns=["arm", "iteration"], values=metric, aggfunc="first")
        pairs = {
            BEFORE_AFTER: (("RAFT", last), ("RAFT", first)),
            CONTROL_BEFORE_AFTER: (("random selection", last), ("random selection", first)),
            AGAINST_CONTROL: (("RAFT", last), ("random selection", last)),
        }
        for comparison, (ours, baseline) in pairs.items():
            if ours not in table or baseline not in table:
                continue
            for seed, value in (table[ours] - table[baseline]).items():
                out.append({"measure": metric, "comparison": comparison, "seed": seed, "change": float(value)})
    return pd.DataFrame(out)


def reading(interval: stats.Interval, expected: str | None) -> str:
    """A change's verdict: against the expected direction ("up" / "down") where the paper claims one
    (stats.verdict: reproduces / opposite), otherwise whether the interval says the measure rose or fell;
    "not resolved at this sample size" when the interval holds 0 or could not be computed (one seed)."""
    if expected is not None:
        return stats.verdict(interval, expected)
    word = stats.verdict(interval, "up")
    return {stats.REPRODUCES: "rises", stats.OPPOSITE: "falls"}.get(word, word)


_PAIRS = {  # comparison -> ((arm, at last?), (arm, at last?)): ours minus baseline
    BEFORE_AFTER: (("RAFT", True), ("RAFT", False)),
    CONTROL_BEFORE_AFTER: (("random selection", True), ("random selection", False)),
    AGAINST_CONTROL: (("RAFT", True), ("random selection", True)),
}


def _crossed(per_prompt: pd.DataFrame, measure: str, comparison: str, first: int, last: int):
    """The crossed seeds x prompt-texts interval of a comparison (None where the measure is not per image), over
    the prompt texts every seed scored (each seed holds out its own rows, so a seed can miss a text)."""
    if per_prompt is None or measure not in per_prompt:
        return None
    (arm_a, late_a), (arm_b, late_b) = _PAIRS[comparison]

    def side(arm: str, late: bool) -> pd.Series:
        rows = per_prompt[(per_prompt["arm"] == arm) & (per_prompt["iteration"] == (last if late else first))]
        return rows.set_index(["seed", "prompt"])[measure]

    wide = pd.DataFrame({"ours": side(arm_a, late_a), "baseline": side(arm_b, late_b)}).dropna().reset_index()
    seeds = wide["seed"].nunique()
    common = wide.groupby("prompt")["seed"].nunique()
    wide = wide[wide["prompt"].isin(common[common == seeds].index)]
    return stats.crossed_paired_difference(wide, "ours", "baseline") if len(wide) else None


def change_summary(
    per_seed: pd.DataFrame,
    expected: Mapping[str, str],
    per_prompt: pd.DataFrame | None = None,
    first: int = 0,
    last: int | None = None,
) -> pd.DataFrame:
    """`changes` rows -> one row per (measure, comparison): the mean change with its 95 % Student-t interval over
    seeds (`t`, a stats.Interval: what the verdict reads), the crossed seeds x prompts interval from `per_prompt`
    where the measure is per image, the effect the seeds could detect at 80 % power, the expected direction and
    the verdict.

    expected: {measure: "up" | "down"} for the measures whose direction the paper claims (RAFT raises its
    reward; the alignment notebook, p(prompted class)); for RAFT - random selection the same direction is
    the claim that ranking, not fine-tuning alone, does the work.
    """
    rows = []
    for (measure, comparison), group in per_seed.groupby(["measure", "comparison"], sort=False):
        interval = stats.mean_ci(group["change"])
        crossed = _crossed(per_prompt, measure, comparison, first, last) if last is not None else None
        rows.append(
            {
                "measure": measure,
                "comparison": comparison,
                "change": str(interval),
                "n_seeds": interval.n,
                "crossed_interval": "—" if crossed is None else str(crossed),
                "detectable_at_80pct_power": stats.detectable_effect(interval),
                "expected": expected.get(measure, ""),
                "verdict": reading(interval, expected.get(measure)),
                "t": interval,
            }
        )
    return pd.DataFrame(rows).set_index(["measure", "comparison"])


def interval_of(summary: pd.DataFrame, measure: str, comparison: str) -> stats.Interval:
    return summary.loc[(measure, comparison), "t"]


def change_table(summary: pd.DataFrame) -> pd.DataFrame:
    """`change_summary` as text for reading: measure label, comparison, the change with its t-interval, the
    crossed interval, n, the claimed direction and the verdict."""
    table = summary.drop(columns="t").copy()
    table["expected"] = table["expected"].replace("", "—")
    table.index = table.index.set_levels([MEASURES.get(m, m) for m in table.index.levels[0]], level=0)
    return table


def _said(summary: pd.DataFrame, measure: str, comparison: str) -> str:
    interval = interval_of(summary, measure, comparison)
    return f"{interval} ({interval.n} seed{'s' * (interval.n != 1)}; {summary.loc[(measure, comparison), 'verdict']})"


def verdict(summary: pd.DataFrame) -> str:
    """Paragraphs read off `change_summary`'s intervals, never off one run: the reward's change under RAFT and
    under the random control, RAFT against the control, and what the distances say about reward hacking."""
    measures_there = list(dict.fromkeys(summary.index.get_level_values(0)))
    lines = []
    for measure in measures_there:
        said = [f"RAFT after − before {_said(summary, measure, BEFORE_AFTER)}"]
        if (measure, CONTROL_BEFORE_AFTER) in summary.index:
            said.append(f"random selection after − before {_said(summary, measure, CONTROL_BEFORE_AFTER)}")
        if (measure, AGAINST_CONTROL) in summary.index:
            said.append(f"RAFT − random selection after the last iteration {_said(summary, measure, AGAINST_CONTROL)}")
        lines.append(f"- **{MEASURES.get(measure, measure)}**: " + "; ".join(said) + ".")
    reward = summary.loc[("eval_reward", BEFORE_AFTER), "verdict"]
    text = "\n".join(lines)
    if (reward == stats.REPRODUCES) and ("frechet_distance", BEFORE_AFTER) in summary.index:
        distance = summary.loc[("frechet_distance", BEFORE_AFTER), "verdict"]
        diversity = summary["verdict"].get(("diversity", BEFORE_AFTER), stats.NOT_RESOLVED)
        if distance == "falls":
            text += (
                "\n\nThe reward rose while the images moved toward the real digits in the classifier's feature"
                " space: adaptation, not reward hacking."
            )
        elif distance == "rises" and diversity == "falls":
            text += (
                "\n\nThe reward rose while the Fréchet distance grew and diversity fell: the model concentrated"
                " on fewer modes (a narrower feature distribution is farther in Fréchet distance even when"
                " each image is a plausible digit; the nearest-real distance says whether images left the"
                " data)."
            )
        elif distance == "rises":
            text += "\n\nThe reward rose while the images moved away from the data: look for reward hacking."
        else:
            text += (
                "\n\nThe reward rose; the change of the Fréchet distance is not resolved at this sample size,"
                " so these seeds cannot say whether the images moved toward the data or away from it."
            )
    return text


def _show(axis, image: np.ndarray, caption: str, color: str = "black") -> None:
    axis.imshow(
        image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255, interpolation="nearest"
    )
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_title(caption, fontsize=7, color=color)


def kept_vs_rejected(run_dir: Path, iteration: int, prompts: int = 6, rejected: int = 4):
    """For `prompts` prompts of an iteration: the kept image (green) and `rejected` rejected ones, with rewards."""
    import matplotlib.pyplot as plt

    rows = read_parquet(Path(run_dir) / f"iter_{iteration:04d}" / "samples.parquet")
    by_prompt: dict[int, list[dict]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    chosen = [pid for pid, group in by_prompt.items() if any(r["kept"] for r in group)][:prompts]
    fig, axes = plt.subplots(
        len(chosen), 1 + rejected, figsize=(1.3 * (1 + rejected), 1.45 * len(chosen)), squeeze=False
    )
    for line, pid in enumerate(chosen):
        group = sorted(
            by_prompt[pid], key=lambda r: (not r["kept"], -(r["reward"] if r["reward"] is not None else -1e9))
        )
        for column in range(1 + rejected):
            axis = axes[line][column]
            if column >= len(group):
                axis.axis("off")
                continue
            row = group[column]
            sample = ImageSample.from_row(row)
            reward = "None" if row["reward"] is None else f"{row['reward']:.2f}"
            label = "kept" if row["kept"] else "rejected"
            _show(axis, sample.image, f"{label} {reward}", "green" if row["kept"] else "gray")
            if column == 0:
                axis.set_ylabel(sample.prompt.replace("a handwritten ", ""), fontsize=7)
    fig.suptitle(f"iteration {iteration}: kept (left) against rejected", fontsize=9)
    fig.tight_layout()
    return fig


def before_after(run_dir: Path, first: int, last: int, count: int = 10, control_dir: Path | None = None):
    """The same held-out prompts and image seeds: the base model (top), after RAFT (middle) and, given the
    control run of the same seed, after random selection (bottom)."""
    import matplotlib.pyplot as plt

    rows = [(f"iter {first}", eval_images(run_dir, first)), (f"RAFT, iter {last}", eval_images(run_dir, last))]
    if control_dir is not None:
        rows.append((f"random, iter {last}", eval_images(control_dir, last)))
    shown = min(count, len(rows[0][1]))
    fig, axes = plt.subplots(len(rows), shown, figsize=(1.2 * shown, 1.45 * len(rows) + 0.5), squeeze=False)
    for line, (label, samples) in enumerate(rows):
        for column, sample in enumerate(samples[:shown]):
            _show(axes[line][column], sample.image, sample.prompt.rsplit(" ", 1)[-1] if line == 0 else "")
        axes[line][0].set_ylabel(label, fontsize=8)
    arms = "base (top), RAFT (middle), random selection (bottom)" if control_dir else "before (top), after (bottom)"
    fig.suptitle(f"held-out prompts, same image seeds: {arms}", fontsize=9)
    fig.tight_layout()
    return fig


def real_examples(size: int, count: int = 10, data: str | Path = digits.DATA):
    """Real held-out digits at `size` pixels (upsampled from 8x8 when size > 8), for reference."""
    import matplotlib.pyplot as plt

    held_x, held_y = digits.real_digits("heldout", data)
    picks = [int(np.flatnonzero(held_y == d)[0]) for d in range(min(count, 10))]
    images = digits.upsample(held_x[picks], size) if size != digits.NATIVE else held_x[picks]
    fig, axes = plt.subplots(1, len(picks), figsize=(1.2 * len(picks), 1.5), squeeze=False)
    for column, image in enumerate(images):
        _show(axes[0][column], image[..., None], str(held_y[picks[column]]))
    fig.suptitle(f"real digits at {size}x{size}", fontsize=9)
    fig.tight_layout()
    return fig
