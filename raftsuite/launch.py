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

The GRPO baseline: `launch_grpo(kwargs, num_processes, accelerate_config)` starts
`accelerate launch -m raftsuite.launch grpo KWARGS.json`, which calls `raftsuite.hh.run_grpo(**kwargs)` in every
process (TRL's trainer is accelerate-aware) and the main process writes the returned rows to OUT.json.
"""

from __future__ import annotations

import collections
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_DIR = "launch"
"""Under a run's output_dir: the config handed to the subprocess and the full log of every launch."""
TAIL_LINES = 40
ERROR_LINE = re.compile(r"^(error: |\w*(Error|Exception): )")


class LaunchError(RuntimeError):
    """An `accelerate launch` subprocess failed; the message ends with the tail of its log."""


def _echo(line: str) -> None:
    sys.stdout.write(line)
    sys.stdout.flush()


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


def stream(command: list[str], env: dict[str, str], log_path: Path, echo: Callable[[str], None] = _echo) -> None:
    """Run `command`, copying each output line to `echo` and `log_path` as it comes; raise with the tail on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    errors: list[str] = []  # the workers' own error lines: torchrun's summary that ends the log hides them
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace",
            preexec_fn=die_with_parent,
        )  # fmt: skip
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
        except BaseException:
            # A kernel interrupt stops the workers too: nothing is left writing into the run directory.
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    if code != 0:
        raise LaunchError(
            f"`{' '.join(command[2:])}` exited with status {code}; full log: {log_path}\n"
            + (f"worker errors:\n{''.join(errors)}" if errors else "")
            + f"last {len(tail)} lines:\n{''.join(tail)}"
        )


def refuse_what_cannot_fit(config: Any, num_processes: int, accelerate_config: str = "") -> None:
    """On a GPU machine, raise ConfigError (naming the key) when the planner says a stage clearly cannot fit,
    before any worker starts or loads a model. Nothing to check without CUDA (the CPU rehearsals)."""
    import torch

    from raftlib.plan import Hardware, check_fits

    if not torch.cuda.is_available():
        return
    sharded = bool(accelerate_config) and "FSDP" in Path(accelerate_config).read_text()
    check_fits(config, Hardware.detect(num_processes), sharding="fsdp" if sharded else "ddp")


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
    from raftlib.loop import RunResult, holds_same_run
    from raftlib.store import RunStore, atomic_write_text

    if num_processes == 1 and not accelerate_config:
        return raftlib.run(config, reward=reward)  # raftlib.run refuses what cannot fit on a GPU itself
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


def launch_grpo(
    kwargs: dict[str, Any],
    work_dir: str | Path,
    num_processes: int = 1,
    accelerate_config: str = "",
    *,
    echo: Callable[[str], None] = _echo,
) -> Any:
    """`raftsuite.hh.run_grpo(**kwargs)` in the kernel, or on `num_processes` processes through `accelerate launch`.

    `kwargs` must be JSON (paths, numbers, config sections as dicts: see `run_grpo`); the result (the rows
    `run_grpo` returns) comes back through WORK_DIR/launch/grpo_result.json, written by the main process.
    """
    from raftsuite.hh import run_grpo

    if num_processes == 1 and not accelerate_config:
        return run_grpo(**kwargs)
    if kwargs.get("callbacks"):
        raise ValueError("callbacks: trainer callbacks cannot cross into `accelerate launch` workers")
    kwargs = dict(kwargs)
    # Prompt records travel as dicts and are rebuilt in the workers.
    kwargs["prompts"] = [asdict(p) if is_dataclass(p) else p for p in kwargs["prompts"]]
    kwargs = {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}
    launch_dir = Path(work_dir) / LAUNCH_DIR
    launch_dir.mkdir(parents=True, exist_ok=True)
    arguments, result = launch_dir / "grpo_kwargs.json", launch_dir / "grpo_result.json"
    arguments.write_text(json.dumps(kwargs, indent=1), encoding="utf-8")
    result.unlink(missing_ok=True)
    command, env = launch_command(
        ["raftsuite.launch", "grpo", str(arguments), str(result)], num_processes, accelerate_config
    )
    stream(command, env, launch_dir / "grpo.log", echo)
    return json.loads(result.read_text(encoding="utf-8"))


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


def _grpo_worker(arguments: Path, result: Path) -> None:
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from raftlib.records import Prompt
    from raftsuite.hh import run_grpo

    kwargs = json.loads(arguments.read_text(encoding="utf-8"))
    kwargs["prompts"] = [Prompt(**p) for p in kwargs["prompts"]]
    rows = run_grpo(**kwargs)
    if PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).is_main_process:
        tmp = result.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, default=float), encoding="utf-8")
        tmp.replace(result)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "grpo":
        print("usage: python -m raftsuite.launch grpo KWARGS.json OUT.json", file=sys.stderr)
        return 2
    _grpo_worker(Path(argv[1]), Path(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
