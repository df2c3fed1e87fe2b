"""`python -m raftlib run` and `resume` from a shell, and the example config (a run record) itself."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import base_config

ROOT = Path(__file__).parent.parent
TOY = ROOT / "examples" / "toy"
ENV = {**os.environ, "PYTHONPATH": f"{TOY}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def raftlib(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "raftlib", *args], env=ENV, cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_run_then_resume_from_the_shell(gpt2_dir, prompts_file, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(
            base_config(gpt2_dir, prompts_file, tmp_path / "run", loop={"iterations": 1, "prompts_per_iteration": 4})
        )
    )
    done = raftlib("run", str(config), "loop.iterations=2", "generation.temperature=0.9")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "iter 2/2" in done.stderr and "done:" in done.stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["generation"]["temperature"] == 0.9 and saved["loop"]["iterations"] == 2
    again = raftlib("resume", str(tmp_path / "run"))  # a finished run resumes to a no-op
    assert again.returncode == 0, again.stderr[-3000:]
    assert [
        json.loads(line)["iteration"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ] == [0, 1, 2]


def test_user_errors_exit_2_with_one_line(tmp_path, gpt2_dir, prompts_file):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(base_config(gpt2_dir, prompts_file, tmp_path / "run")))
    bad = raftlib("run", str(config), "generation.top_p=1.5")
    assert bad.returncode == 2
    assert (
        bad.stderr.strip().splitlines()[-1]
        == "error: generation.top_p = 1.5: must be in (0, 1] (from override 'generation.top_p=1.5')"
    )
    missing = raftlib("resume", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "not a raftlib run directory" in missing.stderr
    no_model = raftlib("run", str(config), f"model.path={tmp_path / 'no-model'}")
    assert no_model.returncode == 2 and "no such directory" in no_model.stderr


def test_example_config_runs(tmp_path):
    """The toy example, as its header says, with 2 iterations instead of 6."""
    built = subprocess.run(
        [sys.executable, str(TOY / "build.py"), str(tmp_path / "assets")], env=ENV, capture_output=True, text=True
    )
    assert built.returncode == 0, built.stderr[-3000:]
    done = raftlib(
        "run",
        str(TOY / "config.yaml"),
        "loop.iterations=2",
        f"model.path={tmp_path / 'assets' / 'model'}",
        f"data.prompts={tmp_path / 'assets' / 'prompts.jsonl'}",
        f"output_dir={tmp_path / 'run'}",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_reward_mean"] > rows[0]["eval_reward_mean"]
    assert list((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard events written"
