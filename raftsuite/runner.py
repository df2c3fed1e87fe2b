"""Run the experiment notebooks headlessly with papermill and publish self-contained HTML reports.

    python -m raftsuite.runner run hh_rlhf --profile tiny [-p key=value ...]
    python -m raftsuite.runner all --profile tiny        # every notebook; goes on after a failure
    python -m raftsuite.runner all --profile tiny --jobs 2 --threads 1   # two notebooks at a time, 1 thread each
    python -m raftsuite.runner index                      # rebuild results/index.html
    python -m raftsuite.runner render [hh_rlhf ...]       # re-render reports from their executed copies
    python -m raftsuite.runner check --profile paper      # validate a profile without running it

A profile (notebooks/profiles.yaml) is a set of parameter values per notebook. Each run writes, under
results/<profile>/<notebook>/: the executed notebook, report.html (opens offline: no CDN script), the
tables and figures the notebook saved, headline.json (the numbers the index shows) and status.json.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
PROFILES = NOTEBOOKS / "profiles.yaml"
RESULTS = ROOT / "results"
TEMPLATES = Path(__file__).resolve().parent / "templates"
SHARED_WORK = (("hh_rlhf", "efficiency", "ablations"),)
"""Notebooks that share a profile's work directory (the HH setup, the method runs): with several jobs they run in
one lane, in this order, so that a later one reuses what an earlier one built instead of racing it."""
INJECTED = ("profile", "run_by", "output_dir", "work_dir", "show_progress")
"""Parameters the runner sets itself: the profile's name, that the runner runs it (so `raftsuite.notebook.start`
applies no profile of its own), where results and runs go, no progress bars."""


class ParameterError(ValueError):
    """A profile names an unknown notebook or parameter, or a value of the wrong type."""


@dataclass(frozen=True)
class Outcome:
    notebook: str
    ok: bool
    seconds: float
    report: Path
    error: str | None = None


def notebook_names() -> list[str]:
    return sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))


def notebook_parameters(name: str) -> dict[str, Any]:
    """The notebook's parameters as {name: default value}: its cell tagged `parameters` (papermill injects its
    overrides right after it) and any cells tagged `parameters-...` before it (the rarely edited ones), all plain
    literals (`a = 1`, or `a, b = 1, 2`)."""
    import nbformat

    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    tags = [c.get("metadata", {}).get("tags", []) for c in notebook.cells]
    main = [i for i, t in enumerate(tags) if "parameters" in t]
    if len(main) != 1:
        raise ParameterError(
            f"notebooks/{name}.ipynb: expected exactly one cell tagged 'parameters', found {len(main)}"
        )
    more = [i for i, t in enumerate(tags) if any(tag.startswith("parameters-") for tag in t)]
    if any(i > main[0] for i in more):
        raise ParameterError(
            f"notebooks/{name}.ipynb: a 'parameters-...' cell after the 'parameters' cell would "
            "overwrite what papermill injects; move it before"
        )
    values: dict[str, Any] = {}
    for index in [*more, main[0]]:
        for node in ast.parse(notebook.cells[index].source).body:
            values |= _literal_assignments(node)
    return values


def _literal_assignments(node: ast.stmt) -> dict[str, Any]:
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
        return {node.target.id: ast.literal_eval(node.value)}
    if not isinstance(node, ast.Assign) or len(node.targets) != 1:
        return {}
    target, value = node.targets[0], ast.literal_eval(node.value)
    if isinstance(target, ast.Name):
        return {target.id: value}
    if isinstance(target, ast.Tuple) and all(isinstance(e, ast.Name) for e in target.elts):
        return dict(zip((e.id for e in target.elts), value, strict=True))
    return {}


def use_root(root: Path) -> None:
    """Read notebooks, profiles and results of the checkout at `root` (a kernel started in another checkout that
    shares this environment: `raftsuite.notebook.start` calls this with the root it found)."""
    global ROOT, NOTEBOOKS, PROFILES, RESULTS
    ROOT = Path(root).resolve()
    NOTEBOOKS = ROOT / "notebooks"
    PROFILES = NOTEBOOKS / "profiles.yaml"
    RESULTS = ROOT / "results"


def load_profile(profile: str) -> dict[str, dict[str, Any]]:
    from raftlib.sections import load_yaml  # `2e-4` is a number, as in a raftlib config

    # Top-level keys starting with "_" hold YAML anchors that profiles merge (`<<: *name`), not profiles.
    profiles = {
        name: entry
        for name, entry in (load_yaml(PROFILES.read_text(encoding="utf-8")) or {}).items()
        if not name.startswith("_")
    }
    if profile not in profiles or profile.startswith("_"):
        raise ParameterError(f"{PROFILES.relative_to(ROOT)}: no profile {profile!r} (profiles: {', '.join(profiles)})")
    return profiles[profile] or {}


def _type_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def check_parameters(name: str, values: dict[str, Any], source: str) -> dict[str, Any]:
    """Every key must be a parameter of the notebook, every value of its default's type."""
    defaults = notebook_parameters(name)
    for key, value in values.items():
        if key not in defaults:
            raise ParameterError(
                f"{source}: notebook {name!r} has no parameter {key!r} (parameters: {', '.join(sorted(defaults))})"
            )
        if not _type_ok(defaults[key], value):
            raise ParameterError(
                f"{source}: {name}.{key} = {value!r} is {type(value).__name__}; "
                f"the notebook's default {defaults[key]!r} is {type(defaults[key]).__name__}"
            )
    return values


def parse_cli_parameters(pairs: list[str]) -> dict[str, Any]:
    from raftlib.sections import load_yaml

    values = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise ParameterError(f"-p {pair!r}: expected key=value")
        values[key.strip()] = load_yaml(text)
    return values


def run_notebook(
    name: str,
    profile: str,
    extra: dict[str, Any] | None = None,
    results: Path | None = None,
    runs: Path | None = None,
    progress: bool = False,
    bar_position: int = 0,
) -> Outcome:
    """Execute one notebook with a profile's parameters; always render the report, even of a failure.

    progress: show a bar per notebook on stderr naming the cell that runs (off by default: tests stay quiet);
    bar_position: its terminal row, when several lanes draw bars at once.
    """
    import papermill

    from raftsuite import header as run_header
    from raftsuite.report import read_stages

    results = results or RESULTS
    runs = runs or ROOT / "runs"

    if name not in notebook_names():
        raise ParameterError(f"no notebook notebooks/{name}.ipynb (notebooks: {', '.join(notebook_names())})")
    values = check_parameters(name, dict(load_profile(profile).get(name, {})), f"profile {profile!r}")
    values |= check_parameters(name, extra or {}, "command line")
    out_dir = results / profile / name
    out_dir.mkdir(parents=True, exist_ok=True)
    # The previous run's files go first: a table or figure this version no longer writes must not sit beside the
    # new ones as if it were current (subfolders, which no notebook writes, are left alone).
    for stale in out_dir.iterdir():
        if stale.is_file() or stale.is_symlink():
            stale.unlink()
    work_dir = runs / profile / name
    values |= {
        "profile": profile,
        "run_by": "runner",
        "output_dir": str(out_dir.relative_to(ROOT) if out_dir.is_relative_to(ROOT) else out_dir),
        "work_dir": str(work_dir.relative_to(ROOT) if work_dir.is_relative_to(ROOT) else work_dir),
        "show_progress": False,
    }
    # Before the run: the dirty flag describes the code that runs, not the results it is about to write.
    # Every parameter the notebook runs with: its defaults, then the profile's and the command line's values.
    header = run_header.collect(ROOT, profile, notebook_parameters(name) | values)
    executed = out_dir / f"{name}.ipynb"
    # The kernel is "python3" of the interpreter running this: put it first on PATH so a kernelspec
    # that says plain `python` finds this environment, not the system's.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    started = time.perf_counter()
    error = None
    papermill_log = logging.getLogger("papermill")
    papermill_log.addFilter(_known_parameters_only)
    try:
        papermill.execute_notebook(
            str(NOTEBOOKS / f"{name}.ipynb"),
            str(executed),
            parameters=values,
            kernel_name="python3",
            cwd=str(ROOT),
            progress_bar={"desc": name, "leave": True, "position": bar_position} if progress else False,
            log_output=False,
            engine_name=_register_progress_engine(),
        )
    except papermill.PapermillExecutionError as exc:
        # Name the cell the way a reader of the executed copy finds it: its In [n] and its first line
        # (papermill's cell index counts cells it injects, so it matches neither the source nor the copy).
        first_line = next((line for line in exc.source.splitlines() if line.strip()), "")
        error = f"cell In [{exc.exec_count}] `{first_line.strip()[:80]}` raised {exc.ename}: {exc.evalue}"
    finally:
        papermill_log.removeFilter(_known_parameters_only)
    seconds = time.perf_counter() - started
    report = out_dir / "report.html"
    header |= {"stages": read_stages(out_dir), "wall_seconds": seconds}
    (out_dir / "header.json").write_text(json.dumps(header, indent=2, default=str) + "\n")
    status = {
        "ok": error is None,
        "error": error,
        "seconds": seconds,
        "profile": profile,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    render_report(executed, report, _caption(status), header)
    (out_dir / "status.json").write_text(json.dumps(status, indent=2) + "\n")
    return Outcome(name, error is None, seconds, report, error)


def _caption(status: dict[str, Any]) -> str:
    """The report toolbar's line: profile, when the run finished, how long it took."""
    finished = status["finished"].replace("T", " ")[:16]
    return f"profile {status['profile']} · {finished} · {status['seconds'] / 60:.1f} min"


def rerender(name: str, profile: str, results: Path | None = None) -> Path:
    """Render results/PROFILE/NAME/report.html again from the executed copy and the run's header.json and
    status.json, without running anything: for a change of the report's template or its post-processing."""
    out_dir = (results or RESULTS) / profile / name
    executed, header_file, status_file = out_dir / f"{name}.ipynb", out_dir / "header.json", out_dir / "status.json"
    missing = [str(p) for p in (executed, header_file, status_file) if not p.is_file()]
    if missing:
        raise ParameterError(f"cannot render {name!r} of profile {profile!r}: missing {', '.join(missing)}")
    report = out_dir / "report.html"
    render_report(executed, report, _caption(json.loads(status_file.read_text())), json.loads(header_file.read_text()))
    return report


def _known_parameters_only(record: logging.LogRecord) -> bool:
    """Drop papermill's "Passed unknown parameter" warning: papermill reads only the cell tagged `parameters`,
    while check_parameters has already validated every value against that cell and the `parameters-*` ones."""
    return not record.getMessage().startswith("Passed unknown parameter")


def render_report(executed: Path, report: Path, caption: str = "", header: dict[str, Any] | None = None) -> None:
    """HTML with images embedded and no external script: it opens from a USB stick with no network.

    The run's header (`raftsuite.header`) opens the page; stderr (log lines, progress bars, warnings) is
    folded into closed blocks by `report.collapse_logs` (a block holding an error opens by itself).
    """
    import nbformat
    from nbconvert import HTMLExporter

    from raftsuite import header as run_header
    from raftsuite.report import collapse_logs, fold_long_tables, headline_html, label_figures, relink_for_report

    exporter = HTMLExporter(template_name="report", extra_template_basedirs=[str(TEMPLATES)], embed_images=True)
    notebook = relink_for_report(fold_long_tables(collapse_logs(nbformat.read(executed, as_version=4))))
    label_figures(notebook, executed.parent)
    resources = {
        "raft_caption": caption,
        "raft_header_html": run_header.to_html(header) if header else "",
        "raft_headline_html": headline_html(executed.parent),
    }
    body, _ = exporter.from_notebook_node(notebook, resources=resources)
    report.write_text(body, encoding="utf-8")


def _describe_cell(name: str, notebook: Any, cell: Any) -> str:
    """The progress bar's label while a cell runs: the notebook, the cell's In-number among code cells and
    its first line of code ("hh_rlhf cell 7/21: result = raftlib.run(config)")."""
    if cell.cell_type != "code":  # papermill walks markdown cells too: show the section being entered
        first = next((line.strip("# ").strip() for line in cell.source.splitlines() if line.strip()), "")
        return f"{name} § {first[:48]}"
    code = [c for c in notebook.cells if c.cell_type == "code"]
    number = next((i for i, c in enumerate(code, 1) if c is cell), 0)
    first = next((line.strip() for line in cell.source.splitlines() if line.strip() and not line.startswith("#")), "")
    return f"{name} cell {number}/{len(code)}: {first[:48]}"


def _register_progress_engine() -> str:
    """papermill's own engine, with its progress bar labelled by the running cell (papermill labels a cell
    only when its source holds a `papermill_description=` comment). Engines are papermill's plug-in point."""
    from papermill.engines import Engine, NBClientEngine, papermill_engines

    class RaftsuiteEngine(Engine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
            name = Path(nb_man.output_path).stem if nb_man.output_path else "notebook"
            nb_man.get_cell_description = lambda cell, **_: _describe_cell(name, nb_man.nb, cell)
            return NBClientEngine.execute_managed_notebook(nb_man, kernel_name, **kwargs)

    papermill_engines.register("raftsuite", RaftsuiteEngine)
    return "raftsuite"


def lanes(names: list[str], jobs: int, results: Path | None = None) -> list[list[str]]:
    """Split notebooks into at most `jobs` lanes that run side by side, each in order.

    Notebooks sharing work (`SHARED_WORK`) stay in one lane; groups go to the lane with the least expected time,
    longest first, the expected time being a notebook's longest recorded wall time (10 min when it has none).
    """
    results = results or RESULTS
    groups = [[n for n in group if n in names] for group in SHARED_WORK]
    groups = [g for g in groups if g] + [[n] for n in names if not any(n in group for group in SHARED_WORK)]

    def expected(name: str) -> float:
        found = [json.loads(p.read_text()).get("seconds", 600.0) for p in results.glob(f"*/{name}/status.json")]
        return max(found, default=600.0)

    loads: list[tuple[float, list[str]]] = [(0.0, []) for _ in range(max(1, min(jobs, len(groups))))]
    for group in sorted(groups, key=lambda g: -sum(expected(n) for n in g)):
        index = min(range(len(loads)), key=lambda i: loads[i][0])
        loads[index] = (loads[index][0] + sum(expected(n) for n in group), loads[index][1] + group)
    return [lane for _, lane in loads if lane]


def run_lanes(
    lanes_: list[list[str]], profile: str, parameters: list[str], threads: int | None, progress: bool
) -> list[str]:
    """Each lane in its own `runner run` process (its notebooks in order), all lanes at once; the failed notebooks.

    `threads` sets OMP_NUM_THREADS and MKL_NUM_THREADS of every kernel: CPU results depend on the thread count
    (a reduction splits differently), so a profile's committed numbers name the count they were made with.
    """
    import subprocess

    env = os.environ.copy()
    if threads:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    for lane in lanes_:  # a lane that dies early must not leave an older run's "ok" behind
        for name in lane:
            (RESULTS / profile / name / "status.json").unlink(missing_ok=True)
    children = []
    for position, lane in enumerate(lanes_):
        command = [sys.executable, "-m", "raftsuite.runner", "run", *lane, "--profile", profile]
        command += [f"--parameter={p}" for p in parameters]
        command += ["--progress", f"--bar-position={position}"] if progress else ["--no-progress"]
        logger.info("lane %d: %s", position + 1, ", ".join(lane))
        children.append((lane, subprocess.Popen(command, env=env, cwd=ROOT)))
    failed = []
    for lane, child in children:
        child.wait()
        failed += [n for n in lane if not _status(profile, n).get("ok", False)]
    return failed


def _status(profile: str, name: str) -> dict[str, Any]:
    path = RESULTS / profile / name / "status.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _check_plan(profile: str) -> int:
    """A GPU profile (gpu, paper): print every planned stage of every notebook, and refuse (exit 3) when one
    clearly cannot fit, naming the notebook parameter to change (`raftsuite.profile_plan`)."""
    from raftsuite import profile_plan

    if profile not in profile_plan.HARDWARE:
        return 0
    rows = profile_plan.plan_profile(profile)
    print(f"\nplanned stages of profile {profile!r} (estimates; raftsuite.profile_plan, docs/profiles.md):\n")
    print(profile_plan.table(rows))
    too_big = [r for r in rows if r.clearly_too_big]
    for r in too_big:
        print(
            f"error: {r.notebook}: {r.stage} needs about {r.memory_gib:.0f} GiB per GPU of {r.gpu_gib:.0f}: "
            f"change {r.change}",
            file=sys.stderr,
        )
    refused = profile_plan.refusals(profile)
    for message in refused:
        print(f"error: {message}", file=sys.stderr)
    return 3 if too_big or refused else 0


def write_index(results: Path | None = None) -> Path:
    """results/index.html: the claim table of every profile (`raftsuite.index`)."""
    from raftsuite import index

    return index.write_index(results or RESULTS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raftsuite.runner", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for command in ("run", "all", "check"):
        sub = commands.add_parser(command)
        if command == "run":
            sub.add_argument("notebooks", nargs="+")
        sub.add_argument("--profile", default="tiny")
        sub.add_argument("-p", "--parameter", action="append", default=[], help="key=value (YAML value)")
        if command != "check":
            sub.add_argument(
                "--progress",
                action=argparse.BooleanOptionalAction,
                default=None,
                help="a bar per notebook naming the running cell (default: on when stderr is a terminal)",
            )
            sub.add_argument("--bar-position", type=int, default=0, help=argparse.SUPPRESS)
            sub.add_argument("--threads", type=int, help="OMP/MKL threads of every kernel (default: unchanged)")
        if command == "all":
            sub.add_argument("--jobs", type=int, default=1, help="notebooks run side by side (lanes; default 1)")
    commands.add_parser("index")
    render = commands.add_parser("render", help="render reports again from their executed copies (runs nothing)")
    render.add_argument("notebooks", nargs="*", help="default: every notebook with results in the profile")
    render.add_argument("--profile", default="tiny")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    if args.command == "index":
        print(write_index())
        return 0
    if args.command == "render":
        names = args.notebooks or [n for n in notebook_names() if (RESULTS / args.profile / n).is_dir()]
        try:
            for name in names:
                print(rerender(name, args.profile))
        except ParameterError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(write_index())
        return 0
    try:
        extra = parse_cli_parameters(args.parameter)
        if args.command == "check":
            profile = load_profile(args.profile)
            for name, values in profile.items():
                if name not in notebook_names():
                    raise ParameterError(f"profile {args.profile!r}: no notebook {name!r}")
                check_parameters(name, values, f"profile {args.profile!r}")
            print(f"profile {args.profile!r}: {len(profile)} notebooks, parameters valid")
            return _check_plan(args.profile)
        profile_notebooks = load_profile(args.profile)
        names = args.notebooks if args.command == "run" else [n for n in notebook_names() if n in profile_notebooks]
        for name in names:
            if name not in profile_notebooks:
                raise ParameterError(
                    f"profile {args.profile!r} in {PROFILES.relative_to(ROOT)} has no entry for notebook {name!r}"
                )
        if getattr(args, "threads", None):  # every kernel started from here (and its children) inherits it
            os.environ |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        if args.command == "all" and args.jobs > 1:
            progress = sys.stderr.isatty() if args.progress is None else args.progress
            failed = run_lanes(lanes(names, args.jobs), args.profile, args.parameter, args.threads, progress)
            write_index()
            if failed:
                print(f"error: {len(failed)} of {len(names)} notebooks failed: {', '.join(failed)}", file=sys.stderr)
                return 1
            return 0
        outcomes = []
        for name in names:
            logger.info("running notebooks/%s.ipynb (profile %s)", name, args.profile)
            progress = sys.stderr.isatty() if args.progress is None else args.progress
            outcome = run_notebook(name, args.profile, extra, progress=progress, bar_position=args.bar_position)
            outcomes.append(outcome)
            if outcome.ok:
                logger.info("%s: done in %.1f min -> %s", name, outcome.seconds / 60, outcome.report)
            else:
                logger.error(
                    "%s FAILED: %s\n  partial executed notebook and report in %s",
                    name,
                    outcome.error,
                    outcome.report.parent,
                )
        write_index()
    except ParameterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = [o.notebook for o in outcomes if not o.ok]
    if failed:
        print(f"error: {len(failed)} of {len(outcomes)} notebooks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
