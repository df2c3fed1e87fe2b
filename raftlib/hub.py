"""Model sources: a local Hugging Face directory or a hub id, and the error when neither works.

Shared by the text policy and reward model, the diffusion pipeline and the image rewards.
"""

from __future__ import annotations

from pathlib import Path


class ModelLoadError(ValueError):
    """A model or tokenizer dir is missing or unusable; the message names it."""


def check_local(path: str, what: str, error: type[Exception] = ModelLoadError) -> None:
    """Refuse a path that looks local but is not a directory, naming `what` (e.g. "reward model").

    Without this, a mistyped local path would be sent to the hub as a repo id and fail offline with a network
    error that does not name the path.
    """
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") > 1
    if looks_local and not Path(path).expanduser().is_dir():
        raise error(f"{what} {path!r}: no such directory")
