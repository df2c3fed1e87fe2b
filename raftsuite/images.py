"""What the two diffusion notebooks show: per-iteration measures of the held-out images, and image grids.

Reads only the run directory raftlib wrote (metrics.jsonl, iter_*/samples.parquet, iter_*/eval_samples.parquet).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from raftlib.diffusion.metrics import within_prompt_diversity
from raftlib.diffusion.pipelines import ImageSample
from raftlib.store import RunStore, read_parquet
from raftsuite import digits


def eval_images(run_dir: Path, iteration: int) -> list[ImageSample]:
    return [
        ImageSample.from_row(r) for r in read_parquet(Path(run_dir) / f"iter_{iteration:04d}" / "eval_samples.parquet")
    ]


def iterations_of(run_dir: Path) -> list[int]:
    return sorted(
        int(p.name.split("_")[1]) for p in Path(run_dir).glob("iter_*") if (p / "eval_samples.parquet").is_file()
    )


def digit_measures(run_dir: Path, classifier: Path) -> pd.DataFrame:
    """Per iteration, on the held-out images: reward, diversity, distance to the real digits, accuracy.

    - `eval_reward_mean`: the reward RAFT optimised, on held-out prompts (from metrics.jsonl);
    - `diversity`: mean RMS pixel distance between images of the same prompt (0 = collapsed);
    - `frechet_distance`: between digit-classifier features of these images and of the real held-out digits
      (FID's formula in the classifier's 64-d feature space; lower = closer to the data);
    - `nearest_real_distance`: mean RMS distance of each image to its nearest real digit at the same size;
    - `prompted_digit_accuracy`: how often the classifier reads the prompted digit.
    Reward hacking shows as reward up while the distances grow.
    """
    held_x, _ = digits.real_digits("heldout")
    model = digits.load_classifier(classifier)
    real_features = digits.classifier_features(held_x, model)
    metrics = {row["iteration"]: row for row in RunStore(run_dir).read_metrics()}
    rows = []
    for iteration in iterations_of(run_dir):
        samples = eval_images(run_dir, iteration)
        images = [s.image for s in samples]
        features = digits.classifier_features(images, model)
        with torch.no_grad():
            predicted = model(digits.as_tensor(images)).argmax(-1).numpy()
        rows.append(
            {
                "iteration": iteration,
                "eval_reward_mean": metrics.get(iteration, {}).get("eval_reward_mean"),
                "diversity": within_prompt_diversity(images, [s.prompt for s in samples]),
                "frechet_distance": digits.frechet_distance(features, real_features),
                "nearest_real_distance": digits.nearest_real_distance(images, held_x),
                "prompted_digit_accuracy": float(np.mean(predicted == np.array([s.class_label for s in samples]))),
            }
        )
    return pd.DataFrame(rows).set_index("iteration")


def generic_measures(run_dir: Path) -> pd.DataFrame:
    """Per iteration: held-out reward and diversity (the paper profile: no real-data reference here)."""
    rows = [
        {
            "iteration": row["iteration"],
            "eval_reward_mean": row.get("eval_reward_mean"),
            "diversity": row.get("eval_diversity"),
        }
        for row in RunStore(run_dir).read_metrics()
    ]
    return pd.DataFrame(rows).set_index("iteration")


def plot_measures(table: pd.DataFrame, title: str = ""):
    """One panel per measure against the iteration (0 = the base model)."""
    import matplotlib.pyplot as plt

    columns = [c for c in table.columns if table[c].notna().any()]
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 2.8), squeeze=False)
    for axis, column in zip(axes[0], columns, strict=True):
        axis.plot(table.index, table[column], marker="o")
        axis.set_title(column.replace("_", " "), fontsize=9)
        axis.set_xlabel("iteration")
        axis.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


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


def before_after(run_dir: Path, first: int, last: int, count: int = 10):
    """The same held-out prompts and the same seeds, before (top) and after RAFT (bottom)."""
    import matplotlib.pyplot as plt

    before, after = eval_images(run_dir, first), eval_images(run_dir, last)
    pairs = list(zip(before, after, strict=True))[:count]
    fig, axes = plt.subplots(2, len(pairs), figsize=(1.2 * len(pairs), 2.9), squeeze=False)
    for column, (a, b) in enumerate(pairs):
        _show(axes[0][column], a.image, a.prompt.rsplit(" ", 1)[-1])
        _show(axes[1][column], b.image, "")
    axes[0][0].set_ylabel(f"iter {first}", fontsize=8)
    axes[1][0].set_ylabel(f"iter {last}", fontsize=8)
    fig.suptitle("held-out prompts, same seeds: before (top) and after (bottom)", fontsize=9)
    fig.tight_layout()
    return fig


def real_examples(size: int, count: int = 10):
    """Real held-out digits at `size` pixels (upsampled from 8x8 when size > 8), for reference."""
    import matplotlib.pyplot as plt

    held_x, held_y = digits.real_digits("heldout")
    picks = [int(np.flatnonzero(held_y == d)[0]) for d in range(min(count, 10))]
    images = digits.upsample(held_x[picks], size) if size != digits.NATIVE else held_x[picks]
    fig, axes = plt.subplots(1, len(picks), figsize=(1.2 * len(picks), 1.5), squeeze=False)
    for column, image in enumerate(images):
        _show(axes[0][column], image[..., None], str(held_y[picks[column]]))
    fig.suptitle(f"real digits at {size}x{size}", fontsize=9)
    fig.tight_layout()
    return fig


def _direction(first: float, last: float, tolerance: float = 0.02) -> str:
    if abs(last - first) <= tolerance * max(abs(first), 1e-9):
        return "about unchanged"
    return "up" if last > first else "down"


def verdict(table: pd.DataFrame) -> str:
    """One paragraph read off the table (first row = base model, last = after RAFT), not written in advance."""
    first, last = table.iloc[0], table.iloc[-1]
    parts = [f"Held-out reward went {_direction(first.eval_reward_mean, last.eval_reward_mean)} "
             f"({first.eval_reward_mean:.3f} → {last.eval_reward_mean:.3f}); diversity "
             f"{_direction(first.diversity, last.diversity)} ({first.diversity:.3f} → {last.diversity:.3f})"]  # fmt: skip
    if "frechet_distance" in table:
        parts.append(
            f"the Fréchet distance to the real digits went {_direction(first.frechet_distance, last.frechet_distance)} "
            f"({first.frechet_distance:.1f} → {last.frechet_distance:.1f}) and the nearest-real pixel distance "
            f"{_direction(first.nearest_real_distance, last.nearest_real_distance)} "
            f"({first.nearest_real_distance:.3f} → {last.nearest_real_distance:.3f})"
        )
    text = "; ".join(parts) + "."
    if "frechet_distance" in table and last.eval_reward_mean > first.eval_reward_mean:
        if last.frechet_distance < first.frechet_distance:
            text += " The reward rose while the images moved toward the data in the classifier's feature space."
        elif last.diversity < 0.8 * first.diversity:
            text += (" The reward rose while the feature distance grew and diversity fell: the model concentrated on"
                     " fewer modes (a narrower feature distribution is farther in Fréchet distance even when each"
                     " image is a plausible digit; the nearest-real distance says whether images left the data).")  # fmt: skip
        else:
            text += " The reward rose while the images moved away from the data: look for reward hacking."
    if "prompted_digit_accuracy" in table:
        a, b = first.prompted_digit_accuracy, last.prompted_digit_accuracy
        text += f" The classifier reads the prompted digit in {a:.0%} → {b:.0%} of the images"
        text += "." if b > a + 0.05 else ": the images did not become the prompted digits."
    return text
