import os
import sys
from pathlib import Path

import pytest

# One BLAS/OpenMP thread per process unless the caller says otherwise: `make test` runs two xdist workers on two
# cores and many tests start child processes besides, so a pool per process oversubscribes the cores (with -n 2 on
# 15 test_loop.py cases: 128 and 146 s against 157 and 139 s, orders swapped, 2026-12-03). Before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch

# toy_rewards (examples/toy) is the "module you wrote" that configs name as toy_rewards:letter_a
sys.path.insert(0, str(Path(__file__).parent.parent / "examples" / "toy"))

from raftlib import testing
from raftlib.records import Sample


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return testing.build_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def gpt2_vllm_dir(tmp_path_factory) -> Path:
    """The test GPT-2 with one head of 48: vLLM's CPU attention has no kernel for gpt2_dir's head size 24."""
    return testing.build_gpt2(tmp_path_factory.mktemp("gpt2-vllm"), heads=1)


@pytest.fixture(scope="session")
def llama_vllm_dir(tmp_path_factory) -> Path:
    """The test Llama with one head of 48 (vLLM serves LoRA on Llama, not on GPT-2)."""
    return testing.build_llama(tmp_path_factory.mktemp("llama-vllm"), heads=1, kv_heads=1)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return testing.build_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    return testing.write_prompts(tmp_path_factory.mktemp("data") / "prompts.jsonl")


def base_config(model_dir: Path, prompts: Path, output_dir: Path, **sections) -> dict:
    """A small, fast run: 8 prompts x K=4, 12 new tokens, lr high enough to move a random model."""
    config = {
        "model": {"path": str(model_dir)},
        "data": {"prompts": str(prompts), "eval_prompts": 8},
        "generation": {"samples_per_prompt": 4, "max_new_tokens": 12, "prompts_per_batch": 4},
        "reward": {"fn": "toy_rewards:letter_a"},
        "training": {"learning_rate": 3.0e-3, "epochs": 2, "micro_batch_size": 4},
        "loop": {"iterations": 2, "prompts_per_iteration": 8},
        "logging": {"tensorboard": False, "progress_bars": False},
        "seed": 0,
        "output_dir": str(output_dir),
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(name), dict):
            config[name] = config[name] | values
        else:
            config[name] = values
    return config


# ----------------------------------------------------------------------------------------------
# Comparing draws across kernels (issue 11)
# ----------------------------------------------------------------------------------------------

# The static backend (a fixed-shape step over a StaticCache masked up to its
# full length) and the eager loop (a growing dynamic cache), or a compiled and an uncompiled step, compute
# the same logits through different kernels: in fp32 they agree to rounding, not bit for bit, and which bits
# differ depends on the CPU (a test comparing rows exactly passed here and failed on an AVX-512 machine).
# So: prompts, tokens, text and finish reasons must be equal; log-probabilities within LOGPROB_ATOL; and a
# token may differ only where the checked path's top two decision scores were within TIE_MARGIN of each
# other (a rounding flip at a near-tie), after which that row continues from another prefix and is not
# compared further. Measured on this machine's CPU (tiny GPT-2 and Llama of raftlib.testing, 12 new tokens):
# the cached and full-forward logits differ by at most 9e-8, the eager and static log-probability sums
# by at most 7.6e-6, while the Llama's top-two logit gaps have a 1 % quantile of 5.8e-4.
LOGPROB_ATOL = 1e-4  # a sum of <= 12 per-token log-probabilities: >10x the largest difference measured
TIE_MARGIN = 1e-5  # on the decision scores (logits, or logits/T + Gumbel noise): 100x the logit differences


def assert_same_draws(checked: list[Sample], reference: list[Sample], gaps: torch.Tensor) -> int:
    """`checked` drew what `reference` drew, up to rounding (see above); returns how many rows flipped."""
    flips = 0
    for row, (mine, theirs) in enumerate(zip(checked, reference, strict=True)):
        assert (mine.prompt_id, mine.sample_index, mine.prompt_token_ids) == (
            theirs.prompt_id,
            theirs.sample_index,
            theirs.prompt_token_ids,
        )
        if mine.completion_token_ids == theirs.completion_token_ids:
            assert (mine.completion, mine.finish_reason) == (theirs.completion, theirs.finish_reason), row
            assert mine.logprob == pytest.approx(theirs.logprob, abs=LOGPROB_ATOL), row
            continue
        step = first_difference(mine.completion_token_ids, theirs.completion_token_ids)
        assert step is not None, f"row {row}: one completion ends where the other goes on with the same tokens"
        assert_near_tie(gaps[row], step, f"row {row}")
        flips += 1
    return flips


def first_difference(tokens: list[int], other: list[int]) -> int | None:
    """The first step at which two token lists differ (None when one is a prefix of the other)."""
    return next((i for i, (a, b) in enumerate(zip(tokens, other)) if a != b), None)


def assert_near_tie(gaps: torch.Tensor, step: int, what: str) -> None:
    """A token differs at `step`: acceptable only if the top two decision scores there were a near-tie."""
    assert gaps[step] < TIE_MARGIN, (
        f"{what} differs at step {step}, where the top two decision scores were {float(gaps[step]):.2e} "
        f"apart: more than a rounding flip (TIE_MARGIN {TIE_MARGIN:.0e})"
    )


# ----------------------------------------------------------------------------------------------
# Fault injection: the run every interrupted run is compared with
# ----------------------------------------------------------------------------------------------

RESUME = {
    "loop": {"iterations": 2, "prompts_per_iteration": 12},
    "generation": {"samples_per_prompt": 4, "max_new_tokens": 10, "prompts_per_batch": 3},
    "reward": {"fn": "toy_rewards:letter_a", "batch_size": 12},
    "training": {"learning_rate": 5.0e-3, "epochs": 2, "micro_batch_size": 4},
}
"""2 iterations x 12 prompts x K=4: 4 generation and 4 scoring batches and 6 optimizer steps per iteration."""


def write_config(path: Path, raw: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw))
    return path


def snapshot(run_dir: Path) -> dict:
    """What must not differ between an interrupted-and-resumed run and an uninterrupted one."""
    import json

    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    state = {"kept": {}, "samples": {}}
    for iteration in (1, 2):
        directory = run_dir / f"iter_{iteration:04d}"
        samples = pq.read_table(directory / "samples.parquet").to_pylist()
        keys = [(r["prompt_id"], r["sample_index"]) for r in samples]
        assert len(keys) == len(set(keys)) == 12 * 4, "a sample was lost or duplicated"
        state["samples"][iteration] = [
            (r["prompt_id"], r["sample_index"], r["completion_token_ids"], r["reward"]) for r in samples
        ]
        state["kept"][iteration] = [(r["prompt_id"], r["sample_index"], r["completion"]) for r in samples if r["kept"]]
    state["weights"] = load_file(run_dir / "final" / "model.safetensors")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    state["iterations"] = [row["iteration"] for row in rows]
    state["eval"] = [row["eval_reward_mean"] for row in rows]
    return state


def assert_same_run(state: dict, reference: dict) -> None:
    """Samples, kept sets and held-out rewards equal to the bit, weights to 1e-6.

    Exact equality is only right where the same arithmetic is repeated: a resumed run against an
    uninterrupted one on the same machine, with the same thread count (and the two-process runs of
    test_multiprocess.py, whose docstring says why they repeat it). Never use it across kernels.
    """
    import torch

    assert state["kept"] == reference["kept"]
    assert state["samples"] == reference["samples"]
    assert state["iterations"] == reference["iterations"] == [0, 1, 2]
    assert state["eval"] == reference["eval"]
    for name, tensor in reference["weights"].items():
        torch.testing.assert_close(state["weights"][name], tensor, rtol=0, atol=1e-6)


def read_run_dir(run_dir: Path) -> int:
    """Read every file of a run directory under its real name, as a reader (a notebook, a dashboard) would.

    Temporaries are skipped (a reader never takes them for the real thing). A file that disappears
    between listing and reading (a pruned checkpoint) is fine; one that exists and does not parse is
    not. Returns the number of files read.
    """
    import json

    import pyarrow.parquet as pq
    import yaml
    from safetensors import safe_open

    from raftlib.store import TMP_MARK

    # os.walk, not Path.rglob: rglob raises when a directory vanishes between listing and descending (a
    # temporary checkpoint renamed into place), os.walk skips it; temporaries are pruned before descending.
    paths = []
    for parent, dirnames, filenames in os.walk(run_dir):
        dirnames[:] = sorted(name for name in dirnames if TMP_MARK not in name)
        paths += [Path(parent) / name for name in sorted(filenames) if TMP_MARK not in name]
    count = 0
    for path in paths:
        if not path.is_file():
            continue
        try:
            if path.suffix == ".parquet":
                pq.read_table(path)
            elif path.name.endswith(".done.json"):
                json.loads(path.read_text())
            elif path.name == "metrics.jsonl":
                for line in path.read_text().splitlines():
                    json.loads(line)
            elif path.name == "config.yaml":
                yaml.safe_load(path.read_text())
            elif path.suffix == ".safetensors":
                with safe_open(str(path), "pt") as weights:
                    for key in weights.keys():
                        weights.get_tensor(key)
            else:
                continue
        except FileNotFoundError:
            continue
        count += 1
    return count


@pytest.fixture(scope="session")
def uninterrupted(gpt2_dir, prompts_file, tmp_path_factory):
    from raftlib import RAFTConfig, run

    root = tmp_path_factory.mktemp("reference")
    run(RAFTConfig.from_dict(base_config(gpt2_dir, prompts_file, root / "run", **RESUME)))
    return snapshot(root / "run")


# ----------------------------------------------------------------------------------------------
# Killing a whole process tree, and waiting until it is gone
# ----------------------------------------------------------------------------------------------


def kill_tree(process, run_dir: Path | None = None, timeout: float = 60.0) -> None:
    """SIGKILL `process` (a subprocess.Popen) and every process it started, then wait until all are gone and,
    with `run_dir`, until its lock is free.

    A process-group kill is not enough: torchrun starts each worker in a session of its own, and a Jupyter kernel
    runs in its own too, so `os.killpg` on the launcher leaves them running (and holding the run directory's
    lock) while the test resumes. The tree is frozen first (SIGSTOP, so nothing forks while it is collected),
    then killed; a resume that starts before the last worker is gone would race with it.
    """
    import fcntl
    import time

    import psutil

    root = psutil.Process(process.pid)
    tree: dict[int, psutil.Process] = {}
    while True:
        found = {p.pid: p for p in [root, *root.children(recursive=True)] if p.pid not in tree}
        if not found:
            break
        for member in found.values():
            try:
                member.suspend()
            except psutil.NoSuchProcess:
                pass
        tree |= found
    for member in tree.values():
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=timeout)
    _, alive = psutil.wait_procs(list(tree.values()), timeout=timeout)
    assert not alive, f"processes still alive after SIGKILL: {[p.pid for p in alive]}"
    if run_dir is None or not (run_dir / ".lock").exists():
        return
    deadline = time.monotonic() + timeout
    with open(run_dir / ".lock", "a+") as handle:
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, f"{run_dir} is still locked after its processes were killed"
                time.sleep(0.05)
