"""Fetch the LAION aesthetic predictor head the `aesthetic` reward reads, and check it.

    python -m raftlib.diffusion.fetch_laion DEST_DIR        # writes DEST_DIR/sa_0_4_vit_l_14_linear.pth

The head is LAION-Aesthetics Predictor V1 (github.com/LAION-AI/aesthetic-predictor): a torch state dict of
`nn.Linear(768, 1)` (`weight` (1, 768), `bias` (1,), float32) applied to L2-normalised CLIP ViT-L/14 image
embeddings. It is downloaded from a pinned commit of that repository and written only if its SHA-256 is the
one below (computed from the file at that commit); `load_aesthetic_head` checks it again on every load.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)

LAION_COMMIT = "6d122adad522ab246644d9dc1c6d7a3810ee255f"
"""LAION-AI/aesthetic-predictor's main branch when the checksums below were taken."""
PUBLISHED_HEADS = {
    "sa_0_4_vit_l_14_linear.pth": "2cd4e60f4f24ae3bcd57b847b13c1f3ba27edc28cc1a7f9ce74ee9f421243cba",
}
"""File name -> SHA-256 of LAION's published heads (the file a `.pth` of that name must be)."""
DEFAULT_HEAD = "sa_0_4_vit_l_14_linear.pth"
FETCH_COMMAND = "python -m raftlib.diffusion.fetch_laion"


def url_of(name: str = DEFAULT_HEAD, commit: str = LAION_COMMIT) -> str:
    return f"https://raw.githubusercontent.com/LAION-AI/aesthetic-predictor/{commit}/{name}"


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(destination: str | Path, name: str = DEFAULT_HEAD, url: str | None = None) -> Path:
    """Download `name` into `destination` (a dir), verify its SHA-256, then move it into place atomically.

    An existing file with the right checksum is kept (no download); one with another checksum is an error.
    """
    if name not in PUBLISHED_HEADS:
        raise ValueError(f"{name!r} is not a published LAION head we know a checksum for: {sorted(PUBLISHED_HEADS)}")
    expected = PUBLISHED_HEADS[name]
    target = Path(destination) / name
    if target.is_file():
        actual = sha256_of(target)
        if actual != expected:
            raise ValueError(
                f"{target} exists with SHA-256 {actual}, not LAION's {expected}: remove it and fetch again"
            )
        logger.info("%s is already there and checks out", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    source = url or url_of(name)
    logger.info("fetching %s", source)
    handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(source, timeout=60) as response:
            out.write(response.read())
        actual = sha256_of(partial)
        if actual != expected:
            raise ValueError(f"{source}: SHA-256 {actual}, expected {expected}; not written to {target}")
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=FETCH_COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("destination", help="directory to write the head into (the paper profile: assets/laion)")
    parser.add_argument("--name", default=DEFAULT_HEAD, choices=sorted(PUBLISHED_HEADS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = fetch(args.destination, args.name)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{path} (sha256 {PUBLISHED_HEADS[args.name]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
