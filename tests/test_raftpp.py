"""RAFT++ (training.loss = raftpp), pass@k, policy entropy and verified-correct selection, by hand."""

import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raftlib.config import ConfigError, LoopSection, TrainingSection
from raftlib.metrics import pass_at_k, pass_at_k_metrics, token_entropy_mean
from raftlib.sections import SelectionSection as Rule
from raftlib.select import select
from raftlib.text.finetune import (
    collate,
    collate_with_old,
    completion_logprobs,
    completion_token_logprobs,
    finetune,
    token_logprobs,
)
from raftlib.text.losses import clipped_ratio_loss, token_entropy

# ---- the clipped loss ------------------------------------------------------------------------------


def test_clipped_loss_value_by_hand():
    # three completion tokens and one padding position; ratios 1.0, 1.5 (clipped above at 1.28), 0.5
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5, 7.0]]))
    mask = torch.tensor([[True, True, True, False]])
    result = clipped_ratio_loss(logp, old, mask, clip_low=0.2, clip_high=0.28)
    # -min(r, clip(r)) per token: -1.0, -1.28, -0.5, summed (the stage divides each step by its tokens)
    assert result.loss.item() == pytest.approx(-(1.0 + 1.28 + 0.5))
    assert result.clip_fraction == pytest.approx(1 / 3)  # only the 1.5 token is clipped
    # approx KL = mean(log old - log new) = -(0 + log 1.5 + log 0.5) / 3
    assert result.approx_kl == pytest.approx(-(math.log(1.5) + math.log(0.5)) / 3)


def test_symmetric_clip_when_no_clip_high():
    logp = torch.log(torch.tensor([[1.25]]))
    result = clipped_ratio_loss(logp, torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), clip_low=0.2)
    assert result.loss.item() == pytest.approx(-1.2)


def test_clipped_tokens_have_zero_gradient_on_the_clipped_side():
    # token 0: r = 1.5 > 1 + 0.28 with A = +1 -> clipped above, no gradient
    # token 1: r = 0.5 < 1 - 0.2 with A = +1 -> min picks r itself, gradient -r flows
    # token 2: r = 0.5 < 1 - 0.2 with A = -1 -> clipped below, no gradient
    # token 3: r = 1.1 inside the range with A = -1 -> gradient +r
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.1]])).requires_grad_(True)
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss = clipped_ratio_loss(
        logp, torch.zeros(1, 4), torch.ones(1, 4, dtype=torch.bool), clip_low=0.2, clip_high=0.28, advantages=advantages
    ).loss
    loss.backward()
    # d/dlogp of -A * exp(logp - old) = -A * r (a sum over tokens: no 1/N here)
    assert logp.grad.tolist()[0] == pytest.approx([0.0, -0.5, 0.0, 1.1])


def test_gradient_equals_sfts_when_ratio_is_one():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 7, 8, 1, -100]])
    logp, _ = token_logprobs(logits, labels)
    (-logp.sum()).backward()  # SFT's summed cross-entropy
    sft_grad = logits.grad.clone()
    logits.grad = None
    logp, mask = token_logprobs(logits, labels)
    result = clipped_ratio_loss(logp, logp.detach(), mask, clip_low=0.2, clip_high=0.28)
    result.loss.backward()
    assert result.clip_fraction == 0.0
    assert torch.allclose(logits.grad, sft_grad, atol=1e-7)
    # the loss value is -1 per token (ratio 1), not the cross-entropy: only the gradient matches
    assert result.loss.item() == pytest.approx(-float(mask.sum()))


def test_entropy_by_hand():
    uniform = torch.zeros(4)
    assert token_entropy(uniform).item() == pytest.approx(math.log(4))
    peaked = torch.tensor([0.0, -1e9])
    assert token_entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)


# ---- the fine-tune stage with raftpp ------------------------------------------------------------------


def examples(tokenizer):
    texts = [("the cat", " sat on the mat."), ("a dog", " is very happy."), ("red", " apple tree.")]
    return [
        (tokenizer(p)["input_ids"], tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        for p, c in texts
    ]


def test_collate_with_old_aligns_with_the_shifted_labels():
    batch = collate_with_old([([5, 6], [7, 0], [-0.1, -0.2]), ([5], [9, 9, 0], [-1.0, -2.0, -3.0])], pad_id=0)
    # the shifted labels are [[-100, 7, 0], [9, 9, 0]]: old log-probs sit exactly where a label is
    assert batch["labels"][:, 1:].tolist() == [[-100, 7, 0], [9, 9, 0]]
    assert torch.allclose(batch["old_logprobs"], torch.tensor([[0.0, -0.1, -0.2], [-1.0, -2.0, -3.0]]))
    with pytest.raises(ValueError, match="2 old log-probabilities for a completion of 3 tokens"):
        collate_with_old([([5], [9, 9, 0], [-1.0, -2.0])], pad_id=0)


def test_token_logprobs_sum_to_the_sequence_logprob(gpt2_dir):
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    kept = examples(tokenizer)
    per_token = completion_token_logprobs(model, kept, tokenizer.eos_token_id)
    sums, counts = completion_logprobs(model, kept, tokenizer.eos_token_id)
    assert [len(t) for t in per_token] == counts == [len(c) for _, c in kept]
    assert [sum(t) for t in per_token] == pytest.approx(sums, abs=1e-4)


def test_chunked_pi_old_and_loss_equal_the_whole_logits(gpt2_dir):
    """loss_chunk_tokens: pi_old and the RAFT++ loss from hidden states a few positions at a time, the same
    numbers as from the whole (B, T, V) logits, and the same trained weights."""
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    kept = examples(tokenizer)
    whole = completion_token_logprobs(model, kept, tokenizer.eos_token_id)
    chunked = completion_token_logprobs(model, kept, tokenizer.eos_token_id, chunk_tokens=3)
    for a, b in zip(whole, chunked, strict=True):
        assert b == pytest.approx(a, abs=1e-5)
    from raftlib.text.losses import build_loss

    grads = {}
    for chunk in (0, 3):  # the loss and its gradient, whole logits against chunks of 3 positions
        model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
        loss = build_loss(TrainingSection(loss="raftpp", loss_chunk_tokens=chunk), tokenizer.eos_token_id)
        items = loss.prepare(model, kept)
        model.zero_grad()
        value = loss(model, loss.collate(items))
        value.backward()
        grads[chunk] = (float(value), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[3][0] == pytest.approx(grads[0][0], rel=1e-6)
    for name, grad in grads[0][1].items():
        assert torch.allclose(grad, grads[3][1][name], rtol=1e-5, atol=1e-5), name


def test_one_raftpp_step_equals_one_sft_step(gpt2_dir):
    """Ratio = 1 at the stage's first step (pi_old is the entering policy, no dropout): same update as SFT."""
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    kept = examples(tokenizer)
    weights = {}
    for loss in ("sft", "raftpp"):
        model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
        section = TrainingSection(learning_rate=1e-2, epochs=1, micro_batch_size=8, loss=loss, clip_range_high=0.28)
        model, stats = finetune(
            model, kept, section, pad_id=tokenizer.eos_token_id, seed=0, iteration=1, progress=False
        )
        assert stats.optimizer_steps == 1
        weights[loss] = model.state_dict()
    for name, value in weights["sft"].items():
        assert torch.allclose(value, weights["raftpp"][name], atol=1e-6), name


def test_raftpp_stage_raises_kept_likelihood(gpt2_dir):
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    kept = examples(tokenizer)
    before, _ = completion_logprobs(model, kept, tokenizer.eos_token_id)
    section = TrainingSection(learning_rate=1e-2, epochs=3, micro_batch_size=1, loss="raftpp")
    model, stats = finetune(model, kept, section, pad_id=tokenizer.eos_token_id, seed=0, iteration=1, progress=False)
    after, _ = completion_logprobs(model, kept, tokenizer.eos_token_id)
    assert all(a > b for a, b in zip(after, before, strict=True))
    assert stats.optimizer_steps == 9


def test_raftpp_declares_what_it_cannot_do_and_build_loss_refuses_it():
    from raftlib.text.losses import build_loss

    assert TrainingSection(loss="raftpp").clip_range == 0.2
    with pytest.raises(ConfigError, match=r"training\.packing = true: loss .raftpp. cannot train on packed"):
        build_loss(TrainingSection(loss="raftpp", packing=True), 0)
    build_loss(TrainingSection(loss="raftpp", loss_chunk_tokens=64), 0)  # it chunks pi_old and its loss
    with pytest.raises(ConfigError, match=r"training\.clip_range_high = -0\.1"):
        TrainingSection(clip_range_high=-0.1).validate("training")
    with pytest.raises(ConfigError, match=r"loop.pass_k = 5: must be in \[1, eval_samples_per_prompt = 4\]"):
        LoopSection(eval_samples_per_prompt=4, pass_k=5).validate("loop")


# ---- pass@k and entropy metrics ------------------------------------------------------------------------


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0  # n - c < k: every draw holds a correct one
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_pass_at_k_metrics_count_none_as_wrong():
    pids = [0, 0, 0, 0, 1, 1, 1, 1]
    rewards = [1.0, 0.0, None, 0.0, 1.0, 1.0, float("nan"), 0.0]
    metrics = pass_at_k_metrics(pids, rewards, threshold=1.0, k=2)
    assert metrics["eval_pass_at_1"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert metrics["eval_pass_at_k"] == pytest.approx(((1 - 3 / 6) + (1 - 1 / 6)) / 2)
    with pytest.raises(ValueError, match="same number of samples per prompt"):
        pass_at_k_metrics([0, 0, 1], [1.0, 0.0, 1.0], threshold=1.0, k=1)


def test_token_entropy_mean_is_per_token():
    # two samples: 3 tokens with entropy sum 3.0, 1 token with 1.0 -> (3 + 1) / 4; None skipped
    assert token_entropy_mean([3.0, 1.0, None], [3, 1, 5]) == pytest.approx(1.0)
    assert math.isnan(token_entropy_mean([None], [2]))


def test_generation_records_the_entropy_of_each_sampled_position(gpt2_dir):
    from test_generate import draw

    from raftlib.config import GenerationSection
    from raftlib.records import Prompt

    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    settings = GenerationSection(samples_per_prompt=2, max_new_tokens=6, temperature=0.7)
    samples = draw(model, tokenizer, [Prompt(0, "the cat")], settings)
    for sample in samples:
        batch = collate([(sample.prompt_token_ids, sample.completion_token_ids)], tokenizer.eos_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"]).logits[0]  # (T, V)
        start = len(sample.prompt_token_ids) - 1
        expected = token_entropy(logits[start : start + sample.completion_token_count]).sum().item()
        assert sample.entropy == pytest.approx(expected, rel=1e-4)  # temperature-1 entropy, not the sampling one


# ---- selection: every verified-correct sample, or best of K ------------------------------------------


def test_threshold_keeps_every_correct_sample_and_local_keeps_one():
    # 2 prompts x K = 4, verifier rewards (1 correct, 0 wrong, None unparsable)
    rewards = np.array([1.0, 0.0, 1.0, np.nan, 0.0, 0.0, np.nan, 0.0])
    pids = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    sidx = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    every = select(Rule(strategy="threshold", threshold=1.0), rewards, pids, sidx, samples_per_prompt=4)
    assert every.kept.tolist() == [True, False, True, False, False, False, False, False]
    assert every.invalid_count == 2
    best = select(Rule(), rewards, pids, sidx, samples_per_prompt=4)
    # best of K keeps one per prompt even when it is wrong (prompt 1): why RAFT on a verifier uses threshold
    assert best.kept.tolist() == [True, False, False, False, True, False, False, False]


# ---- the loop with a verifier-style reward -------------------------------------------------------------


def has_letter_a(prompts, completions, **columns):
    """A 0/1 'verifier' for the random tiny model: does the completion contain an 'a'? (None when empty)."""
    return [None if not c.strip() else float("a" in c) for c in completions]


def test_loop_with_raftpp_threshold_selection_and_pass_at_k(gpt2_dir, prompts_file, tmp_path):
    from pathlib import Path

    from conftest import base_config
    from raftlib import RAFTConfig, run

    raw = base_config(gpt2_dir, prompts_file, tmp_path / "run")
    raw |= {
        "reward": {"fn": "test_raftpp:has_letter_a"},
        "selection": {"strategy": "threshold", "threshold": 1.0},
        "training": {"learning_rate": 1e-3, "epochs": 2, "micro_batch_size": 4, "loss": "raftpp"},
        "loop": {
            "iterations": 1,
            "prompts_per_iteration": 8,
            "eval_samples_per_prompt": 4,
            "pass_threshold": 1.0,
            "pass_k": 2,
        },
    }
    rows = run(RAFTConfig.from_dict(raw)).metrics
    documented = set((Path(__file__).parent.parent / "docs" / "metrics.md").read_text().split("`")[1::2])
    for row in rows:
        assert {"eval_pass_at_1", "eval_pass_at_k", "eval_token_entropy"} <= set(row)
        assert 0.0 <= row["eval_pass_at_1"] <= row["eval_pass_at_k"] <= 1.0
        assert row["eval_token_entropy"] > 0
        assert not {k for k in row if k not in documented and not k.startswith("reward/")}
    assert rows[1]["sample_token_entropy"] > 0
    assert rows[1]["kept_count"] == round(
        rows[1]["reward_mean"] * (rows[1]["reward_count"] - rows[1]["reward_invalid"])
    )


def test_pi_old_is_taken_in_the_precision_pi_theta_is_trained_in(tmp_path):
    """Under bf16 autocast the first micro-batch's ratio pi_theta / pi_old is exactly 1 (its weights have not
    moved): pi_old comes from the same autocast forward. Taken in float32 it differed by 6.6e-4 in log here."""
    from transformers import AutoModelForCausalLM

    from raftlib import testing as T
    from raftlib.config import TrainingSection
    from raftlib.text import losses
    from raftlib.text.finetune import finetune

    gaps: list[float] = []
    real = losses.clipped_ratio_loss

    def watched(logprobs, old_logprobs, mask, **kwargs):
        gaps.append(float(((logprobs.detach().float() - old_logprobs.float()).abs() * mask).max()))
        return real(logprobs, old_logprobs, mask, **kwargs)

    model = AutoModelForCausalLM.from_pretrained(T.build_gpt2(tmp_path / "m"))
    examples = [(list(range(1, 9)), list(range(9, 9 + n))) for n in (8, 5, 12, 3, 8, 7, 10, 4)]
    section = TrainingSection(learning_rate=1e-3, epochs=1, micro_batch_size=4, mixed_precision="bf16", loss="raftpp")
    losses.clipped_ratio_loss = watched
    try:
        finetune(model, examples, section, pad_id=0, seed=0, iteration=1, progress=False)
    finally:
        losses.clipped_ratio_loss = real
    assert gaps[0] == 0.0 and gaps[-1] > 0  # unchanged weights: ratio 1; after a step it moves
