"""Running a notebook by hand, as a researcher does in Jupyter: it writes under runs/, never into results/ or
into itself, its long cells stream per-iteration lines while they run, and notebooks cannot be committed with
outputs (tools/strip_outputs.py and the pre-commit hook in .githooks)."""

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def tree_state(directory: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `directory`."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def run_by_hand(notebook: Path, cwd: Path, edits: dict[str, str]) -> list[tuple[int, float, str, str]]:
    """Execute the notebook's cells one by one in a fresh kernel started in `cwd`, as JupyterLab would, after
    editing the parameters cell's assignments (`edits`: name -> new source text of the value). Nothing is saved.
    Returns every output message as (cell index, time, kind, text); raises on an error output."""
    from jupyter_client.manager import start_new_kernel

    cells = nbformat.read(notebook, as_version=4).cells
    manager, client = start_new_kernel(kernel_name="python3", cwd=str(cwd))
    messages = []
    try:
        for index, cell in enumerate(cells):
            if cell.cell_type != "code":
                continue
            source = cell.source
            if "parameters" in cell.metadata.get("tags", []):
                lines = [
                    f"{line.split('=')[0].strip()} = {edits[line.split('=')[0].strip()]}"
                    if "=" in line and line.split("=")[0].strip() in edits
                    else line
                    for line in source.splitlines()
                ]
                source = "\n".join(lines)
            msg_id = client.execute(source)
            while True:
                msg = client.get_iopub_msg(timeout=600)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                kind, content = msg["msg_type"], msg["content"]
                if kind == "stream":
                    messages.append((index, time.monotonic(), "stream", content["text"]))
                elif kind == "error":
                    raise AssertionError(f"cell {index} raised {content['ename']}: {content['evalue']}")
                elif kind == "status" and content["execution_state"] == "idle":
                    messages.append((index, time.monotonic(), "done", ""))
                    break
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    return messages


def test_a_notebook_run_by_hand_from_notebooks_leaves_results_and_itself_unchanged():
    """sd_resolution (the quickest) with `profile = "smoke"` typed into its parameters cell, kernel started in
    notebooks/ as JupyterLab starts it: the profile applies, output goes under runs/smoke/, results/ and the
    notebook file stay byte for byte as they were, and the runs cell streams each iteration's line as it comes."""
    notebook = ROOT / "notebooks" / "sd_resolution.ipynb"
    before_results, before_notebook = tree_state(ROOT / "results"), notebook.read_bytes()
    report_dir = ROOT / "runs" / "smoke" / "sd_resolution"
    shutil.rmtree(report_dir, ignore_errors=True)
    messages = run_by_hand(notebook, ROOT / "notebooks", {"profile": '"smoke"'})
    assert tree_state(ROOT / "results") == before_results
    assert notebook.read_bytes() == before_notebook
    assert (report_dir / "report" / "headline.json").is_file()  # where a run by hand writes
    headline = json.loads((report_dir / "report" / "headline.json").read_text())
    assert "smoke profile" in headline["title"]  # `profile = "smoke"` meant the smoke profile, not a label
    # the runs cell: its iteration lines came as separate messages, in order, before the cell finished
    iteration_lines = [(i, t, text) for i, t, kind, text in messages if kind == "stream" and "iter 1/2 |" in text]
    assert iteration_lines, "no per-iteration line was streamed"
    cell = iteration_lines[0][0]
    streamed = [(t, text) for i, t, kind, text in messages if i == cell and kind == "stream"]
    done = next(t for i, t, kind, _ in messages if i == cell and kind == "done")
    first = next(t for t, text in streamed if "iter 1/2 |" in text)
    second = next(t for t, text in streamed if "iter 2/2 |" in text)
    assert first < second < done and len(streamed) > 2


def test_strip_outputs_checks_and_strips(tmp_path):
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("1 + 1")
    cell.outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=1)]
    cell.execution_count = 1
    notebook.cells = [cell, nbformat.v4.new_markdown_cell("text")]
    path = tmp_path / "n.ipynb"
    nbformat.write(notebook, path)
    tool = [sys.executable, str(ROOT / "tools" / "strip_outputs.py")]
    check = subprocess.run([*tool, "--check", str(path)], capture_output=True, text=True)
    assert check.returncode == 1 and "holds outputs" in check.stderr
    assert subprocess.run([*tool, str(path)], capture_output=True).returncode == 0
    cleaned = nbformat.read(path, as_version=4)
    assert cleaned.cells[0].outputs == [] and cleaned.cells[0].execution_count is None
    assert cleaned.cells[0].source == "1 + 1" and cleaned.cells[1].source == "text"
    assert subprocess.run([*tool, "--check", str(path)]).returncode == 0


def test_the_pre_commit_hook_commits_notebooks_without_outputs(tmp_path):
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    shutil.copytree(ROOT / "tools", repo / "tools")
    shutil.copytree(ROOT / ".githooks", repo / ".githooks")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "config", "core.hooksPath", ".githooks"], check=True)  # what `make setup` sets
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print('hi')")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hi\n")]
    cell.execution_count = 3
    notebook.cells = [cell]
    nbformat.write(notebook, repo / "notebooks" / "x.ipynb")
    subprocess.run([*git, "add", "notebooks/x.ipynb"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "a notebook with outputs"], check=True)
    committed = subprocess.run([*git, "show", "HEAD:notebooks/x.ipynb"], capture_output=True, text=True, check=True)
    cells = json.loads(committed.stdout)["cells"]
    assert cells[0]["outputs"] == [] and cells[0]["execution_count"] is None
    assert "".join(cells[0]["source"]) == "print('hi')"


def test_checkpoints_are_ignored():
    ignored = subprocess.run(
        ["git", "-C", str(ROOT), "check-ignore", "-q", "notebooks/.ipynb_checkpoints/hh_rlhf-checkpoint.ipynb"]
    )
    assert ignored.returncode == 0
