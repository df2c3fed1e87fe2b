"""The `paper` profile of the HH-RLHF notebook: Anthropic/hh-rlhf, a hub policy and a hub reward model.

It cannot run here (no hub access, no GPU). Every id is a notebook parameter, and the same code runs
in the tests on local dirs shaped like the hub's (a dataset dir of HH-format rows, tiny model dirs),
so the path is exercised even though the paper-scale run is not.

HH-RLHF rows are whole dialogues: `"\\n\\nHuman: ...\\n\\nAssistant: ..."` in `chosen` and `rejected`. The
prompt is everything up to and including the last `"\\n\\nAssistant:"`; the response is the rest.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raftlib.config import ModelSection, TrainingSection
from raftlib.data import DataError, read_rows
from raftlib.finetune import finetune
from raftlib.models import load_policy, load_tokenizer, save_model

logger = logging.getLogger(__name__)

ASSISTANT = "\n\nAssistant:"


def split_dialogue(text: str) -> tuple[str, str]:
    """(prompt ending in '\\n\\nAssistant:', response) of one HH-RLHF dialogue."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise DataError(f"not an HH-RLHF dialogue (no {ASSISTANT!r}): {text[:80]!r}")
    return text[: cut + len(ASSISTANT)], text[cut + len(ASSISTANT) :]


def hh_prompts(
    dataset: str, split: str, tokenizer, max_prompt_tokens: int = 256, limit: int | None = None
) -> list[dict[str, str]]:
    """Prompts and chosen responses of HH-RLHF; prompts over `max_prompt_tokens` are dropped, as in the
    paper; then the first `limit` (e.g. the paper's 4,608 test prompts)."""
    rows, _ = read_rows(dataset, split)
    out = []
    for row in rows:
        prompt, chosen = split_dialogue(row["chosen"])
        if len(tokenizer(prompt)["input_ids"]) <= max_prompt_tokens:
            out.append({"prompt": prompt, "reference": chosen.strip()})
            if limit and len(out) == limit:
                break
    return out


@dataclass(frozen=True)
class PaperSetup:
    sft_model: Path | str
    reward_model: str
    prompts: Path
    eval_prompts_file: Path
    train_prompts: int
    eval_prompts: int
    seconds: float


def prepare_paper_setup(
    directory: str | Path,
    *,
    policy_model: str,
    dataset: str,
    reward_model: str,
    sft_model: str = "",
    max_prompt_tokens: int = 256,
    sft_examples: int | None = None,
    sft_learning_rate: float = 2e-5,
    eval_prompts: int = 4608,
    train_limit: int | None = None,
    progress: bool = True,
) -> PaperSetup:
    """HH-RLHF prompts (train and test), and the SFT policy: `sft_model` if given, else one epoch of SFT
    of `policy_model` on HH-RLHF chosen responses (the paper's LLaMA-7B-SFT)."""
    started = time.perf_counter()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(ModelSection(path=sft_model or policy_model))
    train = hh_prompts(dataset, "train", tokenizer, max_prompt_tokens, train_limit)
    test = hh_prompts(dataset, "test", tokenizer, max_prompt_tokens, eval_prompts)
    prompts = directory / "prompts.jsonl"
    with open(prompts, "w", encoding="utf-8") as handle:
        for row in train + test:  # raftlib holds out data.eval_prompts rows; the notebook passes the test file too
            handle.write(json.dumps(row) + "\n")
    eval_file = directory / "eval_prompts.jsonl"
    with open(eval_file, "w", encoding="utf-8") as handle:
        for row in test:
            handle.write(json.dumps(row) + "\n")
    if not sft_model:
        section = ModelSection(path=policy_model, dtype="bfloat16")
        policy = load_policy(section)
        rows = train[:sft_examples] if sft_examples else train
        eos = [tokenizer.eos_token_id]
        examples = [
            (
                tokenizer(r["prompt"])["input_ids"],
                tokenizer(" " + r["reference"], add_special_tokens=False)["input_ids"] + eos,
            )
            for r in rows
        ]
        training = TrainingSection(
            learning_rate=sft_learning_rate, epochs=1, micro_batch_size=8, mixed_precision="bf16"
        )
        policy, _ = finetune(
            policy, examples, training, pad_id=tokenizer.pad_token_id, seed=0, iteration=0, progress=progress
        )
        save_model(policy, tokenizer, directory / "sft")
        sft_model = str(directory / "sft")
    return PaperSetup(
        sft_model=sft_model,
        reward_model=reward_model,
        prompts=prompts,
        eval_prompts_file=eval_file,
        train_prompts=len(train),
        eval_prompts=len(test),
        seconds=time.perf_counter() - started,
    )


def paper_reference_rows() -> dict[str, dict[str, Any]]:
    """Table 3 of the paper (HH-RLHF, LLaMA-7B), from the secondary write-ups in shared/PAPER.md."""
    return {
        "paper: HH rejected": {
            "proxy_reward": 0.156,
            "perplexity": None,
            "msttr_100": 0.623,
            "distinct_2": 0.284,
            "length_words": 144.3,
        },
        "paper: HH chosen": {
            "proxy_reward": 1.873,
            "perplexity": None,
            "msttr_100": 0.624,
            "distinct_2": 0.282,
            "length_words": 154.2,
        },
        "paper: LLaMA-7B": {
            "proxy_reward": -0.435,
            "perplexity": 4.781,
            "msttr_100": 0.579,
            "distinct_2": 0.258,
            "length_words": 119.9,
        },
        "paper: LLaMA-7B-SFT": {
            "proxy_reward": 0.772,
            "perplexity": 3.781,
            "msttr_100": 0.597,
            "distinct_2": 0.250,
            "length_words": 145.4,
        },
        "paper: PPO (beta=0.1)": {
            "proxy_reward": 2.077,
            "perplexity": 4.156,
            "msttr_100": 0.597,
            "distinct_2": 0.262,
            "length_words": 127.8,
        },
        "paper: RAFT-K32, lambda=1.0": {
            "proxy_reward": 2.294,
            "perplexity": 4.031,
            "msttr_100": 0.611,
            "distinct_2": 0.258,
            "length_words": 156.2,
        },
    }
