"""Every full fine-tune of the suite keeps float32 master weights (bf16 only as autocast): raftlib's fine-tune,
the HH SFT setup, the tiny reward model and both TRL GRPO baselines. The optimizer's parameters are inspected as
it steps (real training, AdamW's `step` watched). A config that asks for pure bf16 gets a warning with the
rounding arithmetic."""

import contextlib
import json
import logging

import pytest
import torch
from safetensors import safe_open

from raftlib import testing as T
from raftlib.config import TrainingSection
from raftlib.text.finetune import finetune


@contextlib.contextmanager
def optimizer_dtypes():
    """The dtypes of every parameter an AdamW step updates while the block runs (torch's own AdamW, watched)."""
    seen: list[str] = []
    real = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.extend(str(p.dtype) for group in self.param_groups for p in group["params"])
        return real(self, *args, **kwargs)

    torch.optim.AdamW.step = step
    try:
        yield seen
    finally:
        torch.optim.AdamW.step = real


EXAMPLES = [(list(range(1, 9)), list(range(9, 17)))] * 8


def test_raftlib_fine_tune_keeps_float32_masters_under_bf16_autocast(tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(T.build_gpt2(tmp_path / "m"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    section = TrainingSection(learning_rate=1e-3, epochs=1, micro_batch_size=4, mixed_precision="bf16")
    with optimizer_dtypes() as seen, caplog.at_level(logging.WARNING, "raftlib"):
        model, _ = finetune(model, EXAMPLES, section, pad_id=0, seed=0, iteration=1, progress=False)
    assert seen and set(seen) == {"torch.float32"}
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())  # it trained
    assert "pure low-precision" not in caplog.text


def test_a_pure_bf16_fine_tune_warns_with_the_rounding_arithmetic(tmp_path, caplog):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(T.build_gpt2(tmp_path / "m"), dtype=torch.bfloat16)
    section = TrainingSection(learning_rate=1e-6, epochs=1, micro_batch_size=4)
    with optimizer_dtypes() as seen, caplog.at_level(logging.WARNING, "raftlib"):
        finetune(model, EXAMPLES, section, pad_id=0, seed=0, iteration=1, progress=False)
    assert set(seen) == {"torch.bfloat16"}
    assert "pure low-precision AdamW" in caplog.text and "0.00026 to 0.00051" in caplog.text


def test_the_hh_sft_setup_trains_float32_masters_and_saves_them(tmp_path):
    from raftsuite import hh_paper

    model = T.build_llama(tmp_path / "llama", chat_template=False)
    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(json.dumps([p, c]) + "\n" for p, c in EXAMPLES))
    job = {
        "policy_model": str(model),
        "examples": str(examples),
        "output_dir": str(tmp_path / "sft"),
        "progress": False,
        "training": {"learning_rate": 1e-4, "epochs": 1, "micro_batch_size": 4, "mixed_precision": "bf16"},
    }
    with optimizer_dtypes() as seen:
        hh_paper.sft_child(job)
    assert seen and set(seen) == {"torch.float32"}
    with safe_open(tmp_path / "sft" / "model.safetensors", "pt") as saved:
        assert {saved.get_tensor(k).dtype for k in saved.keys()} == {torch.float32}


@pytest.mark.parametrize("policy_dtype", ["float32", "bfloat16"])
def test_the_reasoning_grpo_baseline_trains_the_masters_its_config_asks_for(tmp_path, caplog, policy_dtype):
    """float32 masters under bf16 autocast by default; a config asking for pure bf16 gets it, with the warning."""
    from test_reasoning import TINY_PROBLEMS

    from raftsuite import reasoning as R

    files = R.problem_files(tmp_path / "problems", TINY_PROBLEMS)
    settings = R.ReasoningSettings(
        base_model="assets/tiny-math",
        iterations=1,
        prompts_per_iteration=8,
        eval_samples_per_prompt=2,
        micro_batch_size=4,
        grpo_updates_per_generation=2,
        mixed_precision="bf16",
        policy_dtype=policy_dtype,
    )
    job = {
        "settings": vars(settings),
        "files": vars(files),
        "run": {"method": "GRPO", "learning_rate": 1e-4, "seed": 0},
        "output_dir": str(tmp_path / "grpo"),
    }
    with optimizer_dtypes() as seen, caplog.at_level(logging.WARNING, "raftlib"):
        record = R.grpo_curve(job)
    assert seen and set(seen) == {f"torch.{policy_dtype}"}
    assert ("pure low-precision AdamW" in caplog.text) == (policy_dtype == "bfloat16")
    assert [row["iteration"] for row in record["iterations"]] == [0, 1]


def hh_grpo_settings(tmp_path, **overrides):
    """A two-step HH GRPO run on a tiny GPT-2 policy and reward model."""
    from raftsuite import hh_methods

    policy, reward = T.build_gpt2(tmp_path / "policy"), T.build_gpt2_reward_model(tmp_path / "rm")
    shape = {"samples_per_prompt": 2, "max_new_tokens": 4, "prompts_per_iteration": 4, "iterations": 1}
    return hh_methods.MethodSettings(
        sft_model=str(policy), reward_model=str(reward), grpo_prompts_per_step=2, gold=False, **shape, **overrides
    )


def test_the_hh_grpo_baseline_trains_float32_masters(tmp_path):
    from raftlib.records import Prompt
    from raftsuite import hh_methods

    settings = hh_grpo_settings(tmp_path, mixed_precision="bf16")
    prompts = [Prompt(i, f"prompt number {i}", {}) for i in range(8)]
    with optimizer_dtypes() as seen:
        record = hh_methods.run_grpo(settings, prompts, hh_methods.MethodRun("grpo", 1e-4, 0), tmp_path / "out")
    assert seen and set(seen) == {"torch.float32"} and record["steps"] == 2


def test_the_hh_grpo_baseline_with_lora_keeps_raft_s_base_dtype_and_float32_adapters(tmp_path):
    """With `lora_rank` GRPO trains RAFT's adapter on RAFT's base: the frozen base in policy_dtype (what the
    planner plans), the adapters float32."""
    from dataclasses import replace

    from transformers import TrainerCallback

    from raftlib.records import Prompt
    from raftsuite import hh_methods

    settings = hh_grpo_settings(tmp_path, lora_rank=2, policy_dtype="bfloat16")
    assert hh_methods.grpo_weights_dtype(settings) == "bfloat16"
    assert hh_methods.grpo_weights_dtype(replace(settings, lora_rank=0)) == "float32"
    frozen: set[str] = set()

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            frozen.update(str(p.dtype) for p in model.parameters() if not p.requires_grad)

    prompts = [Prompt(i, f"prompt number {i}", {}) for i in range(8)]
    with optimizer_dtypes() as seen:
        hh_methods.run_grpo(settings, prompts, hh_methods.MethodRun("grpo", 1e-4, 0), tmp_path / "out", [Watch()])
    assert set(seen) == {"torch.float32"} and frozen == {"torch.bfloat16"}


def test_the_tiny_reward_model_trains_float32(tmp_path):
    """The tiny setup's Bradley-Terry reward model: float32 on the CPU it trains on (it is never bf16)."""
    from types import SimpleNamespace

    from raftsuite import hh

    base = T.build_gpt2(tmp_path / "base", pad_token=True)
    pairs = [
        (SimpleNamespace(prompt=f"p{i} ", completion="good text"), SimpleNamespace(prompt=f"p{i} ", completion="bad"))
        for i in range(8)
    ]
    settings = hh.SetupSettings(base_model=str(base), rm_epochs=1)
    with optimizer_dtypes() as seen:
        hh.train_reward_model(str(base), pairs[:6], pairs[6:], tmp_path / "rm", settings)
    assert seen and set(seen) == {"torch.float32"}
