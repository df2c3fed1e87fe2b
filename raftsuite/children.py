"""A function in fresh Python process(es): one plain `python` child, or `accelerate launch` workers.

    record = run_in_child("raftsuite.hh_methods:raft_curve", {"config": config}, out_json, log)

Each method run of the HH notebooks goes through here, so its peak resident memory is its own (VmHWM, read by
every process at its end; CUDA's peak allocation too) and no run inherits another's allocator state. The child
writes its result as JSON; the parent reads it back with the memory and wall time. A long child's log is streamed
into the caller (`echo`) line by line as it comes, with the path of its full log.

    python -m raftsuite.children MODULE:FUNCTION '{"json": "kwargs"}' OUT.json     # what run_in_child runs
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raftsuite import launch


def rank() -> int:
    """This process's rank under `accelerate launch` (torchrun sets RANK), 0 in a plain child."""
    return int(os.environ.get("RANK", "0"))


def _memory_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.rank{rank}")


def run_in_child(
    function: str,
    kwargs: dict[str, Any],
    output: Path,
    log: Path,
    *,
    num_processes: int = 1,
    accelerate_config: str = "",
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """`module:function(**kwargs)` in fresh process(es): its JSON result (the main process's), peak RSS (MiB, the
    largest of any process, and `peak_rss_mib_per_process`), peak CUDA allocation (MiB, or None) and wall time (s).

    One process and no accelerate config: a plain `python` child; otherwise `accelerate launch` runs `function` in
    every worker (it must be accelerate-aware, as raftlib's loop and TRL's trainer are). Either way its output
    goes to `log` and through `echo` (default: `launch.progress_echo`, the per-iteration lines) as it comes.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    output.unlink(missing_ok=True)
    for stale in output.parent.glob(f"{output.name}.rank*"):
        stale.unlink()
    log.unlink(missing_ok=True)
    module_args = ["raftsuite.children", function, json.dumps(kwargs), str(output)]
    started = time.perf_counter()
    if num_processes == 1 and not accelerate_config:
        root = Path(__file__).resolve().parents[1]
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        env.pop("RANK", None)  # a plain child is rank 0 whatever launched the kernel
        command = [sys.executable, "-m", *module_args]
    else:
        command, env = launch.launch_command(module_args, num_processes, accelerate_config)
    launch.stream(command, env, log, echo or launch.progress_echo)
    record = json.loads(output.read_text())
    memory = [json.loads(path.read_text()) for path in sorted(output.parent.glob(f"{output.name}.rank*"))]
    record["peak_rss_mib_per_process"] = [m["peak_rss_mib"] for m in memory]
    record["peak_rss_mib"] = max(record["peak_rss_mib_per_process"])
    cuda = [m["peak_cuda_mib"] for m in memory if m["peak_cuda_mib"] is not None]
    record["peak_cuda_mib"] = max(cuda) if cuda else None
    record["processes"] = len(memory)
    record["process_seconds"] = time.perf_counter() - started
    return record


def _child(function: str, kwargs_json: str, output: str) -> None:
    module, name = function.split(":")
    result = getattr(importlib.import_module(module), name)(**json.loads(kwargs_json))
    me, path = rank(), Path(output)
    memory = {"peak_rss_mib": peak_rss_mib(), "peak_cuda_mib": peak_cuda_mib()}
    _memory_path(path, me).write_text(json.dumps(memory))
    if me == 0:  # every worker returns the same curve (or none); the main process's is the result
        path.write_text(json.dumps({"result": result}))


def peak_cuda_mib() -> float | None:
    """This process's peak CUDA allocation by torch (MiB), or None without CUDA."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def peak_rss_mib() -> float:
    """This process's peak resident memory since it started (VmHWM).

    Not `getrusage(...).ru_maxrss`: Linux carries the parent's high-water mark across fork and exec into
    it, so a child of a 700 MiB notebook kernel reports at least 700 MiB whatever it used.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no /proc: the best there is


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    _child(*sys.argv[1:4])
