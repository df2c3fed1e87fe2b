"""Two processes (gloo on CPU) give the run one process gives with the same global batch.

One process with gradient_accumulation_steps = 2 and two processes with 1 take the same optimizer steps
over the same micro-batches, so the samples, the kept sets, the held-out rewards and (to float tolerance)
the final weights must agree.

Why exact equality of samples holds here, on any machine: it is the same arithmetic. Each micro-batch's
forward and backward run the same kernels on the same shapes, and both sides run them on ONE thread
(OMP_NUM_THREADS=1 for the workers, torch.set_num_threads(1) for the reference), because a CPU GEMM may
split its reduction across threads differently for another thread count. Accumulation scales each
micro-batch's loss by 1/2 and sums; DDP divides each gradient by the world size 2 and all-reduces a sum of
two: halving is exact in binary floating point and a sum of two terms does not depend on their order, so
both give g1/2 + g2/2 to the bit. Sampling is seeded by (seed, iteration, batch) wherever a batch runs. Launched the two ways a user launches: `accelerate launch` with the shipped
DDP config file, and accelerate's `notebook_launcher` (in a subprocess, as a notebook kernel would).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import RESUME, assert_same_run, base_config, kill_tree, snapshot, write_config

ROOT = Path(__file__).resolve().parents[1]

# 12 prompts x K=4 in 4 generation batches and 4 scoring batches; 12 kept (best of 4 per prompt) in 6
# micro-batches of 2: 3 optimizer steps per epoch either way (2 micro-batches per step).
SETTINGS = RESUME | {"training": {"learning_rate": 5.0e-3, "epochs": 2, "micro_batch_size": 2, "max_grad_norm": 0.0}}
"""Clipping off: FSDP's sharded clipping norm sums squares in another order (see test_fsdp.WEIGHT_ATOL)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment() -> dict[str, str]:
    paths = [str(ROOT), str(ROOT / "examples" / "toy"), os.environ.get("PYTHONPATH", "")]
    pythonpath = os.pathsep.join(p for p in paths if p)
    return os.environ | {"PYTHONPATH": pythonpath, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


def one_process_reference(llama_dir, prompts_file, tmp_path, **training) -> dict:
    from raftlib import load_config, run

    sections = SETTINGS | {"training": SETTINGS["training"] | training | {"gradient_accumulation_steps": 2}}
    raw = base_config(llama_dir, prompts_file, tmp_path / "one", **sections)
    sys.path.insert(0, str(ROOT / "examples" / "toy"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker runs (see the module docstring)
    try:
        run(load_config(write_config(tmp_path / "one.yaml", raw)))
    finally:
        torch.set_num_threads(threads)
    return snapshot(tmp_path / "one")


def test_accelerate_launch_two_processes_equal_one(llama_dir, prompts_file, tmp_path):
    reference = one_process_reference(llama_dir, prompts_file, tmp_path)
    raw = base_config(llama_dir, prompts_file, tmp_path / "two", **SETTINGS)
    config = write_config(tmp_path / "two.yaml", raw)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "examples/accelerate/ddp.yaml"),
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        "-m",
        "raftlib",
        "run",
        str(config),
    ]
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes: generation, scoring and evaluation sharded" in done.stderr
    assert_same_run(snapshot(tmp_path / "two"), reference)
    # Each process drew its own generation batches: 0 and 2 on rank 0, 1 and 3 on rank 1, all on disk once.
    batches = sorted(p.name for p in (tmp_path / "two" / "iter_0001" / "generate").iterdir())
    assert batches == [f"batch_{b:05d}.parquet" for b in range(4)], batches


def test_notebook_launcher_two_processes_equal_one_with_packing_and_chunked_loss(llama_dir, prompts_file, tmp_path):
    fast = {"packing": True, "loss_chunk_tokens": 8}
    reference = one_process_reference(llama_dir, prompts_file, tmp_path, **fast)
    sections = SETTINGS | {"training": SETTINGS["training"] | fast}
    config = write_config(tmp_path / "two.yaml", base_config(llama_dir, prompts_file, tmp_path / "two", **sections))
    script = textwrap.dedent(f"""
        from accelerate import notebook_launcher
        from raftlib import load_config, run

        notebook_launcher(run, args=(load_config({str(config)!r}),), num_processes=2, use_port="{free_port()}")
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], env=environment(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes: generation, scoring and evaluation sharded" in done.stderr
    assert_same_run(snapshot(tmp_path / "two"), reference)


@pytest.mark.parametrize("kind", ["DEEPSPEED", "MEGATRON_LM"])
def test_sharded_strategies_are_refused_with_a_clear_message(kind, llama_dir, prompts_file, tmp_path, monkeypatch):
    import accelerate

    from raftlib import load_config, run
    from raftlib.config import ConfigError

    class Kind:
        name = kind

    monkeypatch.setattr(accelerate.Accelerator, "distributed_type", property(lambda self: Kind()))
    raw = base_config(llama_dir, prompts_file, tmp_path / "run", **SETTINGS)
    with pytest.raises(ConfigError, match=f"{kind} is not supported.*FSDP"):
        run(load_config(write_config(tmp_path / "c.yaml", raw)))


def test_a_killed_two_process_run_resumes_to_the_same_run(llama_dir, prompts_file, tmp_path):
    """SIGKILL to both processes once iteration 1's samples are drawn, then `resume` on two processes."""
    import time

    reference = one_process_reference(llama_dir, prompts_file, tmp_path)
    run_dir = tmp_path / "two"
    config = write_config(tmp_path / "two.yaml", base_config(llama_dir, prompts_file, run_dir, **SETTINGS))

    def launch(*arguments: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(ROOT / "examples/accelerate/ddp.yaml"),
            "--num_processes",
            "2",
            "--main_process_port",
            str(free_port()),
            "-m",
            "raftlib",
            *arguments,
        ]

    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(
            launch("run", str(config)), env=environment(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 300
        while not (run_dir / "iter_0001" / "generate.done.json").exists():
            assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never finished generating"
            time.sleep(0.05)
        kill_tree(process, run_dir)  # the launcher and both workers (each in its own session), all gone
    assert not (run_dir / "final").exists()
    drawn = {p.name: p.stat().st_mtime_ns for p in (run_dir / "iter_0001" / "generate").iterdir()}
    done = subprocess.run(
        launch("resume", str(run_dir)), env=environment(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # iteration 1's samples were reused, not drawn again, and the run ends as the uninterrupted one
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "iter_0001" / "generate").iterdir()} == drawn
    assert_same_run(snapshot(run_dir), reference)
