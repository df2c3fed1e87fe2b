"""Print a Markdown summary of a run directory: one row per iteration, and the machine it ran on.

python tools/summarize_run.py runs/toy
"""

import datetime
import json
import os
import platform
import sys
from pathlib import Path

COLUMNS = [
    ("iteration", "iter", "{}"),
    ("reward_mean", "reward", "{:.3f}"),
    ("kept_reward_mean", "kept", "{:.3f}"),
    ("best_of_k_reward_mean", "best-of-K", "{:.3f}"),
    ("eval_reward_mean", "eval reward", "{:.3f}"),
    ("eval_kl", "eval KL", "{:.2f}"),
    ("eval_reference_ppl", "ref ppl", "{:.1f}"),
    ("eval_distinct_2", "distinct-2", "{:.3f}"),
    ("eval_length_tokens", "length", "{:.1f}"),
    ("time_iteration_s", "s/iter", "{:.1f}"),
    ("generate_tokens_per_s", "gen tok/s", "{:.0f}"),
    ("finetune_tokens_per_s", "train tok/s", "{:.0f}"),
]


def main(run_dir: Path) -> str:
    import torch
    import transformers

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    lines = [
        f"# {run_dir}",
        "",
        f"Ran on {platform.machine()} with {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}; summarised "
        f"{datetime.date.today().isoformat()}. Row 0 is the initial model; eval columns describe the model "
        "after the iteration's fine-tune (docs/metrics.md).",
        "",
        "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|" + "---:|" * len(COLUMNS),
    ]
    for row in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            value = row.get(key)
            cells.append("" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
