"""Where the repository is, so a notebook runs the same from Jupyter, from the repository root and under papermill.

The notebooks' parameters are repository-relative strings (`assets/tiny-lm`, `notebooks/data/openings.jsonl`).
papermill runs a kernel with cwd = the repository root (the runner passes it), but Jupyter starts a kernel in the
notebook's own folder, `notebooks/`, where those paths do not exist. So each notebook's first code cell
(`raftsuite.notebook.start`) moves its kernel to the repository root, found from where the kernel starts, which
is where the notebook is: the working directory itself when it holds notebooks/profiles.yaml, or its parent when
the working directory is that checkout's notebooks/ folder; $RAFT_SUITE_ROOT, when set, names it explicitly.
Never from where the package was installed: a kernel started in a second checkout that shares this venv must
stay in its own checkout.

Why a chdir and not `resolve(path)` everywhere: the paths travel far (into raftlib configs, subprocesses,
files written and read back) and one missed `resolve` fails only when opened interactively. One chdir makes all
of them right, keeps parameters plain literals a profile can override, and is idempotent.
"""

from __future__ import annotations

import os
from pathlib import Path

MARKER = Path("notebooks") / "profiles.yaml"
"""A file only the suite's checkout has at its root."""
ENV = "RAFT_SUITE_ROOT"


def repo_root(start: str | os.PathLike[str] | None = None) -> Path:
    """The checkout the notebook lives in (see the module docstring): $RAFT_SUITE_ROOT, else `start` (default:
    the working directory) when it holds notebooks/profiles.yaml, else its parent when `start` is that
    checkout's notebooks/ folder."""
    if os.environ.get(ENV):
        root = Path(os.environ[ENV]).expanduser().resolve()
        if not (root / MARKER).is_file():
            raise FileNotFoundError(f"${ENV} = {root}: no {MARKER} there; point it at a checkout of the suite")
        return root
    here = Path(start or os.getcwd()).expanduser().resolve()
    for candidate in (here, here.parent):
        if (candidate / MARKER).is_file():
            return candidate
    raise FileNotFoundError(
        f"{here} is neither a checkout of the suite nor its notebooks/ folder (no {MARKER} there or one level up): "
        f"start Jupyter inside the checkout, or set ${ENV} to it"
    )


def at_repo_root() -> Path:
    """Make the repository root this process's working directory and return it (idempotent)."""
    root = repo_root()
    os.chdir(root)
    return root


def resolve(path: str | os.PathLike[str]) -> Path:
    """A repository-relative path as an absolute one (absolute paths are returned as they are)."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else repo_root() / path
