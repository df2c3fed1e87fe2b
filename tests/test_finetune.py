"""Fine-tuning: the completion mask, one step changes weights and raises the kept completions' likelihood."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raftlib.config import LoraSection, ModelSection, TrainingSection
from raftlib.finetune import epoch_order
from raftlib.text.finetune import IGNORE_INDEX, collate, completion_labels, completion_logprobs, finetune
from raftlib.text.models import load_policy, save_model


def test_completion_mask_by_hand():
    assert completion_labels([5, 6, 7], [8, 0]) == [IGNORE_INDEX] * 3 + [8, 0]


def test_collate_keeps_eos_even_when_pad_is_eos():
    eos = 0  # pad id == eos id, as when a tokenizer without a pad token pads with EOS
    batch = collate([([5, 6], [7, eos]), ([5], [9, 9, 9, eos])], pad_id=eos)
    assert batch["input_ids"].tolist() == [[5, 6, 7, eos, eos], [5, 9, 9, 9, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # EOS at the end of each completion is a target; the padding EOS is not
    assert batch["labels"].tolist() == [[-100, -100, 7, eos, -100], [-100, 9, 9, 9, eos]]


def test_epoch_order_is_a_seeded_permutation():
    assert sorted(epoch_order(10, 0, 1, 0)) == list(range(10))
    assert epoch_order(10, 0, 1, 0) == epoch_order(10, 0, 1, 0)
    assert epoch_order(10, 0, 1, 0) != epoch_order(10, 0, 1, 1)


def kept_examples(tokenizer):
    texts = [("the cat", " sat on the mat."), ("a dog", " is very happy."), ("red", " apple tree.")]
    return [
        (tokenizer(p)["input_ids"], tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        for p, c in texts
    ]


def test_one_stage_changes_weights_and_raises_kept_likelihood(gpt2_dir):
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    examples = kept_examples(tokenizer)
    before_weights = {k: v.clone() for k, v in model.state_dict().items()}
    before, _ = completion_logprobs(model, examples, pad_id=tokenizer.eos_token_id)
    section = TrainingSection(learning_rate=1e-2, epochs=2, micro_batch_size=2)
    model, stats = finetune(
        model, examples, section, pad_id=tokenizer.eos_token_id, seed=0, iteration=1, progress=False
    )
    after, _ = completion_logprobs(model, examples, pad_id=tokenizer.eos_token_id)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before_weights[k])]
    assert changed, "no weight changed"
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    assert stats.optimizer_steps == 4 and stats.micro_batches == 4  # 2 epochs x ceil(3/2)
    assert stats.trained_tokens == 2 * sum(len(c) for _, c in examples)
    assert stats.last_epoch_loss < stats.first_epoch_loss


def test_gradient_accumulation_counts_steps(gpt2_dir):
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    section = TrainingSection(learning_rate=1e-3, epochs=1, micro_batch_size=1, gradient_accumulation_steps=2)
    _, stats = finetune(model, kept_examples(tokenizer), section, pad_id=0, seed=0, iteration=1, progress=False)
    assert stats.micro_batches == 3 and stats.optimizer_steps == 2


def test_same_seed_same_weights(gpt2_dir):
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    section = TrainingSection(learning_rate=1e-2, epochs=1, micro_batch_size=2)
    results = []
    for _ in range(2):
        model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
        model, _ = finetune(model, kept_examples(tokenizer), section, pad_id=0, seed=5, iteration=2, progress=False)
        results.append(model.state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])  # the same arithmetic, repeated


def test_lora_trains_only_the_adapter_and_saves_a_loadable_adapter(gpt2_dir, tmp_path):
    from peft import PeftModel

    section = ModelSection(path=str(gpt2_dir), lora=LoraSection(r=4, alpha=8, target_modules=["c_attn"]))
    policy = load_policy(section)
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    base_before = {k: v.clone() for k, v in policy.state_dict().items() if "lora_" not in k}
    lora_before = {k: v.clone() for k, v in policy.state_dict().items() if "lora_" in k}
    policy, _ = finetune(
        policy,
        kept_examples(tokenizer),
        TrainingSection(learning_rate=1e-2, epochs=1, micro_batch_size=2),
        pad_id=0,
        seed=0,
        iteration=1,
        progress=False,
    )
    state = policy.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_before.items())
    assert any(not torch.equal(state[k], v) for k, v in lora_before.items())
    save_model(policy, tokenizer, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_dir), tmp_path / "adapter")
    ids = torch.tensor([tokenizer("the cat sat")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, policy(ids).logits, atol=1e-5)
