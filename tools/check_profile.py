"""Fail fast on a mistyped PROFILE or notebook, before `make` spends minutes setting up .venv.

    python3 tools/check_profile.py PROFILE [NOTEBOOK ...]

Standard library only (it runs before the environment exists): the profiles are the unindented keys of
notebooks/profiles.yaml that do not start with "_" (those hold YAML anchors); the notebooks are notebooks/*.ipynb.
The full check of every value (`python -m raftsuite.runner check`) runs once the environment is there.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ROOT / "notebooks" / "profiles.yaml"


def profiles() -> list[str]:
    keys = re.findall(r"^([A-Za-z][\w-]*):", PROFILES.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return [k for k in keys if not k.startswith("_")]


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    profile, notebooks = argv[0], argv[1:]
    known = profiles()
    if profile not in known:
        print(
            f"error: PROFILE={profile}: no such profile in notebooks/profiles.yaml (profiles: {', '.join(known)})",
            file=sys.stderr,
        )
        return 1
    names = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    for name in notebooks:
        if name not in names:
            print(f"error: no notebook notebooks/{name}.ipynb (notebooks: {', '.join(names)})", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
