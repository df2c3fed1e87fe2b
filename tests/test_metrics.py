"""Diversity, reward and KL metrics against hand-computed values."""

import math

import numpy as np
import pytest

from raftlib import metrics as M


def test_words_lowercase_and_punctuation():
    assert M.words("The cat, the DOG!") == ["the", "cat", ",", "the", "dog", "!"]


def test_distinct_n_by_hand():
    texts = ["a b a", "a b"]
    # unigrams: a b a a b -> 2 distinct / 5
    assert M.distinct_n(texts, 1) == pytest.approx(2 / 5)
    # bigrams: (a b) (b a) | (a b) -> 2 distinct / 3
    assert M.distinct_n(texts, 2) == pytest.approx(2 / 3)
    assert math.isnan(M.distinct_n(["a"], 2))


def test_msttr_by_hand():
    # window 4 over stream a b a c | d d d d | e (partial segment dropped): (3/4 + 1/4) / 2
    texts = ["a b a", "c d d", "d d e"]
    assert M.msttr(texts, window=4) == pytest.approx(0.5)
    assert math.isnan(M.msttr(["a b"], window=4))


def test_reward_stats_skip_and_count_invalid():
    stats = M.reward_stats([1.0, None, 3.0, float("nan")], "r")
    assert stats["r_mean"] == 2.0 and stats["r_max"] == 3.0 and stats["r_min"] == 1.0
    assert stats["r_std"] == pytest.approx(1.0)
    assert stats["r_invalid"] == 2 and stats["r_count"] == 4
    assert math.isnan(M.reward_stats([None], "r")["r_mean"])


def test_best_of_k_mean():
    # prompt 0 best 0.9, prompt 1 best 0.4, prompt 2 all invalid (ignored)
    assert M.best_of_k_mean([0, 0, 1, 1, 2], [0.1, 0.9, 0.4, None, None]) == pytest.approx(0.65)


def test_kl_estimate_and_perplexity():
    assert M.kl_estimate([-1.0, -2.0], [-1.5, -3.0]) == pytest.approx(0.75)
    assert M.perplexity(total_nll=2 * math.log(4.0), token_count=2) == pytest.approx(4.0)


def test_text_metrics_keys():
    values = M.text_metrics(["one two three"] * 40, "eval")
    assert values["eval_distinct_1"] == pytest.approx(3 / 120)
    assert values["eval_msttr_100"] == pytest.approx(3 / 100)
    assert values["eval_length_words"] == 3.0


def test_image_diversity_by_hand():
    from raftlib.diffusion.metrics import pairwise_distance_mean, within_prompt_diversity

    black, white = np.zeros((2, 2, 1), np.uint8), np.full((2, 2, 1), 255, np.uint8)
    grey = np.full((2, 2, 1), 51, np.uint8)  # 0.2 in [0, 1]
    assert pairwise_distance_mean([black, white]) == pytest.approx(1.0)
    assert pairwise_distance_mean([black, white, grey]) == pytest.approx((1.0 + 0.2 + 0.8) / 3)
    # grouped by prompt text: two collapsed prompts -> 0, one single image -> ignored
    assert within_prompt_diversity([black, black, white, white, grey], ["a", "a", "b", "b", "c"]) == 0.0
    assert math.isnan(within_prompt_diversity([black], ["a"]))
