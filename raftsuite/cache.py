"""The notebooks' one result cache: a result is reused only when it was made with the same parameters.

    record = cached(work / "table3" / "seed_0.json", {"model": ..., "held_out": ...}, lambda: evaluate(...))

A result is stored as JSON beside the parameters it was made with (written atomically once it is complete: a
kill mid-computation leaves nothing to read back). A later call with the same parameters reads it back; a call
with other parameters recomputes it and says which parameters changed, so an edited notebook never reads a
stale result and never needs a file deleted by hand. Parameters are compared as JSON (paths as text).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

Result = TypeVar("Result")


def as_json(value: Any) -> Any:
    """`value` as JSON would give it back (tuples as lists, paths and other objects as text, numpy as numbers)."""
    return json.loads(json.dumps(value, default=_plain))


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    return str(value)


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def read(path: Path, params: Mapping[str, Any]) -> Any | None:
    """The result stored at `path` if it was made with `params`, else None (logging why it is not reused)."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    wanted = as_json(dict(params))
    if saved.get("params") != wanted:
        changed = ", ".join(changed_keys(saved.get("params") or {}, wanted))
        logger.info("%s was made with other parameters (%s): recomputing", path, changed)
        return None
    return saved["result"]


def write(path: Path, params: Mapping[str, Any], result: Any) -> Any:
    """Store `result` with `params`, atomically; returns the result as it will read back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = {"params": as_json(dict(params)), "result": as_json(result)}
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(stored, indent=1))
    os.replace(tmp, path)
    return stored["result"]


def cached(path: str | Path, params: Mapping[str, Any], compute: Callable[[], Result]) -> Any:
    """`compute()`'s result, from `path` when it holds one made with `params` (see the module docstring)."""
    path = Path(path)
    saved = read(path, params)
    if saved is not None:
        logger.info("reusing %s", path)
        return saved
    return write(path, params, compute())


def keyed_directory(parent: str | Path, kind: str, key: Mapping[str, Any]) -> Path:
    """PARENT/KIND/<12 hex digits of the sha256 of `key` as sorted JSON>, created, with the key in settings.json:
    runs made with other settings (or prompts) live elsewhere and are never read back as these."""
    import hashlib

    text = json.dumps(as_json(dict(key)), sort_keys=True)
    root = Path(parent) / kind / hashlib.sha256(text.encode()).hexdigest()[:12]
    root.mkdir(parents=True, exist_ok=True)
    (root / "settings.json").write_text(json.dumps(json.loads(text), indent=1) + "\n")
    return root
