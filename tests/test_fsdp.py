"""Sharded fine-tuning (accelerate's FSDP2 plugin, examples/accelerate/fsdp.yaml) on two CPU processes (gloo).

Two processes under FSDP take the same optimizer steps over the same micro-batches as one process that
accumulates two micro-batches per step (tests/test_multiprocess.py explains the pairing); the fine-tune
shards every parameter, gradient and AdamW moment across the two, the loop gathers the full state dict to
the main process after each stage, writes the checkpoint once and every process reloads it to generate.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_multiprocess import SETTINGS, environment, free_port, one_process_reference

from conftest import base_config, kill_tree, snapshot, write_config

ROOT = Path(__file__).resolve().parents[1]
FSDP_CONFIG = ROOT / "examples" / "accelerate" / "fsdp.yaml"

WEIGHT_ATOL = 1e-6
"""Every final weight of the FSDP run within 1e-6 of one process's (measured here: equal to the bit).

Each optimizer step's gradient is the sum of its per-token terms divided by the step's tokens (raftlib.finetune):
one process accumulates two micro-batches, each scaled by 1/T; under FSDP each process scales its micro-batch by
2/T and the reduce-scatter halves the sum of two. Doubling and halving are exact in binary floating point and a
sum of two terms does not depend on its order, so the gradients agree to the bit. Gradient clipping is off in
these runs (test_multiprocess.SETTINGS): FSDP computes the clipping norm from per-shard sums of squares, in
another order than one process does, and Adam turns that last-bit difference of the clip factor into weight
differences of up to 2e-5 (lr / 250) spread over every layer (measured: 111 of 72,432 weights beyond 1e-6)."""


def launch(*arguments: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(FSDP_CONFIG),
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        "-m",
        "raftlib",
        *arguments,
    ]


@pytest.fixture(scope="module")
def reference(llama_dir, prompts_file, tmp_path_factory) -> dict:
    return one_process_reference(llama_dir, prompts_file, tmp_path_factory.mktemp("one"))


def assert_same_as(state: dict, reference: dict) -> None:
    assert state["samples"] == reference["samples"]
    assert state["kept"] == reference["kept"]
    assert state["iterations"] == reference["iterations"] == [0, 1, 2]
    assert state["eval"] == pytest.approx(reference["eval"], abs=1e-9)
    assert state["weights"].keys() == reference["weights"].keys()
    for name, tensor in reference["weights"].items():
        torch.testing.assert_close(state["weights"][name], tensor, rtol=0, atol=WEIGHT_ATOL)


def test_fsdp_two_processes_equal_one_and_the_checkpoint_loads(reference, llama_dir, prompts_file, tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "two"
    config = write_config(tmp_path / "two.yaml", base_config(llama_dir, prompts_file, run_dir, **SETTINGS))
    done = subprocess.run(launch("run", str(config)), env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sharded fine-tune (FSDP2)" in done.stderr
    state = snapshot(run_dir)
    difference = max((state["weights"][k] - v).abs().max().item() for k, v in reference["weights"].items())
    print(f"max |FSDP - one process| over the final weights: {difference:.3g}")  # shown with pytest -s
    assert_same_as(state, reference)
    # The gathered checkpoint is a plain Hugging Face model dir: every weight, unsharded, loads as it was saved.
    for directory in (run_dir / "iter_0001" / "checkpoint", run_dir / "final"):
        model = AutoModelForCausalLM.from_pretrained(directory)
        assert not any(type(p).__name__ == "DTensor" for p in model.parameters())
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()
    for name, tensor in state["weights"].items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=0)


def test_a_run_killed_in_a_sharded_fine_tune_resumes_to_the_same_run(reference, llama_dir, prompts_file, tmp_path):
    """SIGKILL to the launcher and both workers once iteration 1's selection is written (its FSDP fine-tune is
    starting), then `resume` under FSDP on two processes: the stage reruns from the base checkpoint."""
    import time

    run_dir = tmp_path / "two"
    config = write_config(tmp_path / "two.yaml", base_config(llama_dir, prompts_file, run_dir, **SETTINGS))
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(
            launch("run", str(config)), env=environment(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 300
        while not (run_dir / "iter_0001" / "select.done.json").exists():
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never finished selecting"
            time.sleep(0.02)
        kill_tree(process, run_dir)  # the launcher and both workers (each in its own session), all gone
    assert not (run_dir / "iter_0001" / "finetune.done.json").exists(), "killed too late: the stage had finished"
    done = subprocess.run(
        launch("resume", str(run_dir)), env=environment(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_as(snapshot(run_dir), reference)


def test_a_diffusion_unet_fine_tunes_sharded_and_its_checkpoint_loads(tmp_path):
    """The image modality under FSDP on two processes: a full fine-tune of a class-conditional UNet whose
    gathered checkpoint diffusers loads. Not compared with one process: each process draws the denoising
    loss's noise and timesteps for its own micro-batches from the stage seed, so the draws differ (as under DDP)."""
    import yaml
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    from raftlib.diffusion import testing as T
    from raftsuite.digits import write_prompts

    model = T.build_class_conditional(tmp_path / "model")
    prompts = write_prompts(tmp_path / "digits.jsonl", per_digit=2)
    raw = {
        "modality": "image",
        "model": {"path": str(model)},
        "data": {"prompts": str(prompts), "eval_prompts": 4},
        "generation": {
            "samples_per_prompt": 2,
            "num_inference_steps": 2,
            "guidance_scale": 1.0,
            "prompts_per_batch": 2,
        },
        "reward": {"fn": "toy_rewards:brightness", "batch_size": 4},
        "training": {"learning_rate": 1e-3, "epochs": 1, "micro_batch_size": 2},
        "loop": {"iterations": 1, "prompts_per_iteration": 8},
        "logging": {"tensorboard": False, "progress_bars": False},
        "output_dir": str(tmp_path / "two"),
    }
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump(raw))
    done = subprocess.run(launch("run", str(config)), env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sharded fine-tune (FSDP2)" in done.stderr
    base = UNet2DModel.from_pretrained(model / "unet").state_dict()
    for directory in (tmp_path / "two" / "iter_0001" / "checkpoint", tmp_path / "two" / "final"):
        trained = UNet2DModel.from_pretrained(directory / "unet").state_dict()
        assert trained.keys() == base.keys()
        assert any(not torch.equal(trained[k], v) for k, v in base.items()), "the sharded fine-tune changed nothing"
    saved = load_file(tmp_path / "two" / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == base.keys()


# ----------------------------------------------------------------------------------------------
# One Accelerator path: training.mixed_precision reaches every fine-tune
# ----------------------------------------------------------------------------------------------


def _record_matmul_dtypes(module: torch.nn.Module) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    for layer in module.modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            layer.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_a_direct_text_fine_tune_runs_in_the_configured_precision(precision, llama_dir):
    from transformers import AutoModelForCausalLM

    from raftlib.config import TrainingSection
    from raftlib.text.finetune import finetune

    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    seen = _record_matmul_dtypes(model)
    section = TrainingSection(learning_rate=1e-3, epochs=1, micro_batch_size=2, mixed_precision=precision)
    finetune(model, [([1, 2, 3], [4, 5, 6])] * 4, section, pad_id=0, seed=0, iteration=1, progress=False)
    assert set(seen) == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: the weights stay float32


def test_a_direct_diffusion_fine_tune_runs_in_the_configured_precision(tmp_path):
    from raftlib.config import TrainingSection
    from raftlib.diffusion import testing as T
    from raftlib.diffusion.config import ImageGenerationSection, PipelineSection
    from raftlib.diffusion.pipelines import generate_images
    from raftlib.diffusion.train import finetune_images, load_policy
    from raftlib.records import Prompt

    loaded = load_policy(PipelineSection(path=str(T.build_class_conditional(tmp_path / "cc"))), None, "cpu")
    prompts = [Prompt(i, f"digit {i}", {"label": i}) for i in range(2)]
    kept = generate_images(
        loaded, prompts, ImageGenerationSection(samples_per_prompt=2, num_inference_steps=2), seed=0, stream=1
    )
    seen = _record_matmul_dtypes(loaded.unet)
    section = TrainingSection(learning_rate=1e-3, epochs=1, micro_batch_size=2, mixed_precision="bf16")
    finetune_images(loaded, kept, section, seed=0, iteration=1, progress=False)
    assert seen and set(seen) == {torch.bfloat16}


def test_a_passed_accelerator_with_another_precision_is_refused():
    from raftlib.config import ConfigError, TrainingSection
    from raftlib.sharding import build_accelerator, stage_accelerator

    accelerator = build_accelerator(TrainingSection(mixed_precision="no"))
    with pytest.raises(ConfigError, match=r"training.mixed_precision = 'bf16'.*runs 'no'"):
        stage_accelerator(TrainingSection(mixed_precision="bf16"), accelerator)
    assert stage_accelerator(TrainingSection(), accelerator) is accelerator


def test_the_loop_sets_the_process_group_timeout(tmp_path):
    from raftlib import RAFTConfig
    from raftlib.config import ConfigError

    config = RAFTConfig.from_dict({"model": {"path": "m"}, "data": {"prompts": "p.jsonl"}, "reward": {"fn": "r"}})
    assert config.loop.process_group_timeout_minutes == 60.0
    with pytest.raises(ConfigError, match=r"loop.process_group_timeout_minutes = 0"):
        config.replace(["loop.process_group_timeout_minutes=0"])
    # The loop builds its accelerator with the timeout (applied when that call starts the process group).
    from datetime import timedelta

    from raftlib.sharding import build_accelerator

    accelerator = build_accelerator(config.training, timeout_minutes=config.loop.process_group_timeout_minutes)
    assert accelerator.init_handler.timeout == timedelta(minutes=60)


def test_lora_under_fsdp_equals_one_process(llama_dir, prompts_file, tmp_path):
    """LoRA with FSDP: the frozen base is sharded too (FSDP2 shards per parameter, trainable or not); the
    gathered state dict is filtered to the adapter by peft's save_pretrained."""
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    from raftlib import load_config, run

    lora = SETTINGS | {"model": {"path": str(llama_dir), "lora": {"r": 4, "alpha": 8}}}
    one = tmp_path / "one"
    accumulate = lora | {"training": lora["training"] | {"gradient_accumulation_steps": 2}}
    run(load_config(write_config(tmp_path / "one.yaml", base_config(llama_dir, prompts_file, one, **accumulate))))
    config = write_config(tmp_path / "two.yaml", base_config(llama_dir, prompts_file, tmp_path / "two", **lora))
    done = subprocess.run(launch("run", str(config)), env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for iteration in (1, 2):
        kept = [
            [(r["prompt_id"], r["sample_index"], r["completion"]) for r in pq.read_table(path).to_pylist() if r["kept"]]
            for path in (run / f"iter_{iteration:04d}" / "samples.parquet" for run in (one, tmp_path / "two"))
        ]
        assert kept[0] == kept[1]
    reference = load_file(one / "final" / "adapter_model.safetensors")
    sharded = load_file(tmp_path / "two" / "final" / "adapter_model.safetensors")
    assert sharded.keys() == reference.keys() and all("lora_" in k for k in reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=0, atol=WEIGHT_ATOL)


def sharded_evaluation_copy(model_dir: str) -> dict:
    """Run in each of two FSDP2 workers (raftsuite.children): shard the model as a fine-tune does, change every
    weight in place on its shard (as training would), take the GRPO callback's evaluation copy, change them again
    and take it again: the second call must reuse the copy and hold the new weights."""
    from torch.distributed.fsdp import FSDPModule
    from transformers import AutoModelForCausalLM

    from raftlib.config import TrainingSection
    from raftlib.sharding import build_accelerator
    from raftsuite import children
    from raftsuite import reasoning as R

    accelerator = build_accelerator(TrainingSection())
    model = accelerator.prepare(AutoModelForCausalLM.from_pretrained(model_dir))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(0.5)
    settings, held = R.ReasoningSettings(base_model=model_dir), {}
    first = R.evaluation_copy(model, settings, held)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(2.0)  # another step moves every weight again
    copy = R.evaluation_copy(model, settings, held)  # the same copy, its weights replaced
    if children.rank() != 0:
        assert first is None and copy is None and not held
        return {}
    assert copy is first
    reference = AutoModelForCausalLM.from_pretrained(model_dir)  # halved, then doubled: exact in binary
    prompt = torch.tensor([[1, 5, 9, 3]])
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    return {
        "sharded": isinstance(model, FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules()),
        "plain": not any(isinstance(m, FSDPModule) for m in copy.modules()),
        "same_weights": all(
            torch.equal(a, b) for a, b in zip(copy.state_dict().values(), reference.state_dict().values(), strict=True)
        ),
        "same_generation": copy.generate(prompt, **kwargs).tolist() == reference.generate(prompt, **kwargs).tolist(),
    }


def test_grpo_s_evaluation_copy_of_a_sharded_policy_is_its_whole_trained_model(llama_dir, tmp_path):
    """Under FSDP2 the GRPO callback must not run a forward on the main process alone (it would wait forever
    for the other rank's all-gathers): every rank joins the gather, and the main process evaluates a plain copy
    holding the trained weights (here halved, then doubled, reusing the copy), generating as the unsharded model
    does."""
    from raftsuite import children

    record = children.run_in_child(
        "test_fsdp:sharded_evaluation_copy",
        {"model_dir": str(llama_dir)},
        tmp_path / "out.json",
        tmp_path / "log.txt",
        num_processes=2,
        accelerate_config=str(FSDP_CONFIG),
        echo=lambda line: None,
    )
    assert record["processes"] == 2
    assert record["result"] == {"sharded": True, "plain": True, "same_weights": True, "same_generation": True}
