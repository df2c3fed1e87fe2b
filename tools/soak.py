"""Soak test: a long RAFT run in one process, resident memory sampled through it.

    python tools/soak.py OUT_DIR [--iterations 50]     (make soak)

A small GPT-2 (raftlib.testing) with every per-iteration allocation path switched on: a reward model
loaded and freed at each scoring pass (mixed with a programmatic reward), the KL reference model loaded
for selection and evaluation, checkpoints written and pruned, held-out evaluation each iteration. A leak
in any of them grows the resident set iteration after iteration. Writes OUT_DIR/soak.json (per-iteration
peak RSS) and OUT_DIR/soak.md; exits 1 when growth after warm-up is 5% or more.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples" / "toy"))  # toy_rewards:letter_a

WARMUP = 5
"""Iterations before the baseline: allocator pools, lazy imports and caches fill during the first few."""


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "soak", help="models and the run (not kept)")
    args = parser.parse_args()

    import shutil

    import torch
    import transformers

    from raftlib import RAFTConfig, run, testing

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    models = work / "models"
    policy = testing.build_gpt2(models / "policy")
    reward_model = testing.build_gpt2_reward_model(models / "rm")
    prompts = testing.write_prompts(models / "prompts.jsonl", count=80)
    config = RAFTConfig.from_dict(
        {
            "model": {"path": str(policy)},
            "data": {"prompts": str(prompts), "eval_prompts": 8},
            "generation": {"samples_per_prompt": 4, "max_new_tokens": 12, "prompts_per_batch": 4},
            "reward": {
                "fn": [
                    {"fn": "toy_rewards:letter_a", "weight": 1.0},
                    {"fn": "reward_model", "weight": 0.1, "args": {"path": str(reward_model), "batch_size": 16}},
                ]
            },
            "selection": {"kl_coef": 0.05},
            "training": {"learning_rate": 3e-3, "epochs": 1, "micro_batch_size": 8},
            "loop": {"iterations": args.iterations, "prompts_per_iteration": 8, "keep_checkpoints": 2},
            "logging": {"tensorboard": False, "progress_bars": False, "level": "WARNING"},
            "seed": 0,
            "output_dir": str(work / "run"),
        }
    )

    # Sample RSS every 50 ms; attribute each sample to the iteration in progress (rows in metrics.jsonl).
    metrics = work / "run" / "metrics.jsonl"
    peaks: dict[int, float] = {}
    done = threading.Event()

    def monitor() -> None:
        while not done.is_set():
            iteration = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            peaks[iteration] = max(peaks.get(iteration, 0.0), rss_mib())
            time.sleep(0.05)

    started = time.perf_counter()
    before = rss_mib()
    thread = threading.Thread(target=monitor, daemon=True)
    thread.start()
    run(config)
    done.set()
    thread.join()
    seconds = time.perf_counter() - started

    # peaks[i] is the peak while iteration i ran (i rows written): index 1..iterations
    per_iteration = [round(peaks[i], 1) for i in range(1, args.iterations + 1) if i in peaks]
    baseline = max(per_iteration[WARMUP - 1 : WARMUP + 4])
    final = max(per_iteration[-5:])
    growth = final / baseline - 1
    record = {
        "iterations": args.iterations,
        "warmup_iterations": WARMUP,
        "rss_before_run_mib": round(before, 1),
        "rss_peak_per_iteration_mib": per_iteration,
        "baseline_mib": baseline,
        "final_mib": final,
        "growth_after_warmup": round(growth, 4),
        "passed": growth < 0.05,
        "seconds": round(seconds, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.python_version()}",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "soak.md").write_text(
        f"# Soak: {args.iterations} RAFT iterations in one process\n\n"
        f"{record['date']} · {record['machine']} · torch {torch.__version__} · transformers "
        f"{transformers.__version__} · {seconds / 60:.1f} min\n\n"
        "Peak resident memory while each iteration ran (reward model loaded and freed at every scoring pass, "
        "KL reference model loaded for selection and evaluation, checkpoints written and pruned).\n\n"
        f"| | MiB |\n|---|---:|\n| before the run | {before:.1f} |\n"
        f"| baseline: max of iterations {WARMUP}-{WARMUP + 4} | {baseline:.1f} |\n"
        f"| final: max of the last 5 iterations | {final:.1f} |\n"
        f"| growth after warm-up | {growth:+.1%} (limit +5%) |\n\n"
        f"Per iteration (MiB): {', '.join(f'{v:.0f}' for v in per_iteration)}\n"
    )
    print((args.out / "soak.md").read_text())
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
