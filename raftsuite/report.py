"""What the reports show: curves per iteration, result tables, and a sample viewer of kept against rejected.

Every model-generated string that reaches HTML goes through `html.escape`: a completion holding
`<script>` stays text (the paper's reward hacking produced odd strings; a report must not run them).
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd


def read_metrics(run_dir: str | Path) -> pd.DataFrame:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return pd.DataFrame(rows).set_index("iteration")


def plot_run_curves(metrics: pd.DataFrame, title: str = ""):
    """Four panels per iteration: rewards (all, kept, best-of-K, held-out), length, diversity, KL."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    panels = [
        (
            "reward",
            [
                ("reward_mean", "all samples"),
                ("kept_reward_mean", "kept"),
                ("best_of_k_reward_mean", "best-of-K"),
                ("eval_reward_mean", "held-out"),
            ],
        ),
        ("length (tokens)", [("sample_length_tokens", "samples"), ("eval_length_tokens", "held-out")]),
        (
            "diversity",
            [("eval_distinct_1", "distinct-1"), ("eval_distinct_2", "distinct-2"), ("eval_msttr_100", "MSTTR-100")],
        ),
        ("KL to initial model (nats)", [("eval_kl", "held-out")]),
    ]
    for ax, (label, series) in zip(axes, panels, strict=True):
        for key, name in series:
            if key in metrics and metrics[key].notna().any():
                ax.plot(metrics.index, metrics[key], marker="o", ms=3, label=name)
        ax.set_xlabel("iteration")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def sample_viewer(
    run_dirs: str | Path | Sequence[str | Path],
    gold=None,
    prompts_per_run: int = 2,
    max_rejected: int = 3,
    reward_label: str = "proxy",
) -> str:
    """HTML: for each run (a seed's), at its first, middle and last iteration, `prompts_per_run` prompts that have a
    kept sample, the kept completion beside rejected ones, each with the reward it was ranked by and, with `gold`
    (a reward callable: the tiny setting's hidden preference), the gold reward it never saw. Best first.
    `reward_label` names the ranking reward ("proxy": a reward model's; "verifier": 1 right, 0 wrong, None
    unreadable)."""
    import pyarrow.parquet as pq

    runs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    parts = []
    for run_dir in map(Path, runs):
        available = sorted(int(p.parent.name.split("_")[1]) for p in run_dir.glob("iter_*/samples.parquet"))
        iterations = sorted({available[0], available[len(available) // 2], available[-1]}) if available else []
        for iteration in iterations:
            table = pq.read_table(run_dir / f"iter_{iteration:04d}" / "samples.parquet").to_pylist()
            by_prompt: dict[int, list[dict[str, Any]]] = {}
            for row in table:
                by_prompt.setdefault(row["prompt_id"], []).append(row)
            with_kept = [p for p in sorted(by_prompt) if any(r["kept"] for r in by_prompt[p])][:prompts_per_run]
            body = []
            for prompt_id in with_kept:
                rows = sorted(by_prompt[prompt_id], key=lambda r: -_key(r["reward"]))
                shown = [r for r in rows if r["kept"]] + [r for r in rows if not r["kept"]][:max_rejected]
                golds = (
                    gold([r["prompt"] for r in shown], [r["completion"] for r in shown])
                    if gold
                    else [None] * len(shown)
                )
                cells = "".join(
                    _cell(r, "kept" if r["kept"] else "rejected", g, reward_label)
                    for r, g in zip(shown, golds, strict=True)
                )
                body.append(f"<tr><th class='text'>{html.escape(rows[0]['prompt'])}</th>{cells}</tr>")
            parts.append(
                f"<h4>{html.escape(run_dir.name)}, iteration {iteration}: kept (green) beside rejected (red), "
                f"best {reward_label} reward first</h4><table class='raft-samples'>{''.join(body)}</table>"
            )
    return f"<div>{_VIEWER_STYLE}{''.join(parts)}</div>"


# Inline, so the viewer looks the same in Jupyter and in the exported report (where JupyterLab's
# table style would right-align the text).
_VIEWER_STYLE = """<style>
table.raft-samples td, table.raft-samples th { vertical-align: top; text-align: left !important; padding: 4px 8px; max-width: 28em; }
table.raft-samples td.kept { background: #e6f4ea; }
table.raft-samples td.rejected { background: #fbeaea; }
table.raft-samples .reward { font-family: monospace; color: #555; font-size: 90%; }
table.raft-samples .text { white-space: pre-wrap; font-family: monospace; }
</style>"""


def _key(value: float | None) -> float:
    return -math.inf if value is None or not math.isfinite(value) else value


def _cell(row: dict[str, Any], kind: str, gold: float | None = None, label: str = "proxy") -> str:
    reward = "None" if row["reward"] is None else f"{row['reward']:.3f}"
    shown = f"{label} {reward}" + ("" if gold is None else f" · gold {gold:.3f}")
    return (
        f"<td class='{kind}'><div class='reward'>{kind} · {html.escape(shown)}</div>"
        f"<div class='text'>{html.escape(row['completion'])}</div></td>"
    )


def reference_row(rows: dict[str, dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame.from_dict(rows, orient="index")


def save_table(frame: pd.DataFrame, output_dir: str | Path, name: str, index: bool = True) -> Path:
    path = Path(output_dir) / f"{name}.csv"
    _counts_as_integers(frame).to_csv(path, float_format="%.4f", index=index)
    return path


def _counts_as_integers(frame: pd.DataFrame) -> pd.DataFrame:
    """Seed and sample counts as integers with a blank where there is none: a column holding one missing
    count is float in pandas, and would print "5.0000 seeds"."""
    counts = [c for c in frame.columns if c in ("seeds", "n_seeds", "n") and pd.api.types.is_numeric_dtype(frame[c])]
    return frame.astype(dict.fromkeys(counts, "Int64"))


def save_seed_table(
    rows: pd.DataFrame,
    output_dir: str | Path,
    name: str,
    metrics: Sequence[str],
    by: str | Sequence[str] = "setting",
    seed: str = "seed",
    bounds: Mapping[str, tuple[float, float]] | None = None,
) -> pd.DataFrame:
    """Write the per-seed rows as NAME_seeds.csv and their summary (`stats.summarize`: mean, ci95_low,
    ci95_high, iqm per metric, n_seeds; intervals cut to `bounds`) as NAME.csv beside it; return the summary."""
    from raftsuite import stats

    summary = stats.summarize(rows, metrics, by=by, seed=seed, bounds=bounds)
    save_table(rows, output_dir, f"{name}_seeds", index=False)
    save_table(summary, output_dir, name)
    return summary


FIGURES_FILE = "figures.json"  # NAME -> the alt text of NAME.png and the notebook cell that saved it


def save_figure(fig, output_dir: str | Path, name: str, alt: str = "") -> Path:
    """Write NAME.png and record its alt text (`alt`, or `describe_figure`) in figures.json, with a digest of
    the notebook cell saving it: the report gives the figure that cell shows the same words."""
    path = Path(output_dir) / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    figures_path = Path(output_dir) / FIGURES_FILE
    figures = json.loads(figures_path.read_text()) if figures_path.is_file() else {}
    figures[name] = {"alt": alt or describe_figure(fig) or name, "cell": _running_cell(), "saved": time.time()}
    figures_path.write_text(json.dumps(figures, indent=2) + "\n")
    return path


def describe_figure(fig) -> str:
    """A figure's alt text from its own words: its title, then each plot panel's title and what it plots
    ("y against x"), then how many image panels it holds (their per-image captions would drown the title);
    empty for a figure with no text at all."""
    parts = [fig.get_suptitle()] if fig.get_suptitle() else []
    image_panels = [ax for ax in fig.axes if ax.images and not (ax.get_xlabel() or ax.get_ylabel())]
    for ax in fig.axes:
        if ax in image_panels:
            continue
        title = " ".join(t for t in (ax.get_title("left"), ax.get_title(), ax.get_title("right")) if t)
        y, x = ax.get_ylabel(), ax.get_xlabel()
        plotted = f"{y} against {x}" if y and x else y or x
        panel = ": ".join(p for p in (title, plotted) if p)
        if panel:
            parts.append(panel)
    if len(image_panels) > 1:
        parts.append(f"{len(image_panels)} images")
    elif image_panels:
        parts.append(" ".join(image_panels[0].get_title().split()) or "an image")
    return "; ".join(" ".join(p.split()) for p in parts)


def _cell_digest(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()[:16]


def _running_cell() -> str | None:
    """A digest of the source of the IPython cell running now (None outside IPython). The source, not the
    In-number: papermill's executed copy keeps each cell's source, while the number a cell sees while it runs
    is not the one its copy shows under every ipykernel."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    result = getattr(getattr(get_ipython(), "displayhook", None), "exec_result", None)
    source = getattr(getattr(result, "info", None), "raw_cell", None)
    return None if source is None else _cell_digest(source)


def label_figures(notebook: Any, output_dir: str | Path) -> Any:
    """Alt text on every PNG a code cell shows (nbconvert's lab template writes none): the words that
    `save_figure` recorded for that cell, in the order it saved them, when the cell shows as many images as it
    saved; otherwise "Figure i of section “S”". In place; returns the notebook."""
    path = Path(output_dir) / FIGURES_FILE
    figures = json.loads(path.read_text()) if path.is_file() else {}
    by_cell: dict[str, list[str]] = {}
    for name, entry in sorted(figures.items(), key=lambda item: item[1]["saved"]):
        by_cell.setdefault(entry["cell"], []).append(f"Figure {name}.png: {entry['alt']}")
    section = "the notebook's opening"
    for cell in notebook.cells:
        if cell.get("cell_type") == "markdown":
            headings = [line.lstrip("#").strip() for line in cell["source"].splitlines() if line.startswith("#")]
            section = headings[-1] if headings else section
            continue
        images = [o for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
        saved = by_cell.get(_cell_digest(cell.get("source", "")), []) if images else []
        for number, output in enumerate(images, 1):
            alt = saved[number - 1] if len(saved) == len(images) else f"Figure {number} of section “{section}”"
            output.setdefault("metadata", {}).setdefault("image/png", {}).setdefault("alt", alt)
    return notebook


def write_headline(output_dir: str | Path, title: str, numbers: dict[str, Any], note: str = "") -> dict[str, str]:
    """The numbers the report opens with and results/index.html links to; returns them as text, by label.

    A number is a plain value (float, int, str) or a number with its interval: a `stats.Interval` (stored with
    its n and kind) or a (mean, low, high) triple, shown "0.450 [0.400, 0.510]".
    """
    stored = {k: _headline_value(k, v) for k, v in numbers.items()}
    (Path(output_dir) / "headline.json").write_text(
        json.dumps({"title": title, "numbers": stored, "note": note}, indent=2) + "\n"
    )
    return {k: format_headline_value(v) for k, v in stored.items()}


def _headline_value(label: str, value: Any) -> Any:
    from raftsuite.stats import Interval

    if isinstance(value, Interval):
        low, high = (None if math.isnan(v) else v for v in (value.low, value.high))
        return {"mean": value.mean, "ci95_low": low, "ci95_high": high, "n": value.n, "interval": value.label}
    if isinstance(value, (tuple, list)):
        if len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
            raise ValueError(f"headline {label!r}: an interval is (mean, low, high), got {value!r}")
        mean, low, high = (float(v) for v in value)
        return {
            "mean": mean,
            "ci95_low": None if math.isnan(low) else low,
            "ci95_high": None if math.isnan(high) else high,
        }
    return value


def format_headline_value(value: Any) -> str:
    """How the index shows a headline number: floats with 3 decimals, intervals as '0.450 [0.400, 0.510]'."""
    from raftsuite.stats import format_interval

    if isinstance(value, dict) and "mean" in value:
        low, high = value.get("ci95_low"), value.get("ci95_high")
        text = format_interval(value["mean"], math.nan if low is None else low, math.nan if high is None else high)
        return text + (f" ({value['interval']})" if value.get("interval") else "")
    return f"{value:.3f}" if isinstance(value, float) else str(value)


STAGES_FILE = "stages.json"


@contextmanager
def stage(name: str, output_dir: str | Path) -> Iterator[None]:
    """Time one stage of a notebook (`with report.stage("RAFT", output_dir): ...`) into OUTPUT_DIR/stages.json,
    which the runner shows as wall time per stage in the report header. A stage run again (a re-executed
    cell) replaces its entry; a stage that raised is recorded with "failed": true, and the error goes on."""
    started, began = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S")
    failed = True
    try:
        yield
        failed = False
    finally:
        record = {"seconds": round(time.perf_counter() - started, 3), "started": began, "failed": failed}
        path = Path(output_dir) / STAGES_FILE
        stages = read_stages(output_dir)
        stages.pop(name, None)  # re-run: move to the end, in the order stages last ran
        stages[name] = record
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(stages, indent=2) + "\n")
        os.replace(tmp, path)  # a kill mid-write leaves the old file, not half a JSON


def read_stages(output_dir: str | Path) -> dict[str, dict[str, Any]]:
    """{stage name: {"seconds", "started", "failed"}} in the order they ran; {} when no stage was timed."""
    path = Path(output_dir) / STAGES_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


# ---- run logs out of the way -------------------------------------------------------------------------

_ERROR_LINE = re.compile(r"Traceback \(most recent call last\)|\b(ERROR|CRITICAL)\b|\b\w+Error: ")
_WARNING_LINE = re.compile(r"\bWARNING\b|\b\w+Warning: ")


def _terminal_text(text: str) -> str:
    """What a terminal would show: each line after its last carriage return (tqdm redraws with \\r)."""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def _log_block(text: str) -> dict[str, Any]:
    lines = [line for line in _terminal_text(text).splitlines() if line.strip()]
    errors = sum(bool(_ERROR_LINE.search(line)) for line in lines)
    warnings = sum(bool(_WARNING_LINE.search(line)) for line in lines)
    counts = [f"{len(lines)} line{'s' * (len(lines) != 1)}"]
    counts += [f"{errors} error{'s' * (errors != 1)}"] if errors else []
    counts += [f"{warnings} warning{'s' * (warnings != 1)}"] if warnings else []
    summary = f"log (stderr) · {' · '.join(counts)}"
    # Errors stay in view: a block holding one opens by itself; the rest wait for a click.
    state = " open" if errors else ""
    kind = "raft-log raft-log-error" if errors else "raft-log"
    page = (
        f"<details class='{kind}'{state}><summary>{html.escape(summary)}</summary>"
        f"<pre>{html.escape(chr(10).join(lines))}</pre></details>"
    )
    return {"output_type": "display_data", "metadata": {}, "data": {"text/html": page, "text/plain": summary}}


def collapse_logs(notebook: Any) -> Any:
    """Replace each run of consecutive stderr stream outputs of a cell (log lines, progress bars, warnings)
    by one collapsed <details> block; tracebacks (error outputs) and stdout are left as they are.
    Works on an nbformat notebook in place and returns it."""
    import nbformat

    for cell in notebook.cells:
        if cell.get("cell_type") != "code":
            continue
        outputs, run = [], []
        for output in [*cell.get("outputs", []), None]:
            if output is not None and output.get("output_type") == "stream" and output.get("name") == "stderr":
                run.append(output["text"])
                continue
            if run:
                outputs.append(nbformat.from_dict(_log_block("".join(run))))
                run = []
            if output is not None:
                outputs.append(output)
        cell["outputs"] = outputs
    return notebook


_TABLE_ROW = re.compile(r"<tr[ >]")
_RELATIVE_LINK = re.compile(r"\]\((\.\./)")


def fold_long_tables(notebook: Any, rows: int = 15) -> Any:
    """Put each HTML table output of more than `rows` rows into a closed <details> block (its title stays in
    view), so long tables do not push the figures down the page. In place; returns the notebook."""
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            page = output.get("data", {}).get("text/html")
            if page is None or "<table" not in page or "raft-samples" in page or "raft-log" in page:
                continue
            page = "".join(page) if isinstance(page, list) else page
            count = len(_TABLE_ROW.findall(page))
            if count > rows:
                title, _, table = page.partition("<table")
                output["data"]["text/html"] = (
                    f"{title}<details class='raft-table'><summary>show the table ({count - 1} "
                    f"rows)</summary><table{table}</details>"
                )
    return notebook


def relink_for_report(notebook: Any, depth: int = 2) -> Any:
    """Markdown links written for the notebook's folder (notebooks/: `../docs/x.md`) rewritten for the report's
    (results/PROFILE/NAME/: `depth` more levels down), so they resolve from where the report is read."""
    prefix = "../" * depth
    for cell in notebook.cells:
        if cell.get("cell_type") == "markdown":
            cell["source"] = _RELATIVE_LINK.sub(lambda m: f"]({prefix}{m.group(1)}", cell["source"])
    return notebook


def headline_html(output_dir: str | Path) -> str:
    """The report's headline (headline.json) as the block the report opens with; empty when there is none."""
    path = Path(output_dir) / "headline.json"
    if not path.is_file():
        return ""
    headline = json.loads(path.read_text())
    items = "".join(
        f"<li><b>{html.escape(str(k))}</b>: {html.escape(format_headline_value(v))}</li>"
        for k, v in headline.get("numbers", {}).items()
    )
    return (
        f"<div id='raft-headline'><h2>{html.escape(headline.get('title', 'Headline'))}</h2><ul>{items}</ul>"
        f"<p><small>{html.escape(headline.get('note', ''))}</small></p></div>"
    )


# ---- claims: every verdict a notebook draws, for its report and the results page ----------------------

CLAIMS_FILE = "claims.json"


@dataclass(frozen=True)
class Claim:
    """One verdict: what the paper claims, its number, ours with its interval, and what the interval says."""

    table: str
    """Where the paper makes it: "Table 3", "Table 5", "§5 resolution", ... (the results page sorts by it)."""
    claim: str
    """The claim in words: "RAFT above its random-selection control (gold reward)"."""
    paper: str
    """The paper's number behind it ("SFT 0.772 -> RAFT 2.294"), or "-" where the paper has none."""
    interval: Any
    """A `stats.Interval` of our change (a paired difference; a ratio)."""
    direction: str
    """The paper's direction: "up" or "down" (a ratio: "down" means below 1)."""
    primary: bool = False
    """Named in docs/statistics.md before the runs, one per paper table; Holm-adjusted across them."""
    identical: bool = False
    """The two sides are the same runs (e.g. a KL coefficient too small to change any ranking)."""

    def row(self) -> dict[str, Any]:
        from raftsuite import stats

        interval = self.interval
        word = stats.verdict(interval, self.direction, self.identical)
        detectable = stats.detectable_effect(interval) if word == stats.NOT_RESOLVED else None
        return {
            "table": self.table,
            "claim": self.claim,
            "paper": self.paper,
            "ours": stats.format_interval(interval.mean, interval.low, interval.high),
            "n": interval.n,
            "interval": interval.label,
            "verdict": word,
            "p_value": stats.p_value(interval),
            "detectable_at_80pct_power": detectable,
            "primary": self.primary,
        }


def write_claims(output_dir: str | Path, claims: Sequence[Claim]) -> pd.DataFrame:
    """Store every verdict of a notebook as OUTPUT_DIR/claims.json (the results page reads it) and return them
    as a table (a "not resolved" with the effect its seeds could have detected)."""
    rows = [claim.row() for claim in claims]
    clean = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()} for r in rows]
    (Path(output_dir) / CLAIMS_FILE).write_text(json.dumps(clean, indent=1, default=_json_number) + "\n")
    return pd.DataFrame(clean)


def _json_number(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else str(value)


def claims_markdown(claims: pd.DataFrame) -> str:
    """The claims as one readable list: verdict first, then our number and the paper's. The verdict named primary
    in docs/statistics.md says so; every other one is marked exploratory (no multiplicity control), as the
    results page says of them."""
    lines = []
    for row in claims.itertuples():
        detectable = row.detectable_at_80pct_power
        extra = (
            f"; detectable at 80 % power: {detectable:.3g}"
            if detectable is not None and detectable == detectable
            else ""
        )
        star = " (primary)" if row.primary else " (exploratory)"
        lines.append(
            f"- **{row.verdict}**{star}: {row.claim}: ours {row.ours} ({row.interval}{extra}); paper {row.paper}"
        )
    if not claims["primary"].all():
        lines.append(
            "\nExploratory verdicts carry no multiplicity control (several are drawn per table): read them as "
            "leads, not findings. The primary ones are Holm-adjusted across the paper's tables on the results page."
        )
    return "\n".join(lines)


# ---- one table formatter ------------------------------------------------------------------------------


def interval_table(summary: pd.DataFrame, metrics: Sequence[str], digits: int = 3) -> pd.DataFrame:
    """`stats.summarize` output as text cells 'mean [low, high]' (a dash where there is no value), with the
    seed count as an integer column: the one way the reports show a table with intervals."""
    from raftsuite import stats

    cells = {}
    for metric in metrics:
        cells[metric] = [
            stats.format_interval(row[metric], row[f"{metric}_ci95_low"], row[f"{metric}_ci95_high"], digits)
            for _, row in summary.iterrows()
        ]
    frame = pd.DataFrame(cells, index=summary.index)
    if "n_seeds" in summary:
        frame["seeds"] = summary["n_seeds"].astype(int)
    return frame


COLUMN_LABELS = {
    "n_seeds": "seeds",
    "detectable_at_80pct_power": "detectable at 80 % power",
    "t_interval": "95 % t-interval",
    "crossed_interval": "95 % crossed interval",
    "msttr_100": "MSTTR-100",
    "distinct_1": "distinct-1",
    "distinct_2": "distinct-2",
    "start_sample_distinct_2": "distinct-2 of the first samples",
    "pass_at_1": "pass@1",
    "pass_at_n": "pass@n",
    "eval_kl": "KL to SFT",
    "kl_coef": "β (KL)",
    "temperature": "λ (temperature)",
    "tokens_per_s": "tokens/s",
    "start_best_of_k": "best-of-K at the start",
    "ratio_to_hf": "ratio to HF generate",
    "paper_change": "paper's change",
    "paper_direction": "paper's direction",
    "perplexity_over_sft": "perplexity / SFT's",
    "kept_overlap_with_beta0": "kept overlap with β = 0",
    "frechet_distance": "Fréchet distance",
    "p_prompted_digit": "p(prompted digit)",
}
"""How `show_table` heads a column (the CSV files keep the names); others by `column_label`'s rule."""


def column_label(name: object) -> object:
    """A column's heading for a reader: `COLUMN_LABELS`, else units from the suffix (`_s` seconds, `_mib` MiB,
    `_ci95_low/high` the interval's ends) and spaces for underscores. Non-text names pass through."""
    if not isinstance(name, str):
        return name
    if name in COLUMN_LABELS:
        return COLUMN_LABELS[name]
    for suffix, words in (("_ci95_low", ", 95 % low"), ("_ci95_high", ", 95 % high"), ("_iqm", ", IQM")):
        if name.endswith(suffix):
            return f"{column_label(name.removesuffix(suffix))}{words}"
    for suffix, unit in (("_s", "s"), ("_mib", "MiB"), ("_minutes", "min")):
        if name.endswith(suffix) and len(name) > len(suffix):
            return f"{column_label(name.removesuffix(suffix))} ({unit})"
    if name.startswith("time_"):
        return f"time: {name.removeprefix('time_')}"
    return " ".join(_ACRONYMS.get(word, word) for word in name.split("_"))


_ACRONYMS = {"rss": "RSS", "kl": "KL", "hf": "HF", "grpo": "GRPO", "raft": "RAFT", "sft": "SFT", "iqm": "IQM"}


def show_table(frame: pd.DataFrame, title: str, note: str = "") -> None:
    """Display a table under a bold title (with its unit) and an optional note: columns headed for a reader
    (`column_label`), integer counts, and a dash for anything missing."""
    from IPython.display import HTML, display

    shown = _counts_as_integers(frame)
    for column in shown.columns:  # pandas prints a missing Int64 or object value as "<NA>", not na_rep
        if isinstance(shown[column].dtype, pd.api.extensions.ExtensionDtype) or shown[column].dtype == object:
            shown[column] = shown[column].astype(object).where(shown[column].notna(), math.nan)
    shown = shown.rename(columns=column_label)
    shown.index = shown.index.set_names([column_label(n) for n in shown.index.names])
    body = shown.to_html(na_rep="—", float_format=lambda v: f"{v:.3f}", escape=True)
    caption = f"<p><b>{html.escape(title)}</b>" + (f"<br><small>{html.escape(note)}</small>" if note else "") + "</p>"
    display(HTML(caption + body))
