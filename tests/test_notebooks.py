"""The notebooks: committed clean, profiles valid, every notebook runs under papermill, reports open offline."""

import ast
import dataclasses
import html
import json
import os
import re
import shutil
from pathlib import Path

import nbformat
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raftsuite import runner

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
HUB_ID = re.compile(r"""["']([A-Za-z0-9][\w.-]*/[\w.-]+)["']""")
LOCAL_PREFIXES = ("notebooks/", "runs/", "results/", "assets/", "raftsuite.", "./")


HH_NOTEBOOKS = ("hh_rlhf", "ablations", "efficiency")


def test_there_are_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= {"hh_rlhf", "ablations", "sd_resolution", "sd_alignment", "efficiency"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs_and_one_parameters_cell(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name} has outputs: strip them"
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for cell in notebook.cells:
        if cell.cell_type == "code":
            ast.parse(cell.source)  # a syntax error should fail here, not 7 minutes into a run
    assert set(runner.INJECTED) <= set(runner.notebook_parameters(path.stem))


@pytest.mark.parametrize("profile", ["tiny", "smoke", "paper", "gpu", "dryrun"])
def test_profiles_are_valid(profile):
    for name, values in runner.load_profile(profile).items():
        runner.check_parameters(name, values, f"profile {profile}")


def _values(profile: str, name: str) -> dict:
    return runner.notebook_parameters(name) | runner.load_profile(profile).get(name, {})


@pytest.mark.parametrize("profile", ["tiny", "smoke", "dryrun", "gpu", "paper"])
def test_the_text_notebooks_share_one_setup(profile):
    """One SFT model, reward model and prompt split per profile: equal SetupRequests (what its cache is keyed on)."""
    from raftsuite.hh_setup import SetupRequest

    requests = {name: SetupRequest.from_parameters(_values(profile, name)) for name in HH_NOTEBOOKS}
    assert requests["ablations"] == requests["hh_rlhf"] == requests["efficiency"], requests


@pytest.mark.parametrize("profile", ["tiny", "smoke", "paper"])
def test_efficiency_reuses_hh_rlhf_method_runs(profile):
    """Equal MethodSettings values: efficiency reads hh_rlhf's RAFT and GRPO runs from one cache directory."""
    from raftsuite.hh_methods import MethodSettings

    names = {f.name for f in dataclasses.fields(MethodSettings)}
    shared = {name: {k: v for k, v in _values(profile, name).items() if k in names} for name in HH_NOTEBOOKS[::2]}
    assert shared["hh_rlhf"] == shared["efficiency"]


@pytest.mark.parametrize("profile", ["dryrun", "gpu", "paper"])
def test_every_notebook_has_an_hh_entry(profile):
    entries = runner.load_profile(profile)
    assert set(entries) == {p.stem for p in NOTEBOOKS}
    assert _values(profile, "hh_rlhf")["dataset"], f"{profile}: the text notebooks run on HH-RLHF"
    if profile == "dryrun":  # every code path of the paper profile: 2 processes, LoRA
        for name in ("hh_rlhf", "ablations", "efficiency"):
            assert entries[name]["num_processes"] == 2 and entries[name]["lora_rank"] > 0


def test_paper_ablations_are_the_papers_tables_5_to_7():
    paper = runner.load_profile("paper")["ablations"]
    assert (paper["k_values"], paper["k_sweep_temperature"]) == ([8, 16, 32], 0.85)
    assert (paper["temperatures"], paper["temperature_sweep_k"]) == ([0.7, 0.85, 1.0], 8)
    assert (paper["kl_coefs"], paper["kl_sweep_k"], paper["kl_sweep_temperature"]) == ([0.0, 0.005, 0.01, 0.1], 8, 1.0)


def test_paper_profile_names_every_hub_id_as_a_parameter():
    for name in ("hh_rlhf", "ablations", "efficiency"):
        paper = runner.load_profile("paper")[name]
        for key in ("policy_model", "dataset", "reward_model"):
            assert HUB_ID.fullmatch(repr(paper[key])), f"paper profile {name}.{key} should be a hub id"
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type != "code" or "parameters" in cell.metadata.get("tags", []):
                continue
            literals = [m for m in HUB_ID.findall(cell.source) if not m.startswith(LOCAL_PREFIXES)]
            assert not literals, f"{path.name}: hub id {literals} hard-coded outside the parameters cell"


def test_bad_parameters_are_named():
    with pytest.raises(
        runner.ParameterError, match=r"hh_rlhf.iterations = 'six' is str; the notebook's default 6 is int"
    ):
        runner.check_parameters("hh_rlhf", {"iterations": "six"}, "command line")
    with pytest.raises(runner.ParameterError, match="has no parameter 'iteration'"):
        runner.check_parameters("hh_rlhf", {"iteration": 3}, "command line")
    with pytest.raises(runner.ParameterError, match="no profile 'huge'"):
        runner.load_profile("huge")


# ---- papermill runs --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    """Both notebooks with the smoke profile, sharing one cached setup, as `make reproduce-all` runs them."""
    root = tmp_path_factory.mktemp("suite")
    outcomes = {
        name: runner.run_notebook(name, "smoke", results=root / "results", runs=root / "runs")
        for name in ("hh_rlhf", "ablations", "sd_resolution", "sd_alignment", "efficiency", "reasoning")
    }
    runner.write_index(root / "results")
    return root / "results", outcomes


@pytest.mark.parametrize("name", ["hh_rlhf", "ablations", "sd_resolution", "sd_alignment", "efficiency", "reasoning"])
def test_notebook_runs_under_papermill(smoke_results, name):
    results, outcomes = smoke_results
    assert outcomes[name].ok, outcomes[name].error
    directory = results / "smoke" / name
    assert (directory / f"{name}.ipynb").is_file() and (directory / "report.html").is_file()
    headline = json.loads((directory / "headline.json").read_text())
    assert headline["numbers"]
    assert list(directory.glob("*.png")) and list(directory.glob("*.csv"))
    page = (directory / "report.html").read_text()
    # nothing loaded from elsewhere: no remote script, stylesheet or image (links a reader clicks are fine)
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=[\"']?(https?:)?//", page)
    assert "require.js" not in page and "mathjax" not in page.lower()


def test_hh_tables_hold_every_row(smoke_results):
    import pandas as pd

    results, _ = smoke_results
    table = pd.read_csv(results / "smoke" / "hh_rlhf" / "table3_with_paper.csv", index_col=0)
    ours = [r for r in table.index if not r.startswith("paper:")]
    assert any(r.startswith("RAFT") for r in ours) and "SFT model" in ours and "SFT on random samples" in ours
    assert any(r.startswith("GRPO") for r in ours) and any(r.startswith("best-of-") for r in ours)
    assert "paper: RAFT-K32, lambda=1.0" in table.index
    assert table.loc[ours, ["proxy_reward", "gold_reward", "perplexity", "distinct_2"]].notna().all().all()


def test_reasoning_reports_four_methods_with_intervals(smoke_results):
    import pandas as pd

    results, _ = smoke_results
    directory = results / "smoke" / "reasoning"
    accuracy = pd.read_csv(directory / "curve_pass_at_1.csv")
    assert set(accuracy["method"]) == {"RAFT", "RAFT++", "GRPO", "random"}
    assert accuracy[["pass_at_1_ci95_low", "pass_at_1_ci95_high"]].notna().all().all()  # 2 smoke seeds: an interval
    problems = pd.read_parquet(directory / "problems.parquet")
    assert set(problems["method"]) == {"RAFT", "RAFT++", "GRPO", "random"} and problems["seed"].nunique() == 2
    table = pd.read_csv(directory / "table_with_paper.csv", index_col=0)
    assert table.loc["RAFT++", "paper v2 (%)"] == 56.1 and table.loc["GRPO"].notna().all()
    claims = json.loads((directory / "claims.json").read_text())
    assert sum(c["primary"] for c in claims) == 1 and all(c["n"] == 2 for c in claims)


def test_efficiency_compares_both_methods_from_one_run(smoke_results):
    import pandas as pd

    results, _ = smoke_results
    directory = results / "smoke" / "efficiency"
    table = pd.read_csv(directory / "raft_vs_grpo.csv", index_col=0)
    assert set(table.index) == {"RAFT (raftlib)", "GRPO (TRL)"}
    ratios = pd.read_csv(directory / "raft_vs_grpo_ratios_seeds.csv")
    assert {"time_ratio", "samples_ratio", "raft_censored", "grpo_censored", "area_difference_time"} <= set(ratios)
    reached = ratios["time_ratio"].gt(0) | ratios["raft_censored"] | ratios["grpo_censored"]
    assert reached.all()  # each seed's ratio is measured, or the seed is marked censored
    prompts = pd.read_parquet(directory / "raft_vs_grpo_prompts.parquet")
    assert set(prompts["method"]) == {"raft", "grpo"} and prompts["eval_reward"].notna().all()


PER_PROMPT = {
    "hh_rlhf": "table3_prompts.parquet",
    "ablations": "ablation_prompts.parquet",
    "efficiency": "raft_vs_grpo_prompts.parquet",
    "sd_resolution": "held_out_prompts.parquet",
    "sd_alignment": "held_out_prompts.parquet",
    "reasoning": "problems.parquet",
}


@pytest.mark.parametrize("name", sorted(PER_PROMPT))
def test_every_notebook_keeps_per_prompt_rows_and_its_claims(smoke_results, name):
    import pandas as pd

    results, _ = smoke_results
    directory = results / "smoke" / name
    rows = pd.read_parquet(directory / PER_PROMPT[name])
    assert len(rows) and "seed" in rows and rows["seed"].notna().all()
    claims = json.loads((directory / "claims.json").read_text())
    assert claims and all(c["verdict"] and c["interval"] and c["n"] >= 1 for c in claims)
    assert sum(c["primary"] for c in claims) >= 1  # each paper table names its primary verdict
    index = (results / "index.html").read_text()
    assert all(html.escape(c["claim"]) in index for c in claims)  # the results page lists every verdict


def test_failed_notebook_keeps_partial_copy_and_names_the_cell(tmp_path, monkeypatch):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell(
            "output_dir = ''\nwork_dir = ''\nshow_progress = True", metadata={"tags": ["parameters"]}
        ),
        nbformat.v4.new_markdown_cell("A step that works, then one that fails."),
        nbformat.v4.new_code_cell("print('first step ran')"),
        nbformat.v4.new_code_cell("raise ValueError('the reward exploded')"),
        nbformat.v4.new_code_cell("print('never')"),
    ]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, notebooks / "broken.ipynb")
    (notebooks / "profiles.yaml").write_text("smoke:\n  broken: {}\n")
    monkeypatch.setattr(runner, "NOTEBOOKS", notebooks)
    monkeypatch.setattr(runner, "PROFILES", notebooks / "profiles.yaml")
    monkeypatch.setattr(runner, "ROOT", tmp_path)
    monkeypatch.setattr(runner, "RESULTS", tmp_path / "results")
    code = runner.main(["all", "--profile", "smoke"])
    assert code == 1
    status = json.loads((tmp_path / "results" / "smoke" / "broken" / "status.json").read_text())
    assert status["ok"] is False
    assert (
        status["error"]
        == "cell In [4] `raise ValueError('the reward exploded')` raised ValueError: the reward exploded"
    )
    executed = nbformat.read(tmp_path / "results" / "smoke" / "broken" / "broken.ipynb", as_version=4)
    code = [c for c in executed.cells if c.cell_type == "code"]  # papermill adds banner cells to the copy
    assert "first step ran" in code[2].outputs[0]["text"]  # the partial copy kept what ran
    assert code[3].outputs[0]["ename"] == "ValueError" and code[4].outputs == []
    assert (tmp_path / "results" / "smoke" / "broken" / "report.html").is_file()
    assert "FAILED" in (tmp_path / "results" / "index.html").read_text()


# ---- the reports in a real browser -----------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="Debian's chromium is not installed (.ci/run installs it)"
)
EVIL = '<script>window.__raft_pwned = 1</script><img src=x onerror="window.__raft_pwned = 2">&amp;'


def open_page(path: Path):
    """Load a page in headless Chromium with the network cut; return (page facts, console errors, requests)."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "chromium is missing: .ci/run installs Debian's chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        page = browser.new_page()
        errors, requests = [], []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.route(re.compile(r"^https?://"), lambda route: route.abort())
        page.goto(path.as_uri())
        page.wait_for_load_state("load")
        facts = {
            "images": page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])"),
            "widths": page.eval_on_selector_all("img", "els => els.map(e => [e.naturalWidth, e.clientWidth])"),
            "alts": page.eval_on_selector_all("img", "els => els.map(e => e.getAttribute('alt'))"),
            "links": page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))"),
            "pwned": page.evaluate("window.__raft_pwned === undefined ? null : window.__raft_pwned"),
            "text": page.inner_text("body"),
            "code_hidden": page.evaluate("document.body.classList.contains('raft-hide-code')"),
        }
        if page.query_selector("#raft-toggle-code"):
            page.click("#raft-toggle-code")
            facts["code_hidden_after_click"] = page.evaluate("document.body.classList.contains('raft-hide-code')")
        browser.close()
    return facts, errors, requests


@needs_chromium
@pytest.mark.parametrize("name", ["hh_rlhf", "ablations", "sd_resolution", "sd_alignment", "efficiency", "reasoning"])
def test_report_opens_offline_without_errors(smoke_results, name):
    results, _ = smoke_results
    facts, errors, requests = open_page(results / "smoke" / name / "report.html")
    assert errors == []
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
    assert facts["images"] and all(complete and width > 0 for complete, width in facts["images"]), (
        "a figure did not render"
    )
    assert facts["code_hidden"] is True and facts["code_hidden_after_click"] is False
    # every figure says what it shows, in the words its figure carries (report.save_figure -> figures.json)
    assert all(alt and not alt.startswith("No description") for alt in facts["alts"]), facts["alts"]
    assert any(alt.startswith("Figure ") and ".png: " in alt for alt in facts["alts"]), facts["alts"]


def broken_links(page: Path, links: list[str], results: Path) -> list[str]:
    """The relative links of a page under `results` that resolve to nothing, read as if `results` were the
    repository's results/ folder (a link to ../../../docs/x.md must find docs/x.md in this checkout)."""
    broken = []
    for link in links:
        if link.startswith(("http:", "https:", "#", "mailto:", "data:")):
            continue
        target = (page.parent / link.split("#")[0]).resolve()
        inside = (
            target.relative_to(results.parent.resolve()) if target.is_relative_to(results.parent.resolve()) else None
        )
        if not target.exists() and (inside is None or not (ROOT / inside).exists()):
            broken.append(link)
    return broken


@needs_chromium
@pytest.mark.parametrize("name", ["hh_rlhf", "ablations", "sd_resolution", "sd_alignment", "efficiency", "reasoning"])
def test_report_links_resolve_and_figures_keep_their_size(smoke_results, name):
    results, _ = smoke_results
    page = results / "smoke" / name / "report.html"
    facts, _, _ = open_page(page)
    assert broken_links(page, facts["links"], results) == []
    assert any("docs/" in link for link in facts["links"])  # the notebooks cite docs/paper.md, docs/statistics.md
    shrunk = [(natural, shown) for natural, shown in facts["widths"] if shown < natural - 1]
    assert shrunk == [], f"figures drawn narrower than their pixels (text unreadable): {shrunk}"
    body = page.read_text()
    assert body.index('id="raft-headline"') < body.index('class="jp-Cell')  # the headline opens the report


COMMITTED = ROOT / "results"
NOTEBOOK_NAMES = ("hh_rlhf", "ablations", "sd_resolution", "sd_alignment", "efficiency", "reasoning")


@needs_chromium
@pytest.mark.parametrize("page", ["index.html", *(f"tiny/{name}/report.html" for name in NOTEBOOK_NAMES)])
def test_the_committed_pages_open_offline_with_every_link_and_figure_whole(page):
    """What a reader of the published results sees: the pages as committed, in Chromium with the network cut."""
    path = COMMITTED / page
    facts, errors, requests = open_page(path)
    assert errors == [] and [u for u in requests if not u.startswith(("file:", "data:"))] == []
    assert broken_links(path, facts["links"], COMMITTED) == []
    assert all(complete and width > 0 for complete, width in facts["images"]), "a figure did not render"
    shrunk = [(natural, shown) for natural, shown in facts["widths"] if shown < natural - 1]
    assert shrunk == [], f"figures drawn narrower than their pixels (text unreadable): {shrunk}"


@needs_chromium
def test_index_lists_reports(smoke_results):
    results, _ = smoke_results
    facts, errors, _ = open_page(results / "index.html")
    assert errors == [] and "what reproduces" in facts["text"]
    assert broken_links(results / "index.html", facts["links"], results) == []
    for verdict in ("reproduces", "opposite", "not resolved", "identical runs"):
        assert verdict in facts["text"]  # the counts on top name every kind, coloured badges
    assert "verdicts are exploratory: no multiplicity control" in facts["text"]  # the non-primaries say what they are


@needs_chromium
def test_a_completion_with_a_script_tag_stays_inert_text(tmp_path):
    """A model that learned to emit markup must not be able to run it in the report."""
    import papermill

    run = tmp_path / "run" / "iter_0001"
    run.mkdir(parents=True)
    rows = [
        {"prompt_id": 0, "prompt": "Say <b>hi</b>", "completion": EVIL, "reward": 2.0, "kept": True},
        {"prompt_id": 0, "prompt": "Say <b>hi</b>", "completion": "plain", "reward": 1.0, "kept": False},
    ]
    pq.write_table(pa.Table.from_pylist(rows), run / "samples.parquet")
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell(
            "from IPython.display import HTML, display\nfrom raftsuite import report\n"
            f"display(HTML(report.sample_viewer({str(tmp_path / 'run')!r})))"
        )
    ]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, tmp_path / "viewer.ipynb")
    papermill.execute_notebook(
        str(tmp_path / "viewer.ipynb"), str(tmp_path / "executed.ipynb"), kernel_name="python3", progress_bar=False
    )
    runner.render_report(tmp_path / "executed.ipynb", tmp_path / "report.html")
    facts, errors, _ = open_page(tmp_path / "report.html")
    assert facts["pwned"] is None, "model output ran as script"
    assert "<script>window.__raft_pwned = 1</script>" in facts["text"] and "Say <b>hi</b>" in facts["text"]
    assert errors == []


def test_a_notebook_re_executed_after_a_kill_picks_up_its_run(smoke_results, tmp_path):
    """SIGKILL papermill and its kernel mid-RAFT; executing the notebook again resumes the run in place."""
    import subprocess
    import sys
    import time

    from conftest import kill_tree

    # The suite run's cache above, with its RAFT run removed: the kill is meant for RAFT, and everything else (the
    # setup, the random control, Table 3) is read from the cache, as a re-executed notebook reads it. This test is
    # the module's last and makes again the run it removed (a resumed run equals the uninterrupted one: test_loop).
    runs, results = smoke_results[0].parent / "runs", tmp_path / "results"
    (method_runs,) = (runs / "smoke" / "method_runs").iterdir()  # hh_rlhf's and efficiency's one settings hash
    removed = sorted(method_runs.glob("raft_*"))
    assert removed, "the suite run made no RAFT run"
    for path in removed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    script = (
        "from pathlib import Path; from raftsuite import runner; "
        f"runner.run_notebook('hh_rlhf', 'smoke', {{'run_grpo_baseline': False}}, "
        f"results=Path({str(results)!r}), runs=Path({str(runs)!r}))"
    )
    first = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 600

    def in_progress():  # the RAFT run (runs/smoke/method_runs/KEY/raft_*) with iteration 1 fine-tuned, no final yet
        for done in sorted(method_runs.glob("raft_*/iter_0001/finetune.done.json")):
            if not (done.parent.parent / "final").exists():
                return done.parent.parent
        return None

    while (raft := in_progress()) is None:
        assert first.poll() is None and time.monotonic() < deadline, "the first execution ended before the kill"
        time.sleep(0.2)
    kill_tree(first, raft)  # papermill, the kernel and its RAFT child, as an OOM kill or a closed laptop would
    assert not (raft / "final").exists()
    batch = raft / "iter_0001" / "generate" / "batch_00000.parquet"
    before = batch.stat()

    outcome = runner.run_notebook("hh_rlhf", "smoke", {"run_grpo_baseline": False}, results=results, runs=runs)
    assert outcome.ok, outcome.error
    after = batch.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "iteration 1 was redone"
    assert (raft / "final" / "model.safetensors").is_file()
    executed = (results / "smoke" / "hh_rlhf" / "hh_rlhf.ipynb").read_text()
    assert "already holds this run: resuming it" in executed
    assert "reusing the setup in " + str(runs / "smoke" / "hh_setup") in executed
