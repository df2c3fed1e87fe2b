"""The report header (code, machine, software, parameters, seeds, stage times), collapsed run logs, headline
intervals on the index, and the runner's progress bar, through a real papermill run of a small notebook."""

import json
import os
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import nbformat
import pytest

from raftsuite import header, report, runner

ROOT = Path(__file__).parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="Debian's chromium is not installed (.ci/run installs it)"
)


def test_stage_records_wall_time_in_order_and_failures(tmp_path):
    with report.stage("setup", tmp_path):
        pass
    with pytest.raises(RuntimeError), report.stage("RAFT", tmp_path):
        raise RuntimeError("diverged")
    assert list(report.read_stages(tmp_path)) == ["setup", "RAFT"]
    assert report.read_stages(tmp_path)["RAFT"]["failed"] is True
    with report.stage("setup", tmp_path):  # the cell run again: its entry is replaced and moves last
        pass
    stages = report.read_stages(tmp_path)
    assert list(stages) == ["RAFT", "setup"] and stages["setup"]["failed"] is False
    assert all(s["seconds"] >= 0 for s in stages.values())
    assert report.read_stages(tmp_path / "nowhere") == {}
    (tmp_path / "stages.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"stages\.json: not valid JSON"):
        report.read_stages(tmp_path)


def test_header_describes_this_checkout_and_machine():
    collected = header.collect(ROOT, "smoke", {"seeds": [0, 1, 2], "eval_seed": 7, "iterations": 2})
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert collected["git"]["commit"] == head.strip() and isinstance(collected["git"]["dirty"], bool)
    assert collected["versions"]["torch"] == metadata.version("torch")
    assert collected["versions"]["papermill"] == metadata.version("papermill")
    assert set(header.PACKAGES) <= set(collected["versions"])
    assert collected["machine"]["cores"] == os.cpu_count() and collected["machine"]["memory_gib"] > 0
    assert collected["seeds"] == {"seeds": [0, 1, 2], "eval_seed": 7}
    page = header.to_html(collected | {"parameters": {"prompt": "<script>x</script>"}})
    assert "<script>x" not in page and "&lt;script&gt;x" in page  # a parameter is text, never markup
    assert header.git_state(Path("/"))["commit"] is None  # not a checkout: said, not crashed


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """One real `python -m raftsuite.runner all` over a notebook that times a stage, logs to stderr and prints."""
    tmp = tmp_path_factory.mktemp("header")
    notebooks = tmp / "notebooks"
    notebooks.mkdir()
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell(
            'profile = "smoke"\noutput_dir = ""\nwork_dir = ""\nshow_progress = True\nseeds = [0, 1, 2]',
            metadata={"tags": ["parameters"]},
        ),
        nbformat.v4.new_markdown_cell("## Train\nA stage that logs."),
        nbformat.v4.new_code_cell(
            "import logging, sys\nfrom raftsuite import report\n"
            "logging.basicConfig(level=logging.INFO, stream=sys.stderr)\n"
            'with report.stage("RAFT", output_dir):\n'
            "    for i in range(40):\n"
            '        logging.getLogger("raftlib").info("iter %d reward 0.5", i)\n'
            '    print("the per-iteration table")'
        ),
        nbformat.v4.new_code_cell('logging.getLogger("raftlib").error("reward model returned NaN")'),
        nbformat.v4.new_code_cell(
            'report.write_headline(output_dir, "small", {"reward": (0.45, 0.40, 0.51), "steps": 3})'
        ),
    ]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, notebooks / "small.ipynb")
    (notebooks / "profiles.yaml").write_text("smoke:\n  small: {seeds: [3, 4, 5]}\n")
    stale = tmp / "results" / "smoke" / "small" / "table_an_older_version_wrote.csv"
    stale.parent.mkdir(parents=True)
    stale.write_text("old\n")
    patch = pytest.MonkeyPatch()
    for name, value in {
        "NOTEBOOKS": notebooks,
        "PROFILES": notebooks / "profiles.yaml",
        "ROOT": tmp,
        "RESULTS": tmp / "results",
    }.items():
        patch.setattr(runner, name, value)
    import contextlib
    import io

    stderr = io.StringIO()
    try:  # undone even when the run raises: the runner's paths are module globals other tests read
        with contextlib.redirect_stderr(stderr):
            code = runner.main(["all", "--profile", "smoke", "--progress"])
    finally:
        patch.undo()
    assert code == 0
    assert not stale.exists()  # the previous run's files are cleared before the notebook runs
    return tmp / "results" / "smoke" / "small", stderr.getvalue()


def test_progress_bar_names_the_notebook_and_cell(small_run):
    _, stderr = small_run
    assert "small cell 5/5: report.write_headline(output_dir" in stderr  # papermill injects one cell
    assert "small § Train" in stderr  # a markdown cell names the section being entered
    assert "cell/s" in stderr or "s/cell" in stderr  # tqdm's bar, counted in cells


def test_report_opens_with_the_header_and_logs_collapsed(small_run):
    directory, _ = small_run
    saved = json.loads((directory / "header.json").read_text())
    assert saved["seeds"] == {"seeds": [3, 4, 5]} and saved["parameters"]["seeds"] == [3, 4, 5]
    assert list(saved["stages"]) == ["RAFT"] and saved["wall_seconds"] > 0
    page = (directory / "report.html").read_text()
    assert 'id="raft-header"' in page and saved["git"]["commit"] is None  # the temp root is not a checkout
    assert "RAFT</td>" in page and "seeds = [3, 4, 5]" in page
    assert 'data-mime-type="application/vnd.jupyter.stderr"' not in page  # no red stderr box left
    # (nbconvert re-serialises the HTML: double quotes, open="")
    assert '<details class="raft-log"><summary>log (stderr) · 40 lines</summary>' in page
    assert '<details class="raft-log raft-log-error" open=""><summary>log (stderr) · 1 line · 1 error' in page


def test_index_shows_headline_intervals(small_run):
    directory, _ = small_run
    index = (directory.parent.parent / "index.html").read_text()
    assert "reward: <b>0.450 [0.400, 0.510]</b>" in index and "steps: <b>3</b>" in index


@needs_chromium
def test_collapsed_logs_stay_out_of_view_and_errors_in_view(small_run):
    from playwright.sync_api import sync_playwright

    directory, _ = small_run
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.route("**/*", lambda route: route.abort() if route.request.url.startswith("http") else route.continue_())
        page.goto((directory / "report.html").as_uri())
        text = page.inner_text("body")
        assert "the per-iteration table" in text and "iter 7 reward" not in text  # closed: not shown
        assert "reward model returned NaN" in text  # the error's block is open
        assert "code" in text and "stages" in text and "RAFT" in text  # the header
        page.click("details.raft-log:not(.raft-log-error) > summary")
        assert "iter 7 reward" in page.inner_text("body")  # one click shows the log
        browser.close()


COMMITTED = ROOT / "results" / "tiny" / "ablations" / "ablations.ipynb"


@pytest.mark.skipif(not COMMITTED.is_file(), reason="no committed ablations report")
def test_committed_ablations_report_rerenders_without_stderr_boxes(tmp_path):
    runner.render_report(COMMITTED, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert 'data-mime-type="application/vnd.jupyter.stderr"' not in page
    assert '<details class="raft-log' in page


def test_lanes_keep_shared_work_together_and_balance_by_recorded_time(tmp_path):
    seconds = {
        "hh_rlhf": 1200,
        "efficiency": 30,
        "ablations": 900,
        "sd_resolution": 180,
        "sd_alignment": 360,
        "reasoning": 700,
    }
    for name, value in seconds.items():
        (tmp_path / "tiny" / name).mkdir(parents=True)
        (tmp_path / "tiny" / name / "status.json").write_text(json.dumps({"ok": True, "seconds": value}))
    names = sorted(seconds)
    two = runner.lanes(names, 2, tmp_path)
    assert two == [["hh_rlhf", "efficiency", "ablations"], ["reasoning", "sd_alignment", "sd_resolution"]]
    assert runner.lanes(names, 1, tmp_path) == [
        ["hh_rlhf", "efficiency", "ablations", "reasoning", "sd_alignment", "sd_resolution"]
    ]
    # four lanes: the shared group stays whole; the longest lanes are not split further
    four = runner.lanes(names, 4, tmp_path)
    assert ["hh_rlhf", "efficiency", "ablations"] in four and sorted(n for lane in four for n in lane) == names
    assert sorted(runner.lanes(["sd_alignment", "efficiency"], 3, tmp_path)) == [["efficiency"], ["sd_alignment"]]


def test_the_thread_setting_reaches_the_header(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    collected = header.collect(ROOT, "tiny", {})
    assert collected["machine"]["threads"] == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "unset"}
    assert "OMP_NUM_THREADS=1" in header.to_html(collected)


def test_the_dirty_flag_counts_code_not_results(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "headline.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    (tmp_path / "results" / "headline.json").unlink()  # what the runner does as a notebook starts
    assert header.git_state(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert header.git_state(tmp_path)["dirty"] is True


def test_figures_carry_alt_text_from_the_cell_that_saved_them(tmp_path):
    """A figure save_figure wrote gets its own words as alt text in the report; one it did not, its section."""
    import papermill

    out = tmp_path / "out"
    out.mkdir()
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_markdown_cell("# Curves\nsome words"),
        nbformat.v4.new_code_cell(
            "import matplotlib.pyplot as plt\nfrom raftsuite import report\n"
            "fig, ax = plt.subplots()\nax.plot([0, 1], [0, 1])\nax.set(title='seed 0', xlabel='iteration', "
            "ylabel='reward')\nfig.suptitle('Held-out reward')\n"
            f"_ = report.save_figure(fig, {str(out)!r}, 'curve')"
        ),
        nbformat.v4.new_markdown_cell("## Not saved"),
        nbformat.v4.new_code_cell("fig, ax = plt.subplots()\nax.plot([1, 0])"),
    ]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, tmp_path / "figures.ipynb")
    executed = out / "figures.ipynb"
    papermill.execute_notebook(
        str(tmp_path / "figures.ipynb"), str(executed), kernel_name="python3", progress_bar=False
    )
    recorded = json.loads((out / "figures.json").read_text())
    assert recorded["curve"]["alt"] == "Held-out reward; seed 0: reward against iteration"
    runner.render_report(executed, out / "report.html")
    page = (out / "report.html").read_text()
    assert 'alt="Figure curve.png: Held-out reward; seed 0: reward against iteration"' in page
    assert 'alt="Figure 1 of section “Not saved”"' in page
    assert "No description has been provided" not in page


def test_render_rebuilds_a_report_from_its_executed_copy_with_its_caption(tmp_path):
    committed = ROOT / "results" / "tiny" / "efficiency"
    if not (committed / "status.json").is_file():
        pytest.skip("no committed efficiency results")
    shutil.copytree(committed, tmp_path / "tiny" / "efficiency")
    report_path = runner.rerender("efficiency", "tiny", results=tmp_path)
    status = json.loads((committed / "status.json").read_text())
    caption = f"profile tiny · {status['finished'].replace('T', ' ')[:16]} · {status['seconds'] / 60:.1f} min"
    assert caption in report_path.read_text()
    with pytest.raises(runner.ParameterError, match=r"missing .*status\.json"):
        (tmp_path / "tiny" / "efficiency" / "status.json").unlink()
        runner.rerender("efficiency", "tiny", results=tmp_path)


def test_describe_figure_names_plots_by_their_axes_and_counts_image_panels():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from raftsuite import report

    fig, (curve, image_a, image_b) = plt.subplots(1, 3)
    curve.plot([0, 1])
    curve.set(title="seed 0", xlabel="iteration", ylabel="reward")
    for image in (image_a, image_b):
        image.imshow(np.zeros((4, 4)))
        image.set_title("kept 0.93: digit 8")
    fig.suptitle("held-out   reward\nand kept images")
    assert report.describe_figure(fig) == "held-out reward and kept images; seed 0: reward against iteration; 2 images"
    plt.close(fig)
    fig, _ = plt.subplots()
    assert report.describe_figure(fig) == ""  # no words of its own: save_figure falls back on the name
    plt.close(fig)


def test_tables_are_headed_for_a_reader_with_integer_counts_and_dashes(monkeypatch):
    import IPython.display
    import pandas as pd

    from raftsuite import report

    shown = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    frame = pd.DataFrame(
        {
            "n_seeds": [5.0, None],  # float: one count missing
            "raft_peak_rss_mib": [775.2, float("nan")],
            "time_generate_s": [1.5, 2.0],
            "paper": pd.array([pd.NA, "2.29"], dtype=object),
            "detectable_at_80pct_power": [0.4, 0.5],
        },
        index=pd.Index([0.0, 0.1], name="kl_coef"),
    )
    report.show_table(frame, "Table 7 (proxy reward)")
    html_ = shown[0].data
    headings = ["seeds", "RAFT peak RSS (MiB)", "time: generate (s)", "paper", "detectable at 80 % power", "β (KL)"]
    for heading in headings:
        assert f"<th>{heading}</th>" in html_, heading
    assert "<NA>" not in html_ and "&lt;NA&gt;" not in html_ and "None" not in html_ and "nan" not in html_
    assert "<td>5</td>" in html_ and html_.count("<td>—</td>") == 3  # the count, the memory and the paper cell
