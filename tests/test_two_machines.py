"""Two "machines" of one process each on localhost, launched the way a cluster launches them:

    accelerate launch --num_machines 2 --machine_rank R --main_process_ip 127.0.0.1 --num_processes 2 -m raftlib run

(rank 0 and rank 1 in separate launchers, as two hosts would start them; they share the run directory, as two
hosts share a file system). The run equals one process with the same global batch (tests/test_multiprocess.py
explains why to the bit), and a kill of one machine's worker followed by `resume` on both gives the same run.
examples/slurm/raft_two_nodes.sbatch launches the same way on SLURM.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from test_multiprocess import SETTINGS, environment, free_port, one_process_reference

from conftest import assert_same_run, base_config, kill_tree, snapshot, write_config

ROOT = Path(__file__).resolve().parents[1]


def machine(rank: int, port: int, *arguments: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_machines",
        "2",
        "--machine_rank",
        str(rank),
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
        "--num_processes",
        "2",
        "--rdzv_backend",
        "static",
        "--same_network",
        "-m",
        "raftlib",
        *arguments,
    ]


def start_both(tmp_path: Path, name: str, *arguments: str) -> list[subprocess.Popen]:
    port = free_port()
    return [
        subprocess.Popen(
            machine(rank, port, *arguments),
            env=environment(),
            stdout=open(tmp_path / f"{name}{rank}.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for rank in (0, 1)
    ]


def wait_all(processes: list[subprocess.Popen], tmp_path: Path, name: str) -> None:
    for rank, process in enumerate(processes):
        code = process.wait(timeout=600)
        assert code == 0, (tmp_path / f"{name}{rank}.log").read_text()[-3000:]


def test_two_machines_of_one_process_equal_one_process(llama_dir, prompts_file, tmp_path):
    reference = one_process_reference(llama_dir, prompts_file, tmp_path)
    config = write_config(tmp_path / "two.yaml", base_config(llama_dir, prompts_file, tmp_path / "two", **SETTINGS))
    wait_all(start_both(tmp_path, "machine", "run", str(config)), tmp_path, "machine")
    assert "2 processes: generation, scoring and evaluation sharded" in (tmp_path / "machine0.log").read_text()
    assert_same_run(snapshot(tmp_path / "two"), reference)


def test_a_killed_machine_resumes_on_both_to_the_same_run(llama_dir, prompts_file, tmp_path):
    """SIGKILL to machine 1's whole launch once iteration 1 is fine-tuned; machine 0 then fails at its next
    collective and is stopped too (as a scheduler stops a job that lost a node); `resume` on both machines."""
    reference = one_process_reference(llama_dir, prompts_file, tmp_path)
    run_dir = tmp_path / "two"
    config = write_config(tmp_path / "two.yaml", base_config(llama_dir, prompts_file, run_dir, **SETTINGS))
    processes = start_both(tmp_path, "killed", "run", str(config))
    deadline = time.monotonic() + 300
    while not (run_dir / "iter_0001" / "finetune.done.json").exists():
        assert all(p.poll() is None for p in processes), (tmp_path / "killed0.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run never finished iteration 1's fine-tune"
        time.sleep(0.05)
    kill_tree(processes[1])  # one machine lost: its launcher and worker, all gone
    kill_tree(processes[0], run_dir)  # the other stopped, every process gone and the run lock free
    assert not (run_dir / "final").exists()
    drawn = {p.name: p.stat().st_mtime_ns for p in (run_dir / "iter_0001" / "generate").iterdir()}
    wait_all(start_both(tmp_path, "resumed", "resume", str(run_dir)), tmp_path, "resumed")
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "iter_0001" / "generate").iterdir()} == drawn
    assert_same_run(snapshot(run_dir), reference)


def test_the_slurm_script_launches_as_the_rehearsal_does():
    script = (ROOT / "examples" / "slurm" / "raft_two_nodes.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "examples" / "slurm" / "raft_two_nodes.sbatch")]).returncode == 0
    for flag in ("--num_machines", "--machine_rank \\$SLURM_NODEID", "--main_process_ip", "-m raftlib", "resume"):
        assert flag in script, flag
