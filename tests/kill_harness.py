"""Run `python -m raftlib ...` and SIGKILL the process at a chosen point (tests only).

    python tests/kill_harness.py POINT N -- run cfg.yaml

POINT is where the kill lands, N which occurrence of it:
  generate-batch   right after the Nth generation batch file is written (mid-generation)
  score-batch      right after the Nth scoring batch file is written (mid-scoring)
  eval-batch       right after the Nth held-out evaluation batch file is written (drawn, not yet scored)
  optimizer-step   right after the Nth optimizer step (mid-fine-tune)
  checkpoint       inside the Nth checkpoint save, after the weights are half written
  marker           right after the Nth stage marker is written
  before-marker    right before the Nth stage marker is written (the stage's output is on disk, unmarked)
  parquet-write    inside the Nth Parquet write, with half of the file in its temporary name
  metrics-write    inside the Nth rewrite of metrics.jsonl, with half of it in its temporary name

A real SIGKILL: no exception handler, atexit or finally block runs, exactly like an OOM kill.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "examples" / "toy"))


def main() -> int:
    point, count = sys.argv[1], int(sys.argv[2])
    argv = sys.argv[sys.argv.index("--") + 1 :]
    calls = {"n": 0}

    def tick():
        calls["n"] += 1
        if calls["n"] == count:
            os.kill(os.getpid(), signal.SIGKILL)

    from raftlib import store

    if point in ("generate-batch", "score-batch", "eval-batch"):
        stage = point.split("-")[0]
        original = store.RunStore.save_batch

        def save_batch(self, iteration, name, index, rows):
            original(self, iteration, name, index, rows)
            if name == stage:
                tick()

        store.RunStore.save_batch = save_batch
    elif point == "optimizer-step":
        import torch

        original_step = torch.optim.AdamW.step

        def step(self, *args, **kwargs):
            result = original_step(self, *args, **kwargs)
            tick()
            return result

        torch.optim.AdamW.step = step
    elif point == "checkpoint":
        from raftlib.text import modality as text

        original_save = text.save_model

        def save_model(model, tokenizer, directory, state_dict=None):
            original_save(model, tokenizer, directory, state_dict)
            weights = next(Path(directory).glob("*.safetensors"))
            with open(weights, "r+b") as handle:  # leave a torn file behind, as a kill mid-write would
                handle.truncate(weights.stat().st_size // 2)
            tick()

        text.save_model = save_model
    elif point == "marker":
        original_mark = store.RunStore.mark_done

        def mark_done(self, iteration, stage, info=None):
            original_mark(self, iteration, stage, info)
            tick()

        store.RunStore.mark_done = mark_done
    elif point == "before-marker":
        original_mark = store.RunStore.mark_done

        def mark_done(self, iteration, stage, info=None):
            tick()
            original_mark(self, iteration, stage, info)

        store.RunStore.mark_done = mark_done
    elif point in ("parquet-write", "metrics-write"):
        original_atomic = store.atomic_write
        wanted = ".parquet" if point == "parquet-write" else "metrics.jsonl"

        def atomic_write(path, write):
            if not str(path).endswith(wanted):
                return original_atomic(path, write)

            def torn(tmp):
                write(tmp)
                if calls["n"] + 1 == count:
                    with open(tmp, "r+b") as handle:  # half the bytes reached the disk when the kill landed
                        handle.truncate(tmp.stat().st_size // 2)
                tick()

            return original_atomic(path, torn)

        store.atomic_write = atomic_write
    else:
        raise SystemExit(f"unknown kill point {point}")

    from raftlib.__main__ import main as raftlib_main

    return raftlib_main(argv)


if __name__ == "__main__":
    sys.exit(main())
