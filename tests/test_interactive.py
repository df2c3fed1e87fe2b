"""Notebooks opened interactively: a kernel started in notebooks/ (as Jupyter starts it) resolves the
repository-relative parameters after `at_repo_root()`; and JupyterLab itself, in headless Chromium, runs
a notebook's first cells.

The notebook here is built for the test (a real one takes minutes). To check a real notebook's first
cells instead, pass `nbformat.read(ROOT / "notebooks" / "hh_rlhf.ipynb", as_version=4)` cut to its first
cells to `execute_as_jupyter_would`, and its path to `open_in_jupyterlab`.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import nbformat
import papermill
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from raftsuite import paths

ROOT = Path(__file__).parent.parent
SNIPPET = "from raftsuite.paths import at_repo_root; at_repo_root()  # repo-relative paths work from Jupyter too"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="Debian's chromium is not installed (.ci/run installs it)"
)


def reads_openings(with_snippet: bool = True) -> nbformat.NotebookNode:
    """A notebook shaped like the suite's: the root cell, a parameters cell of repo-relative strings, a use."""
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell(SNIPPET if with_snippet else "pass"),
        nbformat.v4.new_code_cell('openings = "notebooks/data/openings.jsonl"', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(
            "import json, os\n"
            "rows = [json.loads(line) for line in open(openings)]\n"
            "print(f\"openings: {len(rows)} first: {rows[0]['prompt']} cwd: {os.getcwd()}\")"
        ),
    ]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return notebook


def execute_as_jupyter_would(notebook: nbformat.NotebookNode, cwd: Path) -> nbformat.NotebookNode:
    """Run a notebook through nbclient's kernel manager with the kernel started in `cwd`, as Jupyter does."""
    NotebookClient(notebook, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook


def expected_output() -> str:
    first = json.loads((ROOT / "notebooks" / "data" / "openings.jsonl").read_text().splitlines()[0])["prompt"]
    return f"openings: 400 first: {first} cwd: {ROOT.resolve()}"


def test_repo_root_comes_from_the_package_not_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.repo_root() == ROOT.resolve()
    assert paths.resolve("notebooks/data/openings.jsonl").is_file()
    assert paths.resolve(tmp_path) == tmp_path
    monkeypatch.setenv(paths.ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"RAFT_SUITE_ROOT = .*: no notebooks/profiles\.yaml there"):
        paths.repo_root()
    monkeypatch.delenv(paths.ENV)
    assert paths.at_repo_root() == ROOT.resolve() and Path.cwd() == ROOT.resolve()


def test_a_kernel_started_in_notebooks_runs_the_notebook():
    executed = execute_as_jupyter_would(reads_openings(), ROOT / "notebooks")
    assert executed.cells[2].outputs[0]["text"].strip() == expected_output()


def test_without_the_snippet_it_fails_as_the_issue_says():
    """The control: the same notebook without `at_repo_root()` cannot find its data from notebooks/."""
    with pytest.raises(CellExecutionError, match="FileNotFoundError"):
        execute_as_jupyter_would(reads_openings(with_snippet=False), ROOT / "notebooks")


def test_papermill_from_the_root_gives_the_same_output(tmp_path):
    nbformat.write(reads_openings(), tmp_path / "in.ipynb")
    papermill.execute_notebook(
        str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb"), kernel_name="python3", cwd=str(ROOT),
        progress_bar=False,
    )  # fmt: skip
    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert code[-1].outputs[0]["text"].strip() == expected_output()


# ---- JupyterLab in headless Chromium -----------------------------------------------------------------


OUTPUT_WAIT_MS = 120_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_jupyterlab(tmp: Path, token: str, port: int) -> subprocess.Popen:
    """A JupyterLab server rooted at the repository, with its settings, runtime and data dirs in `tmp` (so
    it touches no user configuration) and autosave off (so it never writes outputs into a notebook)."""
    settings = tmp / "settings" / "@jupyterlab" / "docmanager-extension"
    settings.mkdir(parents=True)
    (settings / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    notification = tmp / "settings" / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True)
    (notification / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    env = os.environ | {
        "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
        "JUPYTER_CONFIG_DIR": str(tmp / "config"),
        "JUPYTER_DATA_DIR": str(tmp / "data"),
    }
    command = [
        *(sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1"),
        *(f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}"),
        *(f"--LabApp.user_settings_dir={tmp / 'settings'}", f"--LabApp.workspaces_dir={tmp / 'workspaces'}"),
        *("--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.news_url="),
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")  # CI containers run as root; Jupyter refuses without this
    with open(tmp / "server.log", "w") as log:  # the server keeps its own copy of the descriptor
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2) as reply:
                if reply.status == 200:
                    return server
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"jupyter lab did not start: {(tmp / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)


def open_in_jupyterlab(notebook: Path, cells: int, expect: str, tmp: Path) -> str:
    """Open `notebook` (inside the repository) in JupyterLab in headless Chromium, run its first `cells`
    cells with Shift+Enter, and return the text of the first output holding `expect`."""
    from playwright.sync_api import sync_playwright

    token, port = uuid.uuid4().hex, _free_port()
    server = start_jupyterlab(tmp, token, port)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            relative = notebook.resolve().relative_to(ROOT.resolve()).as_posix()
            page.goto(f"http://127.0.0.1:{port}/lab/tree/{relative}?token={token}", timeout=120_000)
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)
            # The kernel is ready when the status bar says so (a cell run before that is dropped, not queued).
            page.wait_for_selector(".jp-StatusBar-Widget:has-text('| Idle')", timeout=120_000)
            try:
                page.click(".jp-NotebookPanel .jp-Cell .jp-InputArea-editor")
                for index in range(cells):
                    # One cell at a time: Shift+Enter runs the active cell and moves on; wait for its In [n]
                    # (key presses sent faster than JupyterLab moves the active cell are lost).
                    page.keyboard.press("Shift+Enter")
                    page.wait_for_function(
                        "i => /\\[\\d+\\]/.test(document.querySelectorAll('.jp-NotebookPanel .jp-Cell')[i]"
                        ".querySelector('.jp-InputPrompt').textContent)",
                        arg=index,
                        timeout=OUTPUT_WAIT_MS,
                    )
                output = page.wait_for_selector(
                    f".jp-OutputArea-output:has-text({json.dumps(expect)})", timeout=OUTPUT_WAIT_MS
                )
            finally:
                page.screenshot(path=str(tmp / "jupyterlab.png"))  # what the page showed, to look at on failure
            text = output.inner_text()
            browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    return text


@needs_chromium
def test_jupyterlab_opens_a_notebook_and_runs_its_first_cells(tmp_path):
    # Inside the repository (Jupyter serves only its root dir) but not in it root, in git-ignored runs/.
    folder = ROOT / "runs" / f"interactive-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    try:
        notebook = folder / "check.ipynb"
        nbformat.write(reads_openings(), notebook)
        before = notebook.read_bytes()
        text = open_in_jupyterlab(notebook, cells=3, expect="openings: 400", tmp=tmp_path)
        assert text.strip() == expected_output()
        assert notebook.read_bytes() == before  # autosave off: the notebook file was not rewritten
    finally:
        shutil.rmtree(folder)
