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


# ----------------------------------------------------------------------------------------------
# One optimizer step's gradient, however its tokens are laid out
# ----------------------------------------------------------------------------------------------

GRADIENT_ATOL = 1e-6
"""The step's gradients agree to float rounding: the same per-token terms summed in another order (measured on
this machine: at most 6e-8 apart, for gradient elements up to 0.37)."""


def test_a_steps_gradient_is_normalised_by_its_tokens_whatever_the_layout(gpt2_dir, tmp_path):
    """(micro-batch 8, accumulation 1) = (2, 4) = packed (4, 2) = 2 processes x (4, 1); the mean of micro-batch
    means that raftlib used before differs from all of them (so the comparison can fail)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file
    from step_gradients import EXAMPLES, first_step_gradients

    from raftlib.text.finetune import completion_loss

    reference = first_step_gradients(str(gpt2_dir), 8, 1)
    layouts = {
        "(2, 4)": first_step_gradients(str(gpt2_dir), 2, 4),
        "packed (4, 2)": first_step_gradients(str(gpt2_dir), 4, 2, True),
    }
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "two.safetensors"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(root / "examples/accelerate/ddp.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(port),
        str(root / "tests" / "step_gradients.py"),
        str(gpt2_dir),
        str(out),
        "4",
        "1",
    ]
    env = os.environ | {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    layouts["2 processes x (4, 1)"] = load_file(out)
    for name, gradients in layouts.items():
        assert gradients.keys() == reference.keys()
        for key, tensor in reference.items():
            torch.testing.assert_close(gradients[key], tensor, rtol=0, atol=GRADIENT_ATOL, msg=f"{name}, tensor {key}")

    # What averaging micro-batch means gives for (2, 4): a different gradient, by far more than the tolerance.
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model.train()
    for start in range(0, 8, 2):
        batch = collate(EXAMPLES[start : start + 2], 0)
        loss = completion_loss(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
        )
        (loss / 4).backward()
    averaged = [p.grad for p in model.parameters() if p.requires_grad]
    largest = max((averaged[int(k)] - v).abs().max().item() for k, v in reference.items())
    assert largest > 100 * GRADIENT_ATOL, largest


def test_a_loss_written_as_the_docstring_shows_plugs_in_by_module_name(gpt2_dir, tmp_path, monkeypatch):
    """The ten-line loss of raftlib.text.losses' docstring, saved as a module, trains through `training.loss`;
    what it declares it cannot do (packing) is refused, and a wrong path names the setting."""
    import textwrap

    import pytest

    from raftlib.config import ConfigError
    from raftlib.text import losses

    example = losses.__doc__.split("`training.loss: my_losses:TokenWeightedSFT`):", 1)[1]
    (tmp_path / "my_losses.py").write_text(textwrap.dedent(example))
    monkeypatch.syspath_prepend(str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    examples = kept_examples(tokenizer)
    before, _ = completion_logprobs(model, examples, pad_id=tokenizer.eos_token_id)
    section = TrainingSection(learning_rate=1e-2, epochs=2, micro_batch_size=2, loss="my_losses:TokenWeightedSFT")
    model, stats = finetune(
        model, examples, section, pad_id=tokenizer.eos_token_id, seed=0, iteration=1, progress=False
    )
    after, _ = completion_logprobs(model, examples, pad_id=tokenizer.eos_token_id)
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    assert stats.trained_tokens == 2 * sum(len(c) for _, c in examples)
    with pytest.raises(ConfigError, match=r"training\.packing = true: loss 'my_losses:TokenWeightedSFT' cannot"):
        losses.build_loss(TrainingSection(loss="my_losses:TokenWeightedSFT", packing=True), 0)
    with pytest.raises(ConfigError, match=r"training\.loss 'my_losses:Nope': module 'my_losses' has no attribute"):
        losses.build_loss(TrainingSection(loss="my_losses:Nope"), 0)
    with pytest.raises(ConfigError, match=r"training\.loss 'no_such_module:X': cannot import module"):
        losses.build_loss(TrainingSection(loss="no_such_module:X"), 0)
