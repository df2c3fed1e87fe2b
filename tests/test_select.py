"""Selection and the KL ranking key, against values computed by hand."""

import math

import numpy as np
import pytest

from raftlib.sections import SelectionSection as Rule
from raftlib.select import as_float_array, kl_ranking_key, select, select_global, select_local, select_threshold


def test_local_keeps_best_of_k_per_prompt():
    # two prompts, K = 3: best of prompt 0 is index 1 (0.9), best of prompt 1 is index 5 (0.4)
    key = [0.1, 0.9, 0.5, -1.0, 0.2, 0.4]
    pids = [0, 0, 0, 1, 1, 1]
    sidx = [0, 1, 2, 0, 1, 2]
    result = select_local(key, pids, sidx)
    assert result.kept.tolist() == [False, True, False, False, False, True]
    assert result.invalid_count == 0
    two = select_local(key, pids, sidx, keep_per_prompt=2)
    assert two.kept.tolist() == [False, True, True, False, True, True]


def test_local_ties_break_on_lowest_sample_index():
    result = select_local([0.5, 0.5, 0.5], [7, 7, 7], [2, 0, 1])
    assert result.kept.tolist() == [False, True, False]


def test_none_nan_inf_never_kept_and_counted():
    key = as_float_array([None, float("nan"), float("inf"), 0.3, None, None])
    pids = [0, 0, 0, 0, 1, 1]
    result = select_local(key, pids, [0, 1, 2, 3, 0, 1])
    assert result.kept.tolist() == [False, False, False, True, False, False]
    assert result.invalid_count == 5
    assert result.prompts_without_valid_sample == 1
    assert math.isnan(result.ranking_key[0]) and result.ranking_key[3] == 0.3


def test_negative_inf_is_invalid_too():
    result = select_local([-math.inf, -5.0], [0, 0], [0, 1])
    assert result.kept.tolist() == [False, True]
    assert result.invalid_count == 1


def test_global_keeps_top_fraction_of_batch():
    # 8 samples, fraction 1/4 -> keep 2: the two largest keys regardless of prompt
    key = [0.1, 0.8, 0.3, 0.9, 0.2, 0.0, 0.7, 0.6]
    pids = [0, 0, 1, 1, 2, 2, 3, 3]
    sidx = [0, 1, 0, 1, 0, 1, 0, 1]
    result = select_global(key, pids, sidx, 0.25)
    assert np.flatnonzero(result.kept).tolist() == [1, 3]


def test_global_invalid_shrinks_kept_set():
    key = as_float_array([None, None, None, 0.5])
    result = select_global(key, [0, 0, 1, 1], [0, 1, 0, 1], 0.5)
    assert result.kept.tolist() == [False, False, False, True]  # 2 requested, 1 usable


def test_global_ties_break_on_prompt_then_sample():
    result = select_global([1.0, 1.0, 1.0, 1.0], [3, 1, 1, 2], [0, 1, 0, 0], 0.25)
    assert np.flatnonzero(result.kept).tolist() == [2]  # prompt 1, sample 0


def test_threshold_keeps_all_at_or_above():
    result = select_threshold(as_float_array([1.0, 0.0, None, 1.0]), [0, 0, 1, 1], threshold=1.0)
    assert result.kept.tolist() == [True, False, False, True]
    assert result.invalid_count == 1


def test_kl_key_matches_equation_5_by_hand():
    # r - beta * (logp - ref_logp): 1.0 - 0.1 * (-2 - -5) = 0.7; 0.5 - 0.1 * (-4 - -4) = 0.5
    key = kl_ranking_key([1.0, 0.5], [-2.0, -4.0], [-5.0, -4.0], kl_coef=0.1)
    assert key == pytest.approx([0.7, 0.5])
    # beta = 0 is the reward itself (and needs no logprobs)
    assert kl_ranking_key([1.0, None], kl_coef=0.0)[0] == 1.0
    with pytest.raises(ValueError):
        kl_ranking_key([1.0], kl_coef=0.1)


def test_kl_key_can_flip_the_choice():
    # the higher-reward sample drifted far from pi_0; with beta = 0.5 the other one wins
    rewards, logp, ref = [1.0, 0.8], [-1.0, -3.0], [-3.0, -3.0]
    assert select_local(kl_ranking_key(rewards, logp, ref, 0.0), [0, 0], [0, 1]).kept.tolist() == [True, False]
    assert select_local(kl_ranking_key(rewards, logp, ref, 0.5), [0, 0], [0, 1]).kept.tolist() == [False, True]


def test_ranking_is_invariant_to_affine_reward_shift():
    rng = np.random.default_rng(0)
    key = rng.normal(size=24)
    pids, sidx = np.repeat(np.arange(6), 4), np.tile(np.arange(4), 6)
    base = select(Rule(), key, pids, sidx, samples_per_prompt=4).kept
    assert (select(Rule(), 3.0 * key - 7.0, pids, sidx, samples_per_prompt=4).kept == base).all()


def test_dispatch_global_uses_one_over_k():
    key = np.arange(12, dtype=float)
    result = select(
        Rule(strategy="global"), key, np.repeat(np.arange(3), 4), np.tile(np.arange(4), 3), samples_per_prompt=4
    )
    assert np.flatnonzero(result.kept).tolist() == [9, 10, 11]


def test_max_kept_caps_the_winners_best_key_first():
    # best of 2 per prompt for 3 prompts, then only the top 2 of the 3 winners (the SD notebook's "top 8 of 10")
    key = np.array([0.1, 0.9, 0.5, 0.4, 0.7, 0.7])
    prompt_ids = np.array([0, 0, 1, 1, 2, 2])
    sample_indices = np.array([0, 1, 0, 1, 0, 1])
    capped = select(Rule(max_kept=2), key, prompt_ids, sample_indices, samples_per_prompt=2)
    assert capped.kept.tolist() == [False, True, False, False, True, False]  # 0.9 and the tie-broken 0.7
    uncapped = select(Rule(max_kept=5), key, prompt_ids, sample_indices, samples_per_prompt=2)
    assert uncapped.kept.sum() == 3


def test_count_keeps_exactly_the_best_n_and_never_an_invalid_one():
    key = as_float_array([0.1, 0.9, None, 0.5, 0.7])
    result = select(
        Rule(strategy="count", kept_counts=[3]),
        key,
        np.array([0, 0, 1, 1, 2]),
        np.array([0, 1, 0, 1, 0]),
        samples_per_prompt=2,
    )
    assert result.kept.tolist() == [False, True, False, True, True]
    short = select(
        Rule(strategy="count", kept_counts=[4, 9]),
        key,
        np.array([0, 0, 1, 1, 2]),
        np.array([0, 1, 0, 1, 0]),
        samples_per_prompt=2,
        iteration=2,
    )
    assert short.kept.sum() == 4 and not short.kept[2]  # fewer usable rewards than asked: all usable ones


def test_count_selection_needs_a_count_per_iteration():
    from raftlib import RAFTConfig
    from raftlib.sections import ConfigError

    base = {"model": {"path": "m"}, "data": {"prompts": "p.jsonl"}, "reward": {"fn": "length"}, "output_dir": "o"}
    base["loop"] = {"iterations": 3}
    with pytest.raises(ConfigError, match=r"selection\.kept_counts"):
        RAFTConfig.from_dict(base | {"selection": {"strategy": "count"}})
    with pytest.raises(ConfigError, match="2 counts for 3 iterations"):
        RAFTConfig.from_dict(base | {"selection": {"strategy": "count", "kept_counts": [4, 5]}})
    config = RAFTConfig.from_dict(base | {"selection": {"strategy": "count", "kept_counts": [4, 5, 6]}})
    assert config.kept_per_iteration == 6
