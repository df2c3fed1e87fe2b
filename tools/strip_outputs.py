"""Strip outputs and execution counts from notebooks, so none is committed with them.

    python tools/strip_outputs.py notebooks/*.ipynb          # strip in place, name what changed
    python tools/strip_outputs.py --check notebooks/*.ipynb  # exit 1 naming each notebook that holds outputs

`make setup` installs .githooks/pre-commit, which runs this on the staged notebooks and stages the stripped copy
(`git config core.hooksPath .githooks`). Executed copies belong under results/ (the runner writes them there).
Standard library only: the notebook JSON is edited as JSON, key order and the 1-space indent kept as nbformat
writes them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def stripped(notebook: dict) -> dict:
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        cell.get("metadata", {}).pop("execution", None)  # papermill and JupyterLab timing records
    return notebook


def has_outputs(notebook: dict) -> bool:
    return any(
        cell.get("outputs") or cell.get("execution_count") is not None
        for cell in notebook.get("cells", [])
        if cell.get("cell_type") == "code"
    )


def main(argv: list[str]) -> int:
    check = "--check" in argv
    paths = [Path(a) for a in argv if a != "--check"]
    dirty = []
    for path in paths:
        notebook = json.loads(path.read_text(encoding="utf-8"))
        if not has_outputs(notebook):
            continue
        dirty.append(path)
        if not check:
            text = json.dumps(stripped(notebook), sort_keys=True, indent=1, ensure_ascii=False)  # as nbformat writes
            path.write_text(text + "\n", encoding="utf-8")
    for path in dirty:
        print(f"{path}: {'holds outputs' if check else 'outputs stripped'}", file=sys.stderr)
    return 1 if check and dirty else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
