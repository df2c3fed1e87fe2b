"""results/index.html: what reproduces, at a glance.

One claim table per profile in the paper's order: the table or section, the claim, the paper's number, ours with
its interval and n, and a coloured verdict; counts on top (reproduces / opposite / not resolved / identical runs),
the primary verdicts Holm-adjusted across the paper's tables (docs/statistics.md), the commit the results were
made from, and a link to each report. Read from each report folder's claims.json, headline.json, status.json and
header.json; nothing here computes a number.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any

from raftsuite import stats

TABLE_ORDER = (
    "Table 3",
    "§4 efficiency",
    "Table 5",
    "Table 6",
    "Table 7",
    "Tables 5-7: random controls",
    "§5 resolution adaptation",
    "§5 text-image alignment",
    "Reasoning: RAFT++ table",
    "Reasoning: entropy",
)
"""The paper's order (Dong et al. 2023 §4 then §5; the RAFT++ reasoning study last); unknown tables go last."""

VERDICT_CLASS = {stats.REPRODUCES: "good", stats.OPPOSITE: "bad", stats.NOT_RESOLVED: "open", stats.IDENTICAL: "same"}
NAMES = {
    stats.REPRODUCES: "reproduces",
    stats.OPPOSITE: "opposite",
    stats.NOT_RESOLVED: "not resolved",
    stats.IDENTICAL: "identical runs",
}


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def profile_claims(profile_dir: Path) -> list[dict[str, Any]]:
    """Every claim of every report of a profile, with its report's name and link, in the paper's order; the
    primaries with their Holm-adjusted p-value and verdict."""
    claims = []
    for path in sorted(profile_dir.glob("*/claims.json")):
        for claim in _read(path):
            claims.append(
                claim | {"report": path.parent.name, "link": f"{profile_dir.name}/{path.parent.name}/report.html"}
            )
    primaries = {i: c["p_value"] for i, c in enumerate(claims) if c["primary"] and c["p_value"] is not None}
    for i, adjusted in stats.holm(primaries).items():
        c = claims[i]
        c["holm_p"] = adjusted
        kept = c["verdict"] in (stats.REPRODUCES, stats.OPPOSITE) and adjusted < 1 - stats.CONFIDENCE
        c["holm_verdict"] = c["verdict"] if kept or c["verdict"] == stats.IDENTICAL else stats.NOT_RESOLVED
    rank = {name: i for i, name in enumerate(TABLE_ORDER)}
    return sorted(claims, key=lambda c: (rank.get(c["table"], len(rank)), not c["primary"]))


def _power_note(claim: dict[str, Any]) -> str:
    """'detectable at 80 % power: 0.318; the observed 0.129 would take about 28 seeds' for a "not resolved",
    else ''. The seeds: `stats.seeds_to_detect` for the observed difference at the spread behind the stored
    detectable effect (`stats.sd_from_detectable`, unrounded; on the log scale for a ratio); given only for the
    seed-level t-intervals, whose spread shrinks with seeds alone."""
    detectable = claim.get("detectable_at_80pct_power")
    if not detectable:
        return ""
    note = f"detectable at 80 % power: {detectable:.3g}"
    n = int(claim["n"])
    log = claim["interval"] == f"95 % t-interval of the log ratio, n = {n}"
    mean = re.match(r"\s*(-?[\d.]+) \[", str(claim["ours"]))
    if not (mean and (log or claim["interval"] == f"95 % t-interval, n = {n}")):
        return note
    observed = float(mean[1])
    if log and observed <= 0:
        return note
    effect = math.log(observed) if log else observed
    if effect == 0:
        return note
    seeds = stats.seeds_to_detect(effect, stats.sd_from_detectable(detectable, n, log=log))
    more = f"about {seeds}" if seeds else f"over {stats.SEEDS_LIMIT:,}"
    return note + f"; the observed {mean[1]} would take {more} seeds"


def _primary_note(claim: dict[str, Any]) -> str:
    """'primary, Holm p = 0.334: not resolved' for a primary verdict, else ''."""
    if not claim["primary"]:
        return ""
    if "holm_p" not in claim:
        return "primary"
    return f"primary, Holm p = {claim['holm_p']:.3g}: {NAMES.get(claim['holm_verdict'], '')}"


def _badge(verdict: str) -> str:
    return f"<span class='v {VERDICT_CLASS.get(verdict, 'open')}'>{html.escape(NAMES.get(verdict, verdict))}</span>"


def _counts(claims: list[dict[str, Any]]) -> str:
    def count(rows):
        return " · ".join(f"{_badge(v)} {sum(c['verdict'] == v for c in rows)}" for v in VERDICT_CLASS)

    primaries = [c for c in claims if c["primary"]]
    after = " · ".join(f"{_badge(v)} {sum(c.get('holm_verdict') == v for c in primaries)}" for v in VERDICT_CLASS)
    return (
        f"<p class='counts'><b>All {len(claims)} verdicts:</b> {count(claims)}</p>"
        f"<p class='counts'><b>{len(primaries)} primary verdicts</b> (one per paper table, named in advance in "
        f"docs/statistics.md), Holm-adjusted across them: {after}. The other {len(claims) - len(primaries)} "
        "verdicts are exploratory: no multiplicity control, read them as leads, not findings.</p>"
    )


def _claim_rows(claims: list[dict[str, Any]]) -> str:
    rows = []
    for c in claims:
        power = f"<br><small>{html.escape(_power_note(c))}</small>" if _power_note(c) else ""
        primary = f"<br><small>{html.escape(_primary_note(c))}</small>" if _primary_note(c) else ""
        rows.append(
            f"<tr class='{'primary' if c['primary'] else ''}'><td>{html.escape(c['table'])}</td>"
            f"<td>{html.escape(c['claim'])}</td><td>{html.escape(str(c['paper']))}</td>"
            f"<td class='num'>{html.escape(c['ours'])}<br><small>{html.escape(c['interval'])}</small>{power}</td>"
            f"<td>{_badge(c['verdict'])}{primary}</td>"
            f"<td><a href='{html.escape(c['link'])}'>{html.escape(c['report'])}</a></td></tr>"
        )
    return "".join(rows)


def _report_rows(profile_dir: Path) -> str:
    from raftsuite.report import format_headline_value

    rows = []
    for status_path in sorted(profile_dir.glob("*/status.json")):
        directory, status = status_path.parent, _read(status_path)
        headline = _read(directory / "headline.json") or {}
        state = "ran" if status["ok"] else f"FAILED: {status['error']}"
        numbers = "; ".join(
            f"{html.escape(str(k))}: <b>{html.escape(format_headline_value(v))}</b>"
            for k, v in headline.get("numbers", {}).items()
        )  # the report's headline, so the page answers "what did each notebook find" without opening it
        rows.append(
            f"<tr><td><a href='{profile_dir.name}/{html.escape(directory.name)}/report.html'>"
            f"{html.escape(headline.get('title', directory.name))}</a><br><small>{html.escape(headline.get('note', ''))}</small>"
            f"<br><small>{numbers}</small></td>"
            f"<td class='{'ok' if status['ok'] else 'failed'}'>{html.escape(state)}</td>"
            f"<td>{status['seconds'] / 60:.1f} min<br><small>{html.escape(status['finished'])}</small></td></tr>"
        )
    return "".join(rows)


def _commits(profile_dir: Path) -> str:
    commits = {}
    for path in profile_dir.glob("*/header.json"):
        git = (_read(path) or {}).get("git") or {}  # outside a git checkout the header records git: null
        commit = git["commit"][:10] if git.get("commit") else "not a git checkout"
        commits.setdefault(f"{commit}{' (dirty)' if git.get('dirty') else ''}", []).append(path.parent.name)
    return "; ".join(
        f"<code>{html.escape(c)}</code> ({', '.join(sorted(names))})" for c, names in sorted(commits.items())
    )


STYLE = """
body { font: 15px/1.45 sans-serif; margin: 2em auto; max-width: 1180px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; width: 100%; margin-bottom: 2em; }
td, th { border-bottom: 1px solid #ddd; padding: 6px 8px; vertical-align: top; text-align: left; }
td.num { font-family: monospace; white-space: nowrap; } tr.primary td { background: #f6f8ff; }
.v { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 90%; white-space: nowrap; }
.v.good { background: #d1f0d9; color: #0f5323; } .v.bad { background: #fbd5d0; color: #8a1c0f; }
.v.open { background: #eceff3; color: #3b4552; } .v.same { background: #fff1c2; color: #6b4e00; }
td.ok { color: #1a7f37; } td.failed { color: #b42318; } small { color: #555; } .counts { margin: .3em 0; }
"""


def _local_note(local: list[Path]) -> str:
    if not local:
        return ""
    names = ", ".join(f"<code>{html.escape(p.name)}</code>" for p in local)
    return (
        f"<p><small>Also run on this machine, not committed (git ignores them): {names}; their reports are "
        "<code>results/PROFILE/NOTEBOOK/report.html</code>.</small></p>"
    )


def ignored_by_git(path: Path) -> bool:
    """Whether git ignores `path` (results/smoke and results/dryrun: run here, never committed). Outside a git
    work tree (a test's temporary results/), nothing is."""
    import subprocess

    try:
        # Absolute, so a relative `path` is not read again relative to its own parent.
        path = path.resolve()
        found = subprocess.run(["git", "check-ignore", "-q", path.name], cwd=path.parent, capture_output=True)
    except OSError:  # no git on this machine
        return False
    return found.returncode == 0


def write_index(results: Path) -> Path:
    """Write results/index.html (see the module docstring) and return its path. A profile whose results git
    ignores (smoke, dryrun) is named but not tabled: a run of it must not change the committed page."""
    sections = []
    profiles = sorted(p for p in results.iterdir() if p.is_dir() and any(p.glob("*/status.json")))
    local = [p for p in profiles if ignored_by_git(p)]
    for profile_dir in (p for p in profiles if p not in local):
        claims = profile_claims(profile_dir)
        table = (
            "<table><thead><tr><th>paper</th><th>claim</th><th>the paper's number</th><th>ours [95 % interval]"
            "</th><th>verdict</th><th>report</th></tr></thead><tbody>" + _claim_rows(claims) + "</tbody></table>"
        )
        sections.append(
            f"<h2>Profile <code>{html.escape(profile_dir.name)}</code></h2>"
            + (_counts(claims) + table if claims else "<p>No claims recorded.</p>")
            + f"<p><small>Made from commit {_commits(profile_dir)}.</small></p>"
            + "<h3>Reports</h3><table><thead><tr><th>report</th><th>status</th><th>wall time</th></tr></thead><tbody>"
            + _report_rows(profile_dir)
            + "</tbody></table>"
        )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>RAFT experiment suite: what reproduces</title>
<style>{STYLE}</style></head><body>
<h1>RAFT experiment suite: what reproduces</h1>
<p>Reward rAnked FineTuning (Dong et al. 2023, arXiv 2304.06767) and the RAFT++ reasoning study (Xiong et al. 2025),
reproduced by notebooks executed with papermill. The <code>tiny</code> profile runs offline on 2 CPU cores with
models the suite builds itself: its numbers are not the paper's, so each claim is checked for its <em>direction</em>,
and each report says where the setting differs. Every interval is a 95 % Student-t interval over seeds (n seeds) unless
it says otherwise; a verdict reads it: <b>reproduces</b> (excludes no change, on the paper's side), <b>opposite</b>
(the other side), <b>not resolved</b> (holds no change; the effect the seeds could detect is given), <b>identical
runs</b> (the two sides kept the same samples). See <a href="../docs/statistics.md">docs/statistics.md</a>.
Regenerate with <code>make reproduce-all</code>.</p>
{"".join(sections)}{_local_note(local)}
</body></html>
"""
    index = results / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def claims_markdown_table(profile_dir: Path) -> str:
    """The profile's claim table as Markdown, for docs/results.md (a test keeps the two equal): the same rows and
    order as the results page, from the same claims.json files."""
    lines = [
        "| paper | claim | the paper's number | ours [interval] | verdict | report |",
        "|---|---|---|---|---|---|",
    ]
    for c in profile_claims(profile_dir):
        verdict = NAMES.get(c["verdict"], c["verdict"])
        verdict += f" ({_power_note(c)})" if _power_note(c) else ""
        verdict += f"; {_primary_note(c)}" if _primary_note(c) else ""
        cells = [c["table"], c["claim"], str(c["paper"]), f"{c['ours']} ({c['interval']})", verdict]
        cells.append(f"[{c['report']}](../results/{c['link']})")
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    # python -m raftsuite.index results/tiny: the claim table as Markdown (docs/results.md holds it)
    sys.stdout.write(claims_markdown_table(Path(sys.argv[1])))
