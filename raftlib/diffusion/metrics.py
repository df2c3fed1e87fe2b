"""Image-set measures (pure numpy): how varied the images drawn for the same prompt are."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np


def pairwise_distance_mean(images: Sequence[np.ndarray]) -> float:
    """Mean RMS pixel distance (pixels in [0, 1]) over all pairs of images; NaN with fewer than 2."""
    if len(images) < 2:
        return math.nan
    flat = np.stack([np.asarray(i, dtype=np.float64).ravel() / 255.0 for i in images])  # (N, D)
    squared = (flat**2).sum(1)
    gram = flat @ flat.T
    distances = np.sqrt(np.clip(squared[:, None] + squared[None, :] - 2 * gram, 0, None) / flat.shape[1])
    upper = np.triu_indices(len(images), k=1)
    return float(distances[upper].mean())


def within_prompt_diversity(images: Sequence[np.ndarray], prompts: Sequence[str]) -> float:
    """Mean over prompt texts of the mean pairwise distance among that prompt's images.

    Grouped by text, not prompt id, so held-out sets that repeat a prompt count its images together.
    Mode collapse (every image of a prompt alike) drives it to 0.
    """
    groups: dict[str, list[np.ndarray]] = defaultdict(list)
    for image, prompt in zip(images, prompts, strict=True):
        groups[prompt].append(image)
    values = [pairwise_distance_mean(group) for group in groups.values() if len(group) >= 2]
    return float(np.mean(values)) if values else math.nan
