"""Programmatic rewards for tests and the example config (importable as `toy_rewards:...`)."""

from __future__ import annotations


def letter_a(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """Share of the completion's characters that are the letter 'a' (a random model can learn it)."""
    return [c.count("a") / max(len(c), 1) for c in completions]


def none_for_empty(prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """Like letter_a, but None (could not score) for an empty completion."""
    return [None if not c.strip() else c.count("a") / len(c) for c in completions]


def scaled(factor: float = 1.0):
    """A factory: `args: {factor: 2}` builds a letter_a reward scaled by `factor`."""

    def reward(prompts, completions, **columns):
        return [factor * v for v in letter_a(prompts, completions)]

    return reward


def brightness(images, prompts: list[str], **columns) -> list[float | None]:
    """Image reward: mean pixel intensity in [0, 1] (a random diffusion model can learn it)."""
    import numpy as np

    return [float(np.asarray(image, dtype=np.float64).mean() / 255.0) for image in images]
