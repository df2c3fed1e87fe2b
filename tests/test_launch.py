"""raftsuite.launch: a notebook's RAFT run as an `accelerate launch` subprocess equals the in-kernel run.

Two CPU processes (gloo) with gradient_accumulation_steps = 1 take the optimizer steps one process takes with 2
(the argument of tests/test_multiprocess.py); re-running the same call resumes the finished run instead of
starting over, and a different config on the same directory is refused before anything is launched.
"""

from __future__ import annotations

import os

import pytest

from conftest import RESUME, assert_same_run, base_config, snapshot

SETTINGS = RESUME | {"training": {"learning_rate": 5.0e-3, "epochs": 2, "micro_batch_size": 2}}


def test_two_launched_processes_equal_one_in_kernel_and_a_rerun_resumes(llama_dir, prompts_file, tmp_path):
    from raftlib import RAFTConfig
    from raftlib.store import RunDirError
    from raftsuite.launch import run

    one = SETTINGS | {"training": SETTINGS["training"] | {"gradient_accumulation_steps": 2}}
    in_kernel = run(RAFTConfig.from_dict(base_config(llama_dir, prompts_file, tmp_path / "one", **one)))
    assert in_kernel.run_dir == tmp_path / "one"

    lines: list[str] = []
    config = RAFTConfig.from_dict(base_config(llama_dir, prompts_file, tmp_path / "two", **SETTINGS))
    launched = run(config, num_processes=2, echo=lines.append)
    assert any("2 processes: generation, scoring and evaluation sharded" in line for line in lines), "".join(
        lines[-20:]
    )
    assert (tmp_path / "two" / "launch" / "config.yaml").is_file()
    assert_same_run(snapshot(tmp_path / "two"), snapshot(tmp_path / "one"))
    assert [row["eval_reward_mean"] for row in launched.metrics] == [r["eval_reward_mean"] for r in in_kernel.metrics]
    assert launched.final_dir == tmp_path / "two" / "final"

    # Re-executing the cell: `raftlib resume`, which finds every stage done and changes nothing.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "two").rglob("*.parquet")}
    lines.clear()
    again = run(config, num_processes=2, echo=lines.append)
    assert "already holds this run: resuming it" in lines[0]
    assert any(" resume " in line for line in (tmp_path / "two" / "launch" / "launch.log").read_text().splitlines())
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "two").rglob("*.parquet")} == before
    assert again.metrics == launched.metrics

    changed = RAFTConfig.from_dict(base_config(llama_dir, prompts_file, tmp_path / "two", **(SETTINGS | {"seed": 1})))
    with pytest.raises(RunDirError, match=r"different config.*seed"):
        run(changed, num_processes=2, echo=lines.append)


def test_a_failing_launch_raises_with_the_tail_of_its_log(llama_dir, prompts_file, tmp_path):
    from raftlib import RAFTConfig
    from raftsuite.launch import LaunchError, run

    raw = base_config(llama_dir, prompts_file, tmp_path / "bad", **SETTINGS)
    raw["reward"] = {"fn": "no_such_module:reward"}
    with pytest.raises(LaunchError, match=r"(?s)exited with status.*no_such_module"):
        run(RAFTConfig.from_dict(raw), num_processes=2, echo=lambda line: None)


def test_bad_launch_arguments_name_the_parameter(tmp_path):
    from raftsuite.launch import launch_command

    with pytest.raises(ValueError, match="num_processes = 0"):
        launch_command(["raftlib"], 0)
    with pytest.raises(FileNotFoundError, match=r"accelerate_config = .*nope.yaml"):
        launch_command(["raftlib"], 2, str(tmp_path / "nope.yaml"))
    command, env = launch_command(["raftlib", "run", "c.yaml"], 2, cuda=False)
    assert env["ACCELERATE_USE_CPU"] == "true" and "--multi_gpu" in command
    assert command[-4:] == ["-m", "raftlib", "run", "c.yaml"]


def test_a_launch_first_frees_what_the_kernel_no_longer_references(tmp_path):
    """Tensors kept alive only by a reference cycle (a dropped model, an evaluation's closures) are collected
    before the workers start, so their memory is free for them (on a GPU `empty_cache` then returns it)."""
    import gc
    import sys
    import weakref

    import torch

    from raftsuite import launch

    class Holder:
        def __init__(self) -> None:
            self.weights = torch.zeros(1024, 1024)
            self.me = self  # a cycle: reference counting alone never frees it

    dropped = Holder()
    alive = weakref.ref(dropped)
    del dropped
    gc.disable()  # no automatic collection may run in between: only the launch's own
    try:
        assert alive() is not None
        launch.stream([sys.executable, "-c", "pass"], dict(os.environ), tmp_path / "log.txt", echo=lambda line: None)
        assert alive() is None
    finally:
        gc.enable()
    assert launch.release_accelerator_memory() == 0  # no CUDA here: nothing held
