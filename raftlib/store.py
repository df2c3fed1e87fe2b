"""The run directory: atomic writes, stage markers, per-batch parts, checkpoints, resume points.

    RUN/config.yaml                    resolved config
    RUN/metrics.jsonl                  one JSON object per iteration (see docs/metrics.md)
    RUN/iter_0001/generate/batch_00000.parquet   generation, one file per finished batch
    RUN/iter_0001/score/batch_00000.parquet      rewards, one file per finished batch
    RUN/iter_0001/samples.parquet      every sample with reward, ranking key and kept flag
    RUN/iter_0001/kept.parquet         the kept set
    RUN/iter_0001/eval_samples.parquet held-out completions of the model after this iteration
    RUN/iter_0001/checkpoint/          the model after this iteration (HF format, safetensors)
    RUN/iter_0001/<stage>.done.json    stage markers: written last, so a stage is done iff its marker exists
    RUN/final/                         the final model (full weights or LoRA adapter)

Every file is written to a temporary name in the same directory, flushed, fsynced and renamed into
place (`os.replace` is atomic on POSIX), so a reader never sees a half-written file under its real
name, and a crash leaves either the old state or the new one. Leftover temporaries are ignored and
cleaned at the next open.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TMP_MARK = ".tmp-"


class RunDirError(RuntimeError):
    """The run directory is in use, inconsistent, or belongs to another config."""


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskFullError(RunDirError):
    """The disk (or quota) filled during a write; the file was not written under its real name."""


def _is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _disk_full(path: Path, exc: OSError) -> DiskFullError:
    return DiskFullError(
        f"no space left on device while writing {path} ({exc.strerror}); nothing was written under that "
        "name and everything finished before it is intact: free some space, then resume the run"
    )


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, fsync it, then rename onto `path` in one atomic step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(exc):
            raise _disk_full(path, exc) from exc
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null so every line parses with any JSON reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


class RunStore:
    """One run directory. Holds an exclusive lock while a run writes to it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._lock_handle = None

    # -- lock -----------------------------------------------------------------------------------

    def lock(self) -> RunStore:
        """Take the directory's lock or fail at once: two runs writing one directory corrupt it."""
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / ".lock", "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise RunDirError(
                f"run directory {self.root} is in use by {owner}; wait for it or use another output_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        self._lock_handle = handle
        self._clean_temporaries()
        return self

    def unlock(self) -> None:
        if self._lock_handle is not None:
            fcntl.flock(self._lock_handle.fileno(), fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    def _clean_temporaries(self) -> None:
        for path in self.root.rglob(f"*{TMP_MARK}*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    # -- config ---------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    def has_run(self) -> bool:
        return self.config_path.is_file()

    def write_config(self, yaml_text: str) -> None:
        atomic_write_text(self.config_path, yaml_text)

    # -- iterations and markers -----------------------------------------------------------------

    def iteration_dir(self, iteration: int) -> Path:
        return self.root / f"iter_{iteration:04d}"

    def _marker(self, iteration: int, stage: str) -> Path:
        return self.iteration_dir(iteration) / f"{stage}.done.json"

    def mark_done(self, iteration: int, stage: str, info: dict[str, Any] | None = None) -> None:
        atomic_write_text(self._marker(iteration, stage), json.dumps(_json_safe(info or {}), sort_keys=True))

    def done(self, iteration: int, stage: str) -> dict[str, Any] | None:
        """The stage's marker contents if the stage finished, else None."""
        path = self._marker(iteration, stage)
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    # -- per-batch parts ------------------------------------------------------------------------

    def save_batch(self, iteration: int, stage: str, index: int, rows: list[dict[str, Any]]) -> None:
        write_parquet(self.iteration_dir(iteration) / stage / f"batch_{index:05d}.parquet", rows)

    def load_batches(self, iteration: int, stage: str) -> dict[int, list[dict[str, Any]]]:
        directory = self.iteration_dir(iteration) / stage
        if not directory.is_dir():
            return {}
        batches = {}
        for path in sorted(directory.glob("batch_*.parquet")):
            batches[int(path.stem.split("_")[1])] = read_parquet(path)
        return batches

    def write_table(self, iteration: int, name: str, rows: list[dict[str, Any]]) -> Path:
        path = self.iteration_dir(iteration) / f"{name}.parquet"
        write_parquet(path, rows)
        return path

    def read_table(self, iteration: int, name: str) -> list[dict[str, Any]]:
        return read_parquet(self.iteration_dir(iteration) / f"{name}.parquet")

    # -- metrics --------------------------------------------------------------------------------

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def write_metrics(self, row: dict[str, Any]) -> None:
        """Add (or, on a resumed iteration, replace) the row of `row["iteration"]`; rewrite atomically."""
        rows = [r for r in self.read_metrics() if r["iteration"] != row["iteration"]] + [_json_safe(row)]
        rows.sort(key=lambda r: r["iteration"])
        atomic_write_text(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint_dir(self, iteration: int) -> Path:
        return self.iteration_dir(iteration) / "checkpoint"

    def save_model_dir(self, target: Path, save: Callable[[Path], None]) -> None:
        """Save a model directory atomically: write into a temporary dir, then rename it into place."""
        tmp = target.with_name(f"{target.name}{TMP_MARK}{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            save(tmp)
            for file in tmp.rglob("*"):  # a diffusers pipeline dir has subfolders
                if file.is_file():
                    with open(file, "rb+") as handle:
                        os.fsync(handle.fileno())
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if _is_disk_full(exc):
                raise _disk_full(target, exc) from exc
            raise
        if target.exists():
            # Re-saving (a resumed stage): move the old copy aside first; rename onto a non-empty dir fails.
            old = target.with_name(f"{target.name}{TMP_MARK}old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)

    def prune_checkpoints(self, keep: int, protect: Iterable[int] = ()) -> None:
        """Delete all but the newest `keep` iteration checkpoints."""
        dirs = sorted(self.root.glob("iter_*/checkpoint"))
        protected = {self.checkpoint_dir(i) for i in protect}
        for path in dirs[:-keep]:
            if path not in protected:
                shutil.rmtree(path, ignore_errors=True)

    @property
    def final_dir(self) -> Path:
        return self.root / "final"
