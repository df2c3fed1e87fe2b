"""Bad input mid-run, a full disk, and secure defaults: clear errors, nothing lost, nothing unsafe loaded.

The kill points (SIGKILL + resume) live in test_loop.py; docs/reliability.md lists every case and its test.
"""

import errno
import shutil
import socket
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from conftest import RESUME, assert_same_run, base_config, snapshot
from raftlib import RAFTConfig, resume, run
from raftlib.config import ModelSection
from raftlib.hub import ModelLoadError
from raftlib.rewards import RewardError, RewardTimeout, WeightedReward
from raftlib.store import TMP_MARK, DiskFullError
from raftlib.text.models import load_base_model, load_tokenizer
from toy_rewards import letter_a


class FailingOnCall:
    """letter_a, except that call number `fail_on` raises, returns garbage or hangs."""

    def __init__(self, fail_on: int, how: str, release: threading.Event | None = None) -> None:
        self.calls, self.fail_on, self.how, self.release = 0, fail_on, how, release

    def __call__(self, prompts, completions, **columns):
        self.calls += 1
        if self.calls == self.fail_on:
            if self.how == "raise":
                return [1.0 / 0.0 for _ in completions]
            if self.how == "hang":
                self.release.wait(120)  # the test ends the hang; if the timeout failed, the test fails later
            if self.how == "wrong-length":
                return letter_a(prompts, completions)[:-1]
            if self.how == "wrong-type":
                return ["high"] * len(completions)
        return letter_a(prompts, completions)


def scoring_batches_on_disk(run_dir: Path, iteration: int = 1) -> list[str]:
    return sorted(p.name for p in (run_dir / f"iter_{iteration:04d}" / "score").glob("batch_*.parquet"))


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("raise", r"reward 'letter_a' raised ZeroDivisionError: float division by zero -- while scoring batch 2"),
        ("wrong-length", r"returned 11 values for 12 completions -- while scoring batch 2"),
        ("wrong-type", r"returned 'high' \(str\) at index 0 -- while scoring batch 2"),
    ],
)
def test_a_failing_reward_stops_the_run_and_resume_loses_nothing(
    how, message, uninterrupted, gpt2_dir, prompts_file, tmp_path
):
    """Scoring calls: eval of iteration 0 is call 1, then iteration 1's four batches are calls 2-5."""
    config = RAFTConfig.from_dict(base_config(gpt2_dir, prompts_file, tmp_path / "run", **RESUME))
    flaky = WeightedReward([("letter_a", 1.0, FailingOnCall(fail_on=4, how=how))])
    with pytest.raises(RewardError, match=message) as info:
        run(config, reward=flaky)
    assert "2 earlier batches are saved: fix the reward and resume" in str(info.value)
    assert scoring_batches_on_disk(tmp_path / "run") == ["batch_00000.parquet", "batch_00001.parquet"]
    resume(tmp_path / "run")  # the config's reward, which works
    assert_same_run(snapshot(tmp_path / "run"), uninterrupted)


def test_a_hanging_reward_times_out_and_resume_loses_nothing(uninterrupted, gpt2_dir, prompts_file, tmp_path):
    config = RAFTConfig.from_dict(base_config(gpt2_dir, prompts_file, tmp_path / "run", **RESUME))
    release = threading.Event()
    hanging = WeightedReward([("letter_a", 1.0, FailingOnCall(fail_on=3, how="hang", release=release))], timeout_s=1)
    try:
        with pytest.raises(RewardTimeout, match=r"did not return within reward.timeout_s = 1 s .* scoring batch 1"):
            run(config, reward=hanging)
    finally:
        release.set()
    assert scoring_batches_on_disk(tmp_path / "run") == ["batch_00000.parquet"]
    resume(tmp_path / "run")
    assert_same_run(snapshot(tmp_path / "run"), uninterrupted)


def test_reward_timeout_is_configurable_and_validated():
    config = RAFTConfig.from_dict(
        {"model": {"path": "m"}, "data": {"prompts": "p.jsonl"}, "reward": {"fn": "length", "timeout_s": 30}}
    )
    assert config.reward.timeout_s == 30.0
    from raftlib.config import ConfigError
    from raftlib.rewards import build_reward

    assert build_reward(config.reward).timeout_s == 30.0
    with pytest.raises(ConfigError, match=r"reward\.timeout_s = 0\.0: must be > 0 .*from override"):
        config.replace(["reward.timeout_s=0"])


@pytest.mark.parametrize("where", ["parquet", "checkpoint"])
def test_disk_full_is_a_clear_error_and_resume_loses_nothing(
    where, uninterrupted, gpt2_dir, prompts_file, tmp_path, monkeypatch
):
    """ENOSPC after half a file reached the disk: the error names the file, no torn file under a real name."""
    import pyarrow.parquet as real_pq

    from raftlib.text import modality as text

    calls = {"n": 0}

    def fill_disk(tmp: Path) -> None:
        with open(tmp, "r+b") as handle:
            handle.truncate(tmp.stat().st_size // 2)
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    if where == "parquet":
        original = real_pq.write_table

        def write_table(table, target, *args, **kwargs):
            original(table, target, *args, **kwargs)
            if "/score/" in str(target):  # the first scoring batch: generation before it is on disk
                calls["n"] += 1
                if calls["n"] == 1:
                    fill_disk(Path(target))

        monkeypatch.setattr(real_pq, "write_table", write_table)
        expected = r"no space left on device while writing .*iter_0001/score/batch_00000\.parquet"
    else:
        original_save = text.save_model

        def save_model(model, tokenizer, directory, state_dict=None):
            original_save(model, tokenizer, directory, state_dict)
            fill_disk(next(Path(directory).glob("*.safetensors")))

        monkeypatch.setattr(text, "save_model", save_model)
        expected = r"no space left on device while writing .*iter_0001/checkpoint"
    config = RAFTConfig.from_dict(base_config(gpt2_dir, prompts_file, tmp_path / "run", **RESUME))
    with pytest.raises(DiskFullError, match=expected) as info:
        run(config)
    assert "free some space, then resume the run" in str(info.value)
    assert not [p for p in (tmp_path / "run").rglob("*") if TMP_MARK in p.name], "temporaries left behind"
    monkeypatch.undo()
    resume(tmp_path / "run")
    assert_same_run(snapshot(tmp_path / "run"), uninterrupted)


# ----------------------------------------------------------------------------------------------
# Tokenizers and model dirs
# ----------------------------------------------------------------------------------------------


def test_tokenizer_without_pad_token_pads_with_eos_and_without_either_is_refused(gpt2_dir, tmp_path):
    tokenizer = load_tokenizer(ModelSection(path=str(gpt2_dir)))  # the test GPT-2 ships no pad token
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(gpt2_dir)
    bare.eos_token = None
    bare.bos_token = None
    bare.save_pretrained(tmp_path / "bare")
    with pytest.raises(ModelLoadError, match=r"has neither a pad nor an EOS token"):
        load_tokenizer(ModelSection(path=str(tmp_path / "bare")))


class _Payload:
    """A pickle that runs code when loaded: what a malicious pytorch_model.bin carries."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def test_pickled_weights_never_run_code(gpt2_dir, tmp_path):
    """A .bin-only model dir whose pickle would run code: refused by weights_only, the code never runs."""
    model_dir = tmp_path / "evil"
    shutil.copytree(gpt2_dir, model_dir)
    (model_dir / "model.safetensors").unlink()
    sentinel = tmp_path / "pwned"
    torch.save({"transformer.wte.weight": _Payload(sentinel)}, model_dir / "pytorch_model.bin")
    with pytest.raises(Exception, match=r"(?i)weights_only|unpickl|unsupported global"):
        load_base_model(ModelSection(path=str(model_dir)))
    assert not sentinel.exists()


def test_remote_code_in_a_model_dir_runs_only_with_trust_remote_code(gpt2_dir, tmp_path):
    """A model dir may carry Python (auto_map); it is not imported unless model.trust_remote_code is set."""
    import json

    model_dir = tmp_path / "custom"
    shutil.copytree(gpt2_dir, model_dir)
    sentinel = tmp_path / "imported"
    (model_dir / "custom_model.py").write_text(
        f"from pathlib import Path\nPath({str(sentinel)!r}).touch()\n"
        "from transformers import GPT2LMHeadModel\n\nclass CustomModel(GPT2LMHeadModel):\n    pass\n"
    )
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "custom_model.CustomModel"}
    (model_dir / "config.json").write_text(json.dumps(config))

    assert ModelSection(path=str(model_dir)).trust_remote_code is False  # the default
    model = load_base_model(ModelSection(path=str(model_dir)))
    assert type(model).__name__ == "GPT2LMHeadModel" and not sentinel.exists()
    model = load_base_model(ModelSection(path=str(model_dir), trust_remote_code=True))
    assert type(model).__name__ == "CustomModel" and sentinel.exists()  # the switch really is the gate


def test_a_run_with_local_dirs_never_opens_a_socket(gpt2_dir, prompts_file, tmp_path, monkeypatch):
    """Offline by construction: with every socket connection refused, a whole run still completes."""
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError(errno.ENETUNREACH, f"test: network access to {address} attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    raw = base_config(gpt2_dir, prompts_file, tmp_path / "run", loop={"iterations": 1, "prompts_per_iteration": 4})
    result = run(RAFTConfig.from_dict(raw))
    assert attempts == []
    assert pq.read_table(result.run_dir / "iter_0001" / "samples.parquet").num_rows == 16
