"""Notebooks opened interactively: a kernel started in notebooks/ (as Jupyter starts it) finds its checkout from
where it starts (`raftsuite.paths`), moves there and resolves the repository-relative parameters; the first code
cell, `raftsuite.notebook.start`, applies the profile by hand and checks the parameters; and JupyterLab itself, in
headless Chromium, runs a notebook's first cells.

The notebook here is built for the test (a real one takes minutes); the real notebooks' first cells (parameters
and `start`) run in `test_a_real_notebooks_first_cells_run_in_a_kernel_started_in_notebooks`. To open one in
JupyterLab instead, pass its path to `open_in_jupyterlab`.
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


@pytest.fixture(autouse=True)
def no_root_variable(monkeypatch):
    """Every test starts without $RAFT_SUITE_ROOT (kernels inherit this process's environment), and the runner's
    checkout (`runner.use_root`, which `notebook.start` calls in this process) is put back afterwards."""
    monkeypatch.delenv(paths.ENV, raising=False)
    from raftsuite import runner

    for name in ("ROOT", "NOTEBOOKS", "PROFILES", "RESULTS"):
        monkeypatch.setattr(runner, name, getattr(runner, name))


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


def expected_output(root: Path = ROOT) -> str:
    first = json.loads((root / "notebooks" / "data" / "openings.jsonl").read_text().splitlines()[0])["prompt"]
    count = len((root / "notebooks" / "data" / "openings.jsonl").read_text().splitlines())
    return f"openings: {count} first: {first} cwd: {root.resolve()}"


def second_checkout(directory: Path) -> Path:
    """Another checkout of the suite (its marker and its own openings), sharing this process's venv and package."""
    (directory / "notebooks" / "data").mkdir(parents=True)
    (directory / "notebooks" / "profiles.yaml").write_text("smoke: {}\n")
    rows = [json.dumps({"prompt": f"the second checkout's opening {i}"}) for i in range(3)]
    (directory / "notebooks" / "data" / "openings.jsonl").write_text("\n".join(rows) + "\n")
    return directory.resolve()


# ---- where the repository is -------------------------------------------------------------------------


def test_the_root_is_the_checkout_the_kernel_starts_in_not_where_the_package_is(tmp_path, monkeypatch):
    other = second_checkout(tmp_path / "other")
    assert Path(paths.__file__).resolve().parent.parent == ROOT.resolve()  # the package is this checkout's
    for start, root in ((ROOT, ROOT), (ROOT / "notebooks", ROOT), (other, other), (other / "notebooks", other)):
        monkeypatch.chdir(start)
        assert paths.repo_root() == root.resolve(), start
        assert paths.repo_root(start) == root.resolve()
    # a kernel started in the second checkout's notebooks/: its paths are that checkout's
    monkeypatch.chdir(other / "notebooks")
    assert paths.resolve("notebooks/data/openings.jsonl") == other / "notebooks" / "data" / "openings.jsonl"
    assert paths.resolve(tmp_path) == tmp_path  # absolute paths are left as they are
    assert paths.at_repo_root() == other and Path.cwd() == other
    assert paths.at_repo_root() == other and Path.cwd() == other  # idempotent


def test_an_unknown_directory_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = r"is neither a checkout of the suite nor its notebooks/ folder .*set \$RAFT_SUITE_ROOT"
    with pytest.raises(FileNotFoundError, match=message):
        paths.repo_root()
    with pytest.raises(FileNotFoundError, match=message):
        paths.at_repo_root()
    assert Path.cwd() == tmp_path  # nothing moved
    with pytest.raises(FileNotFoundError, match=message):  # one level up only: notebooks/data is not notebooks/
        paths.repo_root(ROOT / "notebooks" / "data")
    with pytest.raises(FileNotFoundError, match=message):
        paths.resolve("notebooks/data/openings.jsonl")


def test_raft_suite_root_names_the_checkout_whatever_the_working_directory(tmp_path, monkeypatch):
    other = second_checkout(tmp_path / "other")
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv(paths.ENV, str(other))
    assert paths.repo_root() == other and paths.repo_root(ROOT) == other
    monkeypatch.setenv(paths.ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"RAFT_SUITE_ROOT = .*: no notebooks/profiles\.yaml there"):
        paths.repo_root()


# ---- a kernel started in notebooks/ --------------------------------------------------------------------


def test_a_kernel_started_in_notebooks_runs_the_notebook():
    executed = execute_as_jupyter_would(reads_openings(), ROOT / "notebooks")
    assert executed.cells[2].outputs[0]["text"].strip() == expected_output()


def test_a_kernel_started_in_a_second_checkouts_notebooks_stays_in_that_checkout(tmp_path):
    """The kernel imports raftsuite from this checkout (one venv), but reads the second checkout's files."""
    other = second_checkout(tmp_path / "other")
    executed = execute_as_jupyter_would(reads_openings(), other / "notebooks")
    assert executed.cells[2].outputs[0]["text"].strip() == expected_output(other)
    assert expected_output(other).startswith("openings: 3 first: the second checkout's opening 0")


def test_without_the_snippet_it_fails_as_the_issue_says():
    """The control: the same notebook without `at_repo_root()` cannot find its data from notebooks/."""
    with pytest.raises(CellExecutionError, match="FileNotFoundError"):
        execute_as_jupyter_would(reads_openings(with_snippet=False), ROOT / "notebooks")


def test_papermill_from_the_root_gives_the_same_output(tmp_path):
    nbformat.write(reads_openings(), tmp_path / "in.ipynb")
    papermill.execute_notebook(
        str(tmp_path / "in.ipynb"),
        str(tmp_path / "out.ipynb"),
        kernel_name="python3",
        cwd=str(ROOT),
        progress_bar=False,
    )
    executed = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert code[-1].outputs[0]["text"].strip() == expected_output()


def first_cells(name: str, *extra: str) -> nbformat.NotebookNode:
    """A real notebook's parameters cells and its first cell up to `start(...)`, then `extra` cells."""
    notebook = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    parameters = [cell for cell in code if any(t.startswith("parameters") for t in cell.metadata.get("tags", []))]
    first = code[len(parameters)]
    lines = first.source.splitlines()
    upto = next(i for i, line in enumerate(lines) if line.startswith("params = start("))
    first.source = "\n".join(lines[: upto + 1])
    notebook.cells = [*parameters, first, *(nbformat.v4.new_code_cell(source) for source in extra)]
    return notebook


def test_a_real_notebooks_first_cells_run_in_a_kernel_started_in_notebooks():
    show = "import os; print(os.getcwd(), output_dir, work_dir, params.iterations, params.profile)"
    executed = execute_as_jupyter_would(first_cells("hh_rlhf", show), ROOT / "notebooks")
    started = "".join(o.get("text", "") for o in executed.cells[-2].outputs)
    assert started.startswith("hh_rlhf, profile tiny (hand)") and "results in runs/tiny/hh_rlhf/report" in started
    assert f"repository: {ROOT.resolve()}" in started
    shown = executed.cells[-1].outputs[0]["text"].split()
    assert shown == [str(ROOT.resolve()), "runs/tiny/hh_rlhf/report", "runs/tiny/hh_rlhf", "6", "tiny"]


# ---- start(): the profile by hand, checked parameters --------------------------------------------------


def test_start_by_hand_applies_the_profile_and_writes_under_runs(monkeypatch, capsys):
    from raftsuite import notebook, runner

    monkeypatch.chdir(ROOT / "notebooks")
    namespace = runner.notebook_parameters("hh_rlhf") | {"profile": "smoke", "unrelated": object()}
    params = notebook.start("hh_rlhf", namespace)
    smoke = runner.load_profile("smoke")["hh_rlhf"]
    assert Path.cwd() == ROOT.resolve()
    assert params.iterations == smoke["iterations"] != runner.notebook_parameters("hh_rlhf")["iterations"]
    assert (params.output_dir, params.work_dir) == ("runs/smoke/hh_rlhf/report", "runs/smoke/hh_rlhf")
    assert namespace["iterations"] == smoke["iterations"] and namespace["output_dir"] == params.output_dir
    assert "unrelated" not in params  # only the notebook's parameters
    assert (params | {"iterations": 1}).iterations == 1 and params.iterations == smoke["iterations"]
    with pytest.raises(TypeError):
        params["iterations"] = 1  # read-only
    with pytest.raises(AttributeError, match="no parameter 'iteration'"):
        params.iteration  # noqa: B018
    assert capsys.readouterr().out.startswith("hh_rlhf, profile smoke (hand)")


def test_start_names_an_edit_the_profile_replaces_and_says_what_the_run_time_rests_on(monkeypatch, capsys):
    from raftsuite import notebook, runner

    monkeypatch.chdir(ROOT)
    defaults = runner.notebook_parameters("efficiency")
    smoke = runner.load_profile("smoke")["efficiency"]
    edited = smoke["iterations"] + 1
    notebook.start("efficiency", defaults | {"profile": "smoke", "iterations": edited})
    printed = capsys.readouterr().out
    assert f"profile smoke replaces what this cell set: iterations: {edited} -> {smoke['iterations']}" in printed
    # efficiency reuses hh_rlhf's runs: its committed time alone would promise a run of seconds
    assert "after hh_rlhf had run (with an empty runs/ cache add their part: hh_rlhf" in notebook.expected_time(
        "tiny", "efficiency"
    )
    assert notebook.expected_time("no-such-profile", "hh_rlhf") == "no committed no-such-profile run to time it by"
    # An earlier notebook with no committed run of its own adds no "add their part" clause with nothing in it.
    monkeypatch.setattr(notebook, "expected_minutes", lambda profile, name: 2.0 if name == "efficiency" else None)
    assert notebook.expected_time("tiny", "efficiency") == (
        "the committed run took 2.0 min after hh_rlhf had run on the suite's 2-core machine"
    )


def test_start_under_the_runner_applies_nothing_and_a_bad_value_is_named(monkeypatch):
    from raftsuite import notebook, runner

    monkeypatch.chdir(ROOT)
    injected = {"profile": "smoke", "run_by": "runner", "output_dir": "results/smoke/hh_rlhf", "work_dir": "w"}
    params = notebook.start("hh_rlhf", runner.notebook_parameters("hh_rlhf") | injected)
    assert params.iterations == runner.notebook_parameters("hh_rlhf")["iterations"]  # papermill already did it
    assert (params.output_dir, params.work_dir) == ("results/smoke/hh_rlhf", "w")
    with pytest.raises(runner.ParameterError, match=r"notebooks/hh_rlhf\.ipynb.*iterations = 'six'"):
        notebook.start("hh_rlhf", runner.notebook_parameters("hh_rlhf") | {"iterations": "six"})


def test_start_in_a_second_checkout_applies_that_checkouts_profile(tmp_path, monkeypatch):
    from raftsuite import notebook, runner

    other = second_checkout(tmp_path / "other")
    shutil.copy(ROOT / "notebooks" / "hh_rlhf.ipynb", other / "notebooks")
    (other / "notebooks" / "profiles.yaml").write_text("smoke:\n  hh_rlhf: {iterations: 5}\n")
    monkeypatch.chdir(other / "notebooks")
    params = notebook.start("hh_rlhf", runner.notebook_parameters("hh_rlhf") | {"profile": "smoke"})
    assert Path.cwd() == other
    assert params.iterations == 5


# ---- JupyterLab in headless Chromium -----------------------------------------------------------------


OUTPUT_WAIT_MS = 120_000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_jupyterlab(tmp: Path, token: str, port: int, root: Path = ROOT) -> subprocess.Popen:
    """A JupyterLab server rooted at a checkout (`root`), with its settings, runtime and data dirs in `tmp` (so
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
        *(f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}"),
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


def open_in_jupyterlab(notebook: Path, cells: int, expect: str, tmp: Path, root: Path = ROOT) -> str:
    """Open `notebook` (inside the checkout `root`, which JupyterLab serves) in JupyterLab in headless Chromium, run its first `cells`
    cells with Shift+Enter, and return the text of the first output holding `expect`."""
    from playwright.sync_api import sync_playwright

    token, port = uuid.uuid4().hex, _free_port()
    server = start_jupyterlab(tmp, token, port, root)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            relative = notebook.resolve().relative_to(root.resolve()).as_posix()
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
    # Jupyter serves only its root dir and starts the kernel in the notebook's folder: a second checkout's
    # notebooks/ (outside this repository, so nothing is written into it), which the kernel must stay in.
    other = second_checkout(tmp_path / "other")
    notebook = other / "notebooks" / "check.ipynb"
    nbformat.write(reads_openings(), notebook)
    before = notebook.read_bytes()
    text = open_in_jupyterlab(notebook, cells=3, expect="openings: 3", tmp=tmp_path / "jupyter", root=other)
    assert text.strip() == expected_output(other)
    assert notebook.read_bytes() == before  # autosave off: the notebook file was not rewritten
