"""The reasoning notebook's tiny base model: a character-level GPT-2 pretrained here on noisy arithmetic.

The task: two-digit addition and subtraction, `47+38=` -> `85` (subtraction only with a >= b, so answers are
non-negative). The model is pretrained on the problems of the *train* split with the answer corrupted in a
fixed share of the examples (a digit replaced, or off by one or ten: the slips a person makes), so it ends
up putting part of its probability on the right answer and part on plausible wrong ones. That is the
situation rejection sampling needs: pass@1 well below pass@K, so there is something correct to keep. The
held-out split (problems never seen in pretraining, chosen by a content hash) is what the notebook scores.

    python -m raftsuite.tinymath assets/tiny-math      # rebuild (about a minute on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

EOS = "<eos>"
PAD = "<pad>"
CHARACTERS = list("0123456789+-=")


@dataclass(frozen=True)
class BuildSettings:
    n_embd: int = 96
    n_layer: int = 3
    n_head: int = 4
    n_positions: int = 32
    batch_size: int = 128
    steps: int = 1500
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    noise: float = 0.55
    """Share of pretraining examples whose answer is corrupted."""
    heldout_fraction: float = 0.1
    seed: int = 0


# ---- problems ------------------------------------------------------------------------------------


def problems() -> list[tuple[str, int]]:
    """Every `a+b=` and `a-b=` (a >= b) with a, b in 10..99, with its answer, in a fixed order."""
    out = []
    for a in range(10, 100):
        for b in range(10, 100):
            out.append((f"{a}+{b}=", a + b))
            if a >= b:
                out.append((f"{a}-{b}=", a - b))
    return out


def is_heldout(prompt: str, fraction: float) -> bool:
    """Deterministic split by content hash: the same problems are held out on every machine."""
    return int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) / 16**8 < fraction


def split(fraction: float = BuildSettings.heldout_fraction) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, held-out) problems."""
    train, heldout = [], []
    for prompt, answer in problems():
        (heldout if is_heldout(prompt, fraction) else train).append((prompt, answer))
    return train, heldout


def corrupt(answer: int, rng) -> int:
    """A plausible wrong answer: off by one or by ten, or one digit replaced."""
    kind = rng.integers(3)
    if kind == 0:
        wrong = answer + int(rng.choice([-1, 1]))
    elif kind == 1:
        wrong = answer + int(rng.choice([-10, 10]))
    else:
        digits = list(str(answer))
        i = int(rng.integers(len(digits)))
        digits[i] = str((int(digits[i]) + int(rng.integers(1, 10))) % 10)
        wrong = int("".join(digits))
    return wrong if wrong >= 0 and wrong != answer else answer + 1


def write_prompts(path: Path, rows: list[tuple[str, int]]) -> Path:
    """A prompts JSONL (`prompt`, `answer`) as raftlib.data reads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for prompt, answer in rows:
            f.write(json.dumps({"prompt": prompt, "answer": str(answer)}) + "\n")
    return path


# ---- tokenizer and model -------------------------------------------------------------------------


def build_tokenizer(directory: Path):
    """One token per character, plus EOS and PAD; decodes without spaces."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS: 0, PAD: 1} | {c: i + 2 for i, c in enumerate(CHARACTERS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    return fast


def build(directory: Path, settings: BuildSettings = BuildSettings()) -> dict:
    """Pretrain the model on noisy train-split arithmetic and save it with its tokenizer and BUILD.json."""
    import numpy as np
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    tokenizer = build_tokenizer(directory)
    train, heldout = split(settings.heldout_fraction)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=settings.n_positions,
        n_embd=settings.n_embd,
        n_layer=settings.n_layer,
        n_head=settings.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=0.01)

    def lr_factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    vocab = tokenizer.get_vocab()

    def encode(text: str) -> list[int]:  # one token per character: a dict lookup, not a tokenizer call per row
        return [vocab[c] for c in text]

    width = 10  # "99+99=198" + EOS
    model.train()
    for step in range(settings.steps):
        picks = rng.integers(len(train), size=settings.batch_size)
        ids = torch.full((settings.batch_size, width), tokenizer.pad_token_id)  # (B, T)
        labels = torch.full((settings.batch_size, width), -100)  # (B, T): loss on the answer and EOS only
        for row, i in enumerate(picks):
            prompt, answer = train[i]
            shown = corrupt(answer, rng) if rng.random() < settings.noise else answer
            p, c = encode(prompt), [*encode(str(shown)), tokenizer.eos_token_id]
            ids[row, : len(p) + len(c)] = torch.tensor(p + c)
            labels[row, len(p) : len(p) + len(c)] = torch.tensor(c)
        loss = model(input_ids=ids, labels=labels).loss  # right padding sits after every label: no mask needed
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 250 == 0:
            logger.info("step %d/%d loss %.3f", step, settings.steps, loss.item())
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    record = {
        "task": "two-digit addition and subtraction (a - b only for a >= b), answer digits then EOS",
        "train_problems": len(train),
        "heldout_problems": len(heldout),
        "parameters": sum(p.numel() for p in model.parameters()),
        "settings": asdict(settings),
        "final_train_loss": loss.item(),
        "greedy_heldout_accuracy": greedy_accuracy(model, tokenizer, heldout),
        "seconds": time.perf_counter() - started,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "built": time.strftime("%Y-%m-%d"),
    }
    (directory / "BUILD.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def greedy_accuracy(model, tokenizer, rows: list[tuple[str, int]]) -> float:
    """Share of problems whose greedy answer is exactly right (prompts grouped by length: no padding)."""
    import torch

    correct = 0
    by_length: dict[int, list[tuple[str, int]]] = {}
    for prompt, answer in rows:
        by_length.setdefault(len(prompt), []).append((prompt, answer))
    with torch.no_grad():
        for group in by_length.values():
            ids = torch.tensor([tokenizer(p)["input_ids"] for p, _ in group])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=5,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
            correct += sum(t.strip() == str(a) for t, (_, a) in zip(texts, group, strict=True))
    return correct / len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raftsuite.tinymath", description=__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--steps", type=int, default=BuildSettings.steps)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a model this small runs best on one)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    record = build(args.directory, BuildSettings(steps=args.steps))
    logger.info("built %s: %s", args.directory, json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
