"""What the reports show: curves per iteration, result tables, and a sample viewer of kept against rejected.

Every model-generated string that reaches HTML goes through `html.escape`: a completion holding
`<script>` stays text (the paper's reward hacking produced odd strings; a report must not run them).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
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
    run_dir: str | Path, iterations: Sequence[int] | None = None, prompts_per_iteration: int = 3, max_rejected: int = 3
) -> str:
    """HTML: for a few prompts of each iteration, the kept completion next to rejected ones, with rewards."""
    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    available = sorted(int(p.parent.name.split("_")[1]) for p in run_dir.glob("iter_*/samples.parquet"))
    if iterations is None:
        iterations = sorted({available[0], available[len(available) // 2], available[-1]}) if available else []
    parts = []
    for iteration in iterations:
        table = pq.read_table(run_dir / f"iter_{iteration:04d}" / "samples.parquet").to_pylist()
        by_prompt: dict[int, list[dict[str, Any]]] = {}
        for row in table:
            by_prompt.setdefault(row["prompt_id"], []).append(row)
        shown = sorted(by_prompt)[:prompts_per_iteration]
        body = []
        for prompt_id in shown:
            rows = sorted(by_prompt[prompt_id], key=lambda r: -_key(r["reward"]))
            kept = [r for r in rows if r["kept"]]
            rejected = [r for r in rows if not r["kept"]][:max_rejected]
            cells = "".join(_cell(r, "kept") for r in kept) + "".join(_cell(r, "rejected") for r in rejected)
            body.append(f"<tr><th class='text'>{html.escape(rows[0]['prompt'])}</th>{cells}</tr>")
        parts.append(
            f"<h4>Iteration {iteration}: kept (green) against rejected (red), best reward first</h4>"
            f"<table class='raft-samples'>{''.join(body)}</table>"
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


def _cell(row: dict[str, Any], kind: str) -> str:
    reward = "None" if row["reward"] is None else f"{row['reward']:.3f}"
    return (
        f"<td class='{kind}'><div class='reward'>{kind} · reward {html.escape(reward)}</div>"
        f"<div class='text'>{html.escape(row['completion'])}</div></td>"
    )


def reference_row(rows: dict[str, dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame.from_dict(rows, orient="index")


def save_table(frame: pd.DataFrame, output_dir: str | Path, name: str) -> Path:
    path = Path(output_dir) / f"{name}.csv"
    frame.to_csv(path, float_format="%.4f")
    return path


def save_figure(fig, output_dir: str | Path, name: str) -> Path:
    path = Path(output_dir) / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def write_headline(output_dir: str | Path, title: str, numbers: dict[str, Any], note: str = "") -> None:
    """The numbers results/index.html shows for this report."""
    (Path(output_dir) / "headline.json").write_text(
        json.dumps({"title": title, "numbers": numbers, "note": note}, indent=2) + "\n"
    )
