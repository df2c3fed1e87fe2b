"""Where the repository is, so a notebook runs the same from Jupyter, from the repository root and under papermill.

The notebooks' parameters are repository-relative strings (`assets/tiny-lm`, `notebooks/data/openings.jsonl`,
`results/tiny/hh_rlhf`). papermill runs a kernel with cwd = the repository root (the runner passes it), but
Jupyter starts a kernel in the notebook's own folder, `notebooks/`, where those paths do not exist.

The choice: each notebook's first code cell moves its kernel to the repository root,

    from raftsuite.paths import at_repo_root; at_repo_root()  # repo-relative paths work from Jupyter too

rather than wrapping every use in `resolve(path)`. Why: the paths travel far — into raftlib configs
(`model.path`, `data.prompts`, `output_dir`), into subprocesses (`accelerate launch` inherits the cwd), into
files the notebooks write and read back — and one missed `resolve` fails only when opened interactively,
exactly the case no papermill test sees. One chdir makes every one of them right at once, keeps the
parameters plain literals a profile can override, is idempotent (re-running the cell is harmless), and
makes the interactive kernel match the papermill one, so both give the same results. The cost is that a
user's own relative paths in that kernel also resolve from the root: the convention, stated in the cell.

The root comes from this package's own location (an editable install, `pip install -e .`, which
`make setup` does), checked by a marker file, never from the cwd: the cwd is what is wrong. A non-editable
install outside a checkout can point at one with RAFT_SUITE_ROOT.
"""

from __future__ import annotations

import os
from pathlib import Path

MARKER = Path("notebooks") / "profiles.yaml"
"""A file only the suite's checkout has at its root."""
ENV = "RAFT_SUITE_ROOT"


def repo_root() -> Path:
    """The checkout holding notebooks/profiles.yaml: $RAFT_SUITE_ROOT if set, else this package's parent."""
    if os.environ.get(ENV):
        root = Path(os.environ[ENV]).expanduser().resolve()
        if not (root / MARKER).is_file():
            raise FileNotFoundError(f"${ENV} = {root}: no {MARKER} there; point it at a checkout of the suite")
        return root
    root = Path(__file__).resolve().parent.parent
    if not (root / MARKER).is_file():
        raise FileNotFoundError(
            f"raftsuite is imported from {Path(__file__).resolve().parent}, which is not inside a checkout of the "
            f"suite (no {MARKER} in {root}): install it with `pip install -e .` from the checkout "
            f"(`make setup` does), or set ${ENV} to the checkout"
        )
    return root


def at_repo_root() -> Path:
    """Make the repository root this process's working directory (a notebook's first code cell calls it)
    and return it, so the notebook's repository-relative parameters resolve the same everywhere."""
    root = repo_root()
    os.chdir(root)
    return root


def resolve(path: str | os.PathLike[str]) -> Path:
    """A repository-relative path as an absolute one (absolute paths are returned as they are); for code
    that must not change the working directory, such as a library function."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else repo_root() / path
