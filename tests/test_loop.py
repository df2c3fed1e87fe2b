"""The whole loop: learning happens, the run directory holds what it promises, resume after SIGKILL is exact."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from conftest import RESUME, assert_same_run, base_config, read_run_dir, snapshot, write_config
from raftlib import RAFTConfig, resume, run
from raftlib.store import RunDirError, RunStore

TESTS = Path(__file__).parent
TOY = TESTS.parent / "examples" / "toy"
ENV = {**os.environ, "PYTHONPATH": f"{TOY}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

LEARNING = {
    "loop": {"iterations": 4, "prompts_per_iteration": 16},
    "generation": {"samples_per_prompt": 8, "max_new_tokens": 12, "prompts_per_batch": 8},
    "training": {"learning_rate": 1.0e-2, "epochs": 2, "micro_batch_size": 8},
}


def test_reward_rises_over_iterations_and_run_dir_is_complete(gpt2_dir, prompts_file, tmp_path):
    config = RAFTConfig.from_dict(base_config(gpt2_dir, prompts_file, tmp_path / "run", **LEARNING))
    result = run(config)
    rows = result.metrics
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4]
    # the toy reward (share of 'a') rises on the training samples and on held-out prompts
    assert rows[4]["reward_mean"] > 2 * rows[1]["reward_mean"]
    assert rows[4]["eval_reward_mean"] > 2 * rows[0]["eval_reward_mean"]
    assert all(r["kept_reward_mean"] >= r["reward_mean"] for r in rows[1:])
    assert all(r["kept_count"] == 16 for r in rows[1:])

    documented = set((TESTS.parent / "docs" / "metrics.md").read_text().split("`")[1::2])
    for row in rows[1:]:
        missing = {k for k in row if k not in documented and not k.startswith("reward/")}
        assert not missing, f"metrics without documentation in docs/metrics.md: {missing}"

    run_dir = result.run_dir
    assert RAFTConfig.from_yaml(run_dir / "config.yaml") == config
    table = pq.read_table(run_dir / "iter_0002" / "samples.parquet").to_pylist()
    assert len(table) == 16 * 8 and sum(r["kept"] for r in table) == 16
    assert {
        "prompt_id",
        "prompt",
        "completion",
        "prompt_token_count",
        "completion_token_count",
        "reward",
        "reward/letter_a",
        "kept",
        "logprob",
        "temperature",
        "top_p",
        "finish_reason",
        "ranking_key",
    } <= set(table[0])
    assert len({(r["prompt_id"], r["sample_index"]) for r in table}) == len(table)
    kept = pq.read_table(run_dir / "iter_0002" / "kept.parquet").to_pylist()
    assert [r["completion"] for r in kept] == [r["completion"] for r in table if r["kept"]]

    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    checkpoint = load_file(run_dir / "iter_0004" / "checkpoint" / "model.safetensors")
    assert all(torch.equal(final.state_dict()[k], v) for k, v in checkpoint.items())
    assert (run_dir / "final" / "model.safetensors").is_file() and not list(run_dir.glob("final/*.bin"))


def test_lora_llama_with_chat_template_kl_and_global_selection(llama_dir, prompts_file, tmp_path):
    config = RAFTConfig.from_dict(
        base_config(
            llama_dir,
            prompts_file,
            tmp_path / "run",
            model={"path": str(llama_dir), "lora": {"r": 4, "alpha": 8}},
            selection={"strategy": "global", "kl_coef": 0.05},
            data={"prompts": str(prompts_file), "eval_prompts": 8, "reference_column": "reference"},
        )
    )
    result = run(config)
    rows = result.metrics
    table = pq.read_table(result.run_dir / "iter_0001" / "samples.parquet").to_pylist()
    assert all(r["ref_logprob"] is not None for r in table)
    kept_keys = sorted((r["ranking_key"] for r in table if r["kept"]), reverse=True)
    assert kept_keys == sorted((r["ranking_key"] for r in table), reverse=True)[: len(kept_keys)]
    assert table[0]["prompt_token_ids"][:1] != []  # chat template applied: prompt starts with the user tag
    assert "sample_kl" in rows[1] and rows[1]["eval_reference_ppl"] > 1.0

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), result.final_dir)
    assert adapter.peft_config["default"].r == 4


def test_same_config_resumes_and_other_config_is_refused(gpt2_dir, prompts_file, tmp_path):
    raw = base_config(gpt2_dir, prompts_file, tmp_path / "run", loop={"iterations": 1, "prompts_per_iteration": 4})
    first = run(RAFTConfig.from_dict(raw))
    again = run(RAFTConfig.from_dict(raw))  # a re-executed notebook picks the finished run up
    assert again.metrics == first.metrics
    with pytest.raises(RunDirError, match=r"different config \(generation.temperature: 1.0 -> 0.5\)"):
        run(RAFTConfig.from_dict(raw, ["generation.temperature=0.5"]))
    store = RunStore(tmp_path / "run").lock()
    with pytest.raises(RunDirError, match="in use by pid"):
        RunStore(tmp_path / "run").lock()
    store.unlock()


def test_none_rewards_are_counted_and_never_kept(gpt2_dir, prompts_file, tmp_path):
    raw = base_config(
        gpt2_dir,
        prompts_file,
        tmp_path / "run",
        reward={"fn": "toy_rewards:none_for_empty"},
        generation={"samples_per_prompt": 4, "max_new_tokens": 3, "prompts_per_batch": 4},
        loop={"iterations": 1, "prompts_per_iteration": 8},
    )
    result = run(RAFTConfig.from_dict(raw))
    table = pq.read_table(result.run_dir / "iter_0001" / "samples.parquet").to_pylist()
    invalid = [r for r in table if r["reward"] is None]
    assert not any(r["kept"] for r in invalid)
    assert result.metrics[1]["invalid_reward_count"] == len(invalid)


def test_external_samples_join_the_pool_and_can_be_kept(gpt2_dir, prompts_file, tmp_path):
    """The paper's off-policy distillation (Table 8): a teacher's completions compete with the policy's."""
    teacher = tmp_path / "teacher.jsonl"
    teacher.write_text("".join(json.dumps({"prompt_id": i, "completion": " aaaa aaaa aaaa"}) + "\n" for i in range(40)))
    raw = base_config(
        gpt2_dir,
        prompts_file,
        tmp_path / "run",
        selection={"external_samples": str(teacher)},
        loop={"iterations": 1, "prompts_per_iteration": 8},
    )
    result = run(RAFTConfig.from_dict(raw))
    table = pq.read_table(result.run_dir / "iter_0001" / "samples.parquet").to_pylist()
    external = [r for r in table if r["source"] == "external"]
    assert len(external) == 8 and all(r["sample_index"] == 4 for r in external)  # K = 4, so index K
    # an all-'a' teacher beats a random model on the letter-a reward: it is kept for every prompt
    assert result.metrics[1]["kept_external_count"] == 8 == result.metrics[1]["kept_count"]
    assert all(r["logprob"] < 0 for r in external)  # scored under the policy, for the KL key


# ----------------------------------------------------------------------------------------------
# SIGKILL at many points, then resume: same kept sets, same weights, nothing lost or duplicated
# ----------------------------------------------------------------------------------------------

KILL_POINTS = [
    ("generate-batch", 2),  # iteration 1, mid-generation (2 of 4 batches on disk)
    ("generate-batch", 6),  # iteration 2, mid-generation
    ("score-batch", 2),  # iteration 1, mid-scoring
    ("optimizer-step", 3),  # iteration 1, mid-fine-tune (3 of 6 optimizer steps)
    ("optimizer-step", 8),  # iteration 2, mid-fine-tune
    ("checkpoint", 1),  # iteration 1, torn checkpoint write
    ("eval-batch", 2),  # iteration 1's held-out batch drawn (eval 0's was the first), not yet scored or marked
    # markers: eval 0 (1), then per iteration generate, score, select, finetune, eval (2-6 for iteration 1)
    ("marker", 2),  # right after iteration 1's "generate" marker
    ("marker", 5),  # right after iteration 1's "finetune" marker, before its eval
    ("before-marker", 4),  # samples.parquet and kept.parquet written, "select" marker not yet
    ("before-marker", 6),  # iteration 1's metrics row written, its "eval" marker not yet
    # Parquet writes: eval 0's batch and eval_samples (1, 2), generation batches (3-6), scoring batches (7-10),
    # samples.parquet (11), kept.parquet (12), ...
    ("parquet-write", 3),  # a torn generation batch
    ("parquet-write", 11),  # a torn samples.parquet
    ("metrics-write", 2),  # a torn metrics.jsonl rewrite (iteration 1's row)
]


def kill(point: str, occurrence: int, argv: list[str]) -> None:
    killed = subprocess.run(
        [sys.executable, str(TESTS / "kill_harness.py"), point, str(occurrence), "--", *argv],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -9, f"the run was not killed at {point} #{occurrence}:\n{killed.stderr[-3000:]}"


@pytest.mark.parametrize(("point", "occurrence"), KILL_POINTS)
def test_sigkill_then_resume_equals_uninterrupted(point, occurrence, uninterrupted, gpt2_dir, prompts_file, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "cfg.yaml", base_config(gpt2_dir, prompts_file, run_dir, **RESUME))
    kill(point, occurrence, ["run", str(config)])
    assert not (run_dir / "final").exists()
    assert read_run_dir(run_dir) > 0  # what the killed run left is readable under every real name
    if point == "generate-batch" and occurrence == 2:
        # the CLI resume path, in a fresh process
        resumed = subprocess.run(
            [sys.executable, "-m", "raftlib", "resume", str(run_dir)],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    else:
        resume(run_dir)
    assert_same_run(snapshot(run_dir), uninterrupted)
    assert not list(run_dir.rglob("*.tmp-*")), "temporary files left behind"


def test_killed_twice_then_resumed_equals_uninterrupted(uninterrupted, gpt2_dir, prompts_file, tmp_path):
    """A resume that is itself killed (mid-fine-tune) loses nothing either."""
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "cfg.yaml", base_config(gpt2_dir, prompts_file, run_dir, **RESUME))
    kill("score-batch", 3, ["run", str(config)])
    kill("optimizer-step", 2, ["resume", str(run_dir)])
    assert read_run_dir(run_dir) > 0
    resume(run_dir)
    assert_same_run(snapshot(run_dir), uninterrupted)


def test_run_dir_is_readable_at_every_moment(uninterrupted, gpt2_dir, prompts_file, tmp_path):
    """Poll-read the whole run directory, every file under its real name, while a run writes it."""
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "cfg.yaml", base_config(gpt2_dir, prompts_file, run_dir, **RESUME))
    writer = subprocess.Popen(
        [sys.executable, "-m", "raftlib", "run", str(config)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    reads = 0
    while writer.poll() is None:
        reads += read_run_dir(run_dir) if run_dir.exists() else 0
    assert writer.returncode == 0, writer.stderr.read()[-3000:]
    assert reads > 50  # the poller really read files while the run wrote them
    assert_same_run(snapshot(run_dir), uninterrupted)


def test_a_second_process_writing_a_run_dir_in_use_is_refused(gpt2_dir, prompts_file, tmp_path):
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "cfg.yaml", base_config(gpt2_dir, prompts_file, run_dir, **RESUME))
    holder = RunStore(run_dir).lock()  # this process is "the run in progress"
    try:
        for argv in (["run", str(config)], ["resume", str(run_dir)]):
            if argv[0] == "resume":
                RunStore(run_dir).write_config(RAFTConfig.from_yaml(config).to_yaml())
            second = subprocess.run([sys.executable, "-m", "raftlib", *argv], env=ENV, capture_output=True, text=True)
            assert second.returncode == 2
            assert f"is in use by pid {os.getpid()}" in second.stderr and "use another output_dir" in second.stderr
    finally:
        holder.unlock()
    assert not (run_dir / "iter_0001").exists()  # the refused processes wrote nothing


def test_lora_run_killed_in_its_first_fine_tune_resumes_from_the_same_adapter(gpt2_dir, prompts_file, tmp_path):
    """Before the first checkpoint there is no saved adapter: resume must re-create the same random init."""
    lora = {"path": str(gpt2_dir), "lora": {"r": 4, "alpha": 8, "target_modules": ["c_attn"]}}
    raw = base_config(gpt2_dir, prompts_file, tmp_path / "reference", model=lora, **RESUME)
    run(RAFTConfig.from_dict(raw))
    raw["output_dir"] = str(tmp_path / "killed")
    kill("optimizer-step", 3, ["run", str(write_config(tmp_path / "cfg.yaml", raw))])
    resume(tmp_path / "killed")
    reference = load_file(tmp_path / "reference" / "final" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "final" / "adapter_model.safetensors")
    for name, tensor in reference.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6)
