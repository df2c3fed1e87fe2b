"""tools/gpu_stages.py, the GPU machine's stage-by-stage check, runs here on tiny shapes: every stage it would run on
the H100/H200 runs through the same code (decoder, fp32-master fine-tune, reward model, TRL's GRPO), so a broken
stage is found before device time is spent on it."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_gpu_stage_runs_on_tiny_shapes(tmp_path):
    done = subprocess.run([sys.executable, "tools/gpu_stages.py", "--out", str(tmp_path), "--tiny"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    stages = json.loads((tmp_path / "gpu_stages.json").read_text())["stages"]
    failed = {name: r.get("error") for name, r in stages.items() if "ok" not in r}
    assert done.returncode == 0 and not failed, (failed, done.stdout[-3000:], done.stderr[-3000:])
    assert {"hh_rlhf: GRPO: fine-tune (TRL)", "reasoning: GRPO: fine-tune (TRL)"} <= set(stages)
    assert {"hh_rlhf: RAFT: evaluate", "reasoning: RAFT / RAFT++: evaluate"} <= set(stages)
    # generation in the weights' dtype (no autocast), as raftlib generates
    assert all(r["dtype"] == "float32" for r in stages.values() if "dtype" in r)
    # every stage has the planner's estimate beside it (what the GPU run compares against)
    assert all(r["estimated_gib"] and r["estimated_gib"] > 0 for r in stages.values())
    # fine-tunes keep fp32 master weights (issue 21: no pure-bf16 AdamW)
    assert all(r["trainable_dtypes"] == ["torch.float32"] for r in stages.values() if "trainable_dtypes" in r)
    assert "| stage | estimated GiB |" in done.stdout
