"""Run RAFT (or the GRPO baseline) from a notebook: in the kernel, or as an `accelerate launch` subprocess.

    from raftsuite.launch import run
    result = run(config)                                   # one process, in the kernel (the default)
    result = run(config, num_processes=2)                  # `accelerate launch`, output streamed into the cell
    result = run(config, 8, "examples/accelerate/ddp.yaml")

Why a subprocess and not `notebook_launcher`: a kernel that has touched CUDA (a baseline, an evaluation) can no
longer fork workers, and a crash of a worker would take the kernel with it. The subprocess writes nothing the
kernel has to collect: the run directory is the interface, and `RunResult` is rebuilt from it.

Re-executing a notebook on a run directory that already holds the same config resumes it
(`python -m raftlib resume RUN_DIR`); a different config is refused before anything starts, naming the keys.
Works for `RAFTConfig` and `DiffusionConfig` alike (raftlib's CLI dispatches on the YAML).

On a machine without CUDA the workers run on CPUs (gloo): `ACCELERATE_USE_CPU=true` with `--multi_gpu`, as
docs/performance.md explains (accelerate's `--cpu` would take its one-process launcher).

In a notebook every run is alive and stoppable: a child's lines are streamed into the cell as they come (the
per-iteration summary, warnings and errors; everything else goes to the full log, whose path is printed first),
and an interrupt stops the child and its workers and ends with one line saying how to resume
(`Interrupted`), not a page of subprocess traceback.
"""

from __future__ import annotations

import collections
import gc
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_DIR = "launch"
"""Under a run's output_dir: the config handed to the subprocess and the full log of every launch."""
TAIL_LINES = 40
ERROR_LINE = re.compile(r"^(error: |\w*(Error|Exception): )")


class LaunchError(RuntimeError):
    """An `accelerate launch` subprocess failed; the message ends with the tail of its log."""


SHOWN = re.compile(r"(iter|step) \d+/\d+ \||already holds this run|WARNING raftlib|ERROR|Error|error:|Traceback|^log: ")
"""The lines of a child's output a notebook cell shows: raftlib's per-iteration summary, resumes, problems."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by an interrupt: IPython shows the one-line message instead of the traceback."""

    def _render_traceback_(self) -> list[str]:
        return [f"Interrupted: {self}"]


def _echo(line: str) -> None:
    sys.stdout.write(line)
    sys.stdout.flush()


def progress_echo(line: str) -> None:
    """`echo` for notebooks: only the lines `SHOWN` matches (the full output is in the log)."""
    if SHOWN.search(line):
        _echo(line)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(
    module_args: list[str], num_processes: int, accelerate_config: str = "", *, cuda: bool | None = None
) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` argv and environment for `python -m MODULE_ARGS` on `num_processes` processes."""
    if num_processes < 1:
        raise ValueError(f"num_processes = {num_processes}: must be >= 1")
    if accelerate_config and not Path(accelerate_config).is_file():
        raise FileNotFoundError(f"accelerate_config = {accelerate_config!r}: no such file")
    cuda = cuda_available() if cuda is None else cuda
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        command += ["--config_file", str(accelerate_config)]
    command += ["--num_processes", str(num_processes), "--main_process_port", str(free_port())]
    env = dict(os.environ)
    if not cuda:
        env["ACCELERATE_USE_CPU"] = "true"
    if num_processes > 1 and not accelerate_config:
        command.append("--multi_gpu")  # torchrun's launcher; on CPUs with ACCELERATE_USE_CPU it runs gloo
    # The workers import what the kernel imports: this checkout first, then the kernel's own path.
    paths = [str(ROOT), os.getcwd(), *[p for p in sys.path if p], env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    return [*command, "-m", *module_args], env


def release_accelerator_memory() -> int:
    """Hand this process's unused GPU memory back before workers start; return the bytes tensors still hold.

    The kernel that launches a child has often just evaluated a model or scored with the reward model: once
    those are dropped, their blocks stay in PyTorch's caching allocator (and unreachable reference cycles keep
    tensors alive until the next collection), so rank 0 would start with less free memory than the planner
    assumes (tens of GB after a 7B evaluation). A collection then `empty_cache` returns them; what is still
    allocated is referenced by a live object, which the warning reports. 0 on a machine without CUDA.
    """
    gc.collect()
    torch = sys.modules.get("torch")  # never import torch (and initialise CUDA) only to find nothing to free
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    torch.cuda.empty_cache()
    held = int(torch.cuda.memory_allocated())
    if held:
        logger.warning(
            "the kernel still holds %.1f GiB of GPU memory in live tensors while it launches workers; "
            "drop the models it no longer needs (del model) before running the next cell",
            held / 2**30,
        )
    return held


def stream(command: list[str], env: dict[str, str], log_path: Path, echo: Callable[[str], None] = _echo) -> None:
    """Run `command`, copying each output line to `echo` and `log_path` as it comes; raise with the tail on failure.

    An interrupt (Ctrl-C, Jupyter's stop button) stops the command and every process it started, then raises
    `Interrupted` naming the log: nothing is left writing into a run directory, which a rerun resumes.
    """
    release_accelerator_memory()  # the workers get the GPU memory the kernel no longer uses
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    errors: list[str] = []  # the workers' own error lines: torchrun's summary that ends the log hides them
    echo(f"log: {log_path}\n")
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            errors="replace",
            preexec_fn=die_with_parent,
        )
        try:
            assert process.stdout is not None
            for line in process.stdout:
                log.write(line)
                log.flush()
                tail.append(line)
                if len(errors) < 5 and ERROR_LINE.match(line):
                    errors.append(line)
                echo(line)
            code = process.wait()
        except KeyboardInterrupt:
            stop_tree(process)
            raise Interrupted(f"stopped; its log: {log_path}. Run the cell again to resume where it stopped") from None
        except BaseException:
            stop_tree(process)
            raise
    if code != 0:
        raise LaunchError(
            f"`{' '.join(command[2:])}` exited with status {code}; full log: {log_path}\n"
            + (f"worker errors:\n{''.join(errors)}" if errors else "")
            + f"last {len(tail)} lines:\n{''.join(tail)}"
        )


def stop_tree(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM `process` and every process it started (torchrun's workers sit in sessions of their own), then
    SIGKILL what is left after `timeout` seconds, and reap them."""
    import psutil

    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for member in tree:
        try:
            member.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for member in alive:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    process.wait()


def fsdp_version(accelerate_config: str) -> int | None:
    """The FSDP version an accelerate config file asks for (accelerate's default 1 when it names none), or None
    when it does not shard (no file, DDP)."""
    import yaml

    if not accelerate_config:
        return None
    values = yaml.safe_load(Path(accelerate_config).read_text()) or {}
    if values.get("distributed_type") != "FSDP":
        return None
    return int((values.get("fsdp_config") or {}).get("fsdp_version", 1))


def refuse_what_cannot_fit(config: Any, num_processes: int, accelerate_config: str = "") -> None:
    """On a GPU machine, raise ConfigError (naming the key) when the planner says a stage clearly cannot fit,
    before any worker starts or loads a model. Nothing to check without CUDA (the CPU rehearsals)."""
    import torch

    from raftlib.plan import Hardware, check_fits

    if not torch.cuda.is_available():
        return
    sharding = "ddp" if fsdp_version(accelerate_config) is None else "fsdp"
    check_fits(config, Hardware.detect(num_processes), sharding=sharding)


def run(
    config: Any,
    num_processes: int = 1,
    accelerate_config: str = "",
    *,
    reward: Any = None,
    echo: Callable[[str], None] = _echo,
):
    """Run RAFT as `raftlib.run` does and return its `RunResult`, in the kernel or through `accelerate launch`.

    One process and no accelerate config: `raftlib.run(config)` in this process. Otherwise the config is written
    to OUTPUT_DIR/launch/config.yaml and `accelerate launch ... -m raftlib run` (or `resume` when the directory
    already holds this config) runs it; its output is streamed through `echo` and appended to
    OUTPUT_DIR/launch/launch.log.
    """
    import raftlib
    from raftlib.start import RunResult, holds_same_run
    from raftlib.store import RunStore, atomic_write_text

    if num_processes == 1 and not accelerate_config:
        try:
            return raftlib.run(config, reward=reward)  # raftlib.run refuses what cannot fit on a GPU itself
        except KeyboardInterrupt:
            raise Interrupted(f"stopped; run the cell again to resume the run in {config.output_dir}") from None
    refuse_what_cannot_fit(config, num_processes, accelerate_config)
    if reward is not None:
        raise ValueError(
            "reward: a reward object cannot cross into `accelerate launch` workers; name it in config.reward.fn "
            "(a module:function path) or use num_processes=1 without accelerate_config"
        )
    store = RunStore(config.output_dir)
    if holds_same_run(store, config):
        module_args = ["raftlib", "resume", str(store.root)]
        echo(f"{store.root} already holds this run: resuming it on {num_processes} process(es)\n")
    else:
        config_file = store.root / LAUNCH_DIR / "config.yaml"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config_file, config.to_yaml())
        module_args = ["raftlib", "run", str(config_file)]
    command, env = launch_command(module_args, num_processes, accelerate_config)
    stream(command, env, store.root / LAUNCH_DIR / "launch.log", echo)
    return RunResult(run_dir=store.root, metrics=store.read_metrics(), final_dir=store.final_dir)


def die_with_parent() -> None:
    """`preexec_fn` of a child run: on Linux the child gets SIGKILL when the process that started it dies.

    A notebook kernel killed mid-run (an OOM kill, a closed laptop) must not leave its child training on and
    holding the run directory's lock, or re-executing the notebook could not resume the run. Elsewhere: no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
