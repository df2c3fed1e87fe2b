"""Reward plug-ins: registry, module:function paths, factories, mixes, None, bad outputs, reward models."""

import math

import pytest
import torch

from raftlib import testing
from raftlib.batches import Batches
from raftlib.config import RewardSection
from raftlib.hub import ModelLoadError
from raftlib.records import Sample
from raftlib.rewards import RewardError, build_reward, check_reward_output
from raftlib.scoring import score_samples
from raftlib.text.rewards import RewardModelScorer, extract_answer


def sample(prompt_id, completion, prompt="p"):
    return Sample(prompt_id, 0, prompt, completion, [1], [2], 0.0, "eos")


def test_builtin_length():
    reward = build_reward(RewardSection(fn="length", args={"unit": "chars"}))
    assert reward.score(["p", "p"], ["abc", ""]).reward == [3.0, 0.0]
    words = build_reward(RewardSection(fn="length", args={"target": 2}))
    assert words.score(["p"], ["one two three"]).reward == [-1.0]


def test_module_function_and_factory():
    plain = build_reward(RewardSection(fn="toy_rewards:letter_a"))
    assert plain.score(["p"], ["aab"]).reward == [pytest.approx(2 / 3)]
    factory = build_reward(RewardSection(fn="toy_rewards:scaled", args={"factor": 3.0}))
    assert factory.score(["p"], ["aab"]).reward == [pytest.approx(2.0)]


def test_resolution_errors_are_clear():
    with pytest.raises(RewardError, match="neither a built-in"):
        build_reward(RewardSection(fn="no_such_reward"))
    with pytest.raises(RewardError, match="cannot import module 'no_such_module'"):
        build_reward(RewardSection(fn="no_such_module:f"))
    with pytest.raises(RewardError, match="has no attribute 'missing'"):
        build_reward(RewardSection(fn="toy_rewards:missing"))
    with pytest.raises(RewardError, match="bad args"):
        build_reward(RewardSection(fn="length", args={"bogus": 1}))


def test_weighted_mix_logs_each_component_and_none_propagates():
    from raftlib.config import RewardComponentSection as C

    reward = build_reward(
        RewardSection(
            fn=[C(fn="length", weight=0.5, args={"unit": "chars"}), C(fn="toy_rewards:none_for_empty", weight=2.0)]
        )
    )
    scores = reward.score(["p", "p"], ["aa", " "])
    assert reward.names == ["length", "none_for_empty"]
    assert scores.components["length"] == [2.0, 1.0]
    assert scores.components["none_for_empty"] == [1.0, None]
    assert scores.reward == [pytest.approx(0.5 * 2 + 2.0 * 1.0), None]
    recorded = build_reward(  # weight 0: recorded beside the total, never part of it, its None included
        RewardSection(fn=[C(fn="length", args={"unit": "chars"}), C(fn="toy_rewards:none_for_empty", weight=0.0)])
    )
    scores = recorded.score(["p", "p"], ["aa", " "])
    assert scores.components["none_for_empty"] == [1.0, None] and scores.reward == [2.0, 1.0]


def test_bad_reward_outputs():
    assert check_reward_output("r", [1, None, float("nan")], 3)[:2] == [1.0, None]
    assert math.isnan(check_reward_output("r", [float("nan")], 1)[0])  # kept; selection excludes it
    assert check_reward_output("r", torch.tensor([0.5, 1.5]), 2) == [0.5, 1.5]
    with pytest.raises(RewardError, match="returned 1 values for 2 completions"):
        check_reward_output("r", [1.0], 2)
    with pytest.raises(RewardError, match=r"returned 'high' \(str\) at index 1"):
        check_reward_output("r", [1.0, "high"], 2)
    with pytest.raises(RewardError, match="returned float"):
        check_reward_output("r", 1.0, 1)
    with pytest.raises(RewardError, match="at index 0"):
        check_reward_output("r", [True], 1)


def test_extra_columns_reach_the_reward():
    seen = {}

    def spy(prompts, completions, **columns):
        seen.update(columns)
        return [0.0] * len(completions)

    from raftlib.rewards import WeightedReward

    score_samples(
        WeightedReward([("spy", 1.0, spy)]),
        [sample(3, "x"), sample(5, "y")],
        {3: {"answer": "7"}, 5: {"answer": "9"}},
        batches=Batches(progress=False),
    )
    assert seen == {"answer": ["7", "9"]}


def test_exact_answer_parse_failure_is_none_never_one():
    reward = build_reward(RewardSection(fn="exact_answer"))
    completions = ["so the answer is 42.", "\\boxed{1,000}", "I think 42 is nice", "#### 41", "\\boxed{\\frac{1}{2}}"]
    scores = reward.score(["q"] * 5, completions, answer=["42", "1000", "42", "42", "\\frac{1}{2}"])
    assert scores.reward == [1.0, 1.0, None, 0.0, 1.0]
    assert extract_answer("no answer here 12") is None
    assert build_reward(RewardSection(fn="exact_answer", args={"answer_column": "gold"})).score(
        ["q"], ["answer: 0.5"], gold=["1/2"]
    ).reward == [1.0]
    with pytest.raises(RewardError, match="no column 'answer'"):
        reward.score(["q"], ["answer: 1"])


def test_reward_model_loads_to_score_and_frees(tmp_path):
    path = testing.build_gpt2_reward_model(tmp_path / "rm")
    scorer = build_reward(RewardSection(fn="reward_model", args={"path": str(path), "batch_size": 2}))
    rm = scorer.components[0][2]
    assert isinstance(rm, RewardModelScorer) and rm.model is None
    samples = [sample(i, text, prompt="the cat") for i, text in enumerate(["sat", "on the mat", "red", "blue sky"])]
    scores = score_samples(scorer, samples, {}, batch_size=3, batches=Batches(progress=False))
    assert rm.model is None  # freed after the scoring pass
    assert len(scores.reward) == 4 and all(isinstance(v, float) for v in scores.reward)
    assert len(set(scores.reward)) > 1
    # same scores one at a time: batching and padding do not change a reward
    one_by_one = [rm(["the cat"], [s.completion])[0] for s in samples]
    assert one_by_one == pytest.approx(scores.reward, abs=1e-5)


def test_reward_model_chat_template_and_errors(tmp_path):
    path = testing.build_gpt2_reward_model(tmp_path / "rm")
    rm = RewardModelScorer(str(path), use_chat_template=True)
    rm.setup()
    rm.tokenizer.chat_template = testing.CHAT_TEMPLATE
    assert rm._texts(["hi"], ["there"]) == ["<|user|>hi\n<|assistant|>there\n"]
    rm.teardown()
    with pytest.raises(ModelLoadError, match="no such directory"):
        RewardModelScorer(str(tmp_path / "missing")).setup()
    two = testing.build_gpt2_reward_model(tmp_path / "two", num_labels=2)
    with pytest.raises(ModelLoadError, match="has 2 labels"):
        RewardModelScorer(str(two)).setup()
    causal = testing.build_gpt2(tmp_path / "causal")
    with pytest.raises(ModelLoadError, match=r"lacks trained weights for score\.weight"):
        RewardModelScorer(str(causal)).setup()  # a causal LM dir would load with a random score head


def test_two_scorers_of_one_reward_model_share_one_copy_and_score_as_one_alone(tmp_path):
    """A GRPO baseline trains on the RM and evaluates with it in the same process: one copy of its weights,
    each scorer keeping its own batching (so its scores), freed when the last scorer lets go."""
    from raftlib import testing as T
    from raftlib.text import rewards

    path = str(T.build_gpt2_reward_model(tmp_path / "rm"))
    prompts, completions = ["a b", "c d e", "f"], [" g", " h i", " j k l"]
    alone = rewards.RewardModelScorer(path, batch_size=2)(prompts, completions)
    training, evaluation = rewards.RewardModelScorer(path, batch_size=64), rewards.RewardModelScorer(path, batch_size=2)
    training.setup()
    evaluation.setup()
    assert training.model is evaluation.model and len(rewards._LOADED) == 1
    assert evaluation(prompts, completions) == alone
    training.teardown()
    assert evaluation.model is not None and evaluation(prompts, completions) == alone  # still held
    evaluation.teardown()
    assert evaluation.model is None and not rewards._LOADED
