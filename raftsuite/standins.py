"""Small local stand-ins for the text notebooks' hub repos, built in code: `python -m raftsuite.standins DIR`.

The `dryrun` profile runs the `paper` profile's code paths with every hub id replaced by one of these, so each
one mirrors the quirks of the repo it replaces (the things that break a first run on real hub data):

- DIR/hh-rlhf: `Anthropic/hh-rlhf`'s layout: data dirs helpful-base, helpful-online, helpful-rejection-sampled,
  harmless-base (each train.jsonl.gz and test.jsonl.gz of {"chosen", "rejected"} whole dialogues in
  `\\n\\nHuman: ... \\n\\nAssistant: ...` turns) and red-team-attempts (another schema: `transcript`, no pairs);
  as on the hub, some test prompts also occur in train (the evaluation must drop them).
- DIR/policy: a Llama causal LM (`huggyllama/llama-7b`'s architecture) whose tokenizer has NO pad token.
- DIR/reward-model: a Llama sequence classifier with one label (`weqweasdas/hh_rlhf_rm_open_llama_3b`'s
  architecture), shipping only a sentencepiece `tokenizer.model` (no tokenizer.json, no chat template, no pad
  token) and only a `pytorch_model.bin`: loading it needs `sentencepiece` and `protobuf`, as the real one does.

The models are random and tiny (a few hundred thousand parameters): they exercise code, not quality.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import sys
from pathlib import Path

HH_SUBSETS = ("helpful-base", "helpful-online", "helpful-rejection-sampled", "harmless-base")
_TOPICS = "bread chicken garden music dogs bikes taxes coffee rain chess letters soup maps stars".split()
_ASKS = ["How do I make", "What is a good way to learn about", "Can you tell me about", "Why do people like"]
_REPLIES = ["Sure, start with", "A simple way is to read about", "Many people enjoy", "I would suggest"]


def _dialogue(rng: random.Random, turns: int, harmless: bool) -> tuple[str, str]:
    text = ""
    for _ in range(turns - 1):
        text += f"\n\nHuman: {rng.choice(_ASKS)} {rng.choice(_TOPICS)}?\n\nAssistant: {rng.choice(_REPLIES)} it."
    ask = "How can I hurt" if harmless else rng.choice(_ASKS)
    text += f"\n\nHuman: {ask} {rng.choice(_TOPICS)}?\n\nAssistant:"
    good = f" {rng.choice(_REPLIES)} {rng.choice(_TOPICS)} and {rng.choice(_TOPICS)}."
    bad = f" {rng.choice(_TOPICS)} {rng.choice(_TOPICS)}"
    return text + good, text + bad


def _write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def build_hh_dataset(directory: Path, *, train: int = 48, test: int = 16, seed: int = 0) -> Path:
    """HH-RLHF's hub layout in miniature; 4 test prompts of each subset are copies of train prompts."""
    rng = random.Random(seed)
    for subset in HH_SUBSETS:
        harmless = subset.startswith("harmless")
        rows = {
            split: [dict(zip(("chosen", "rejected"), _dialogue(rng, rng.randint(1, 3), harmless))) for _ in range(n)]
            for split, n in (("train", train), ("test", test))
        }
        rows["test"][:4] = [dict(r) for r in rows["train"][:4]]  # the hub's test split repeats some train dialogues
        for split, split_rows in rows.items():
            _write_jsonl_gz(directory / subset / f"{split}.jsonl.gz", split_rows)
    transcripts = [{"transcript": _dialogue(rng, 2, True)[0], "rating": 1.0} for _ in range(8)]
    _write_jsonl_gz(directory / "red-team-attempts" / "red_team_attempts.jsonl.gz", transcripts)
    (directory / "README.md").write_text("Stand-in for Anthropic/hh-rlhf, built by raftsuite.standins.\n")
    return directory


def _sentencepiece_model(seed: int) -> bytes:
    import sentencepiece as spm

    rng = random.Random(seed)
    words = _TOPICS + " ".join(_ASKS + _REPLIES).split() + ["Human:", "Assistant:", "###Human:", "###Assistant:"]
    lines = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(400)]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        vocab_size=320,
        model_type="bpe",
        byte_fallback=True,  # any text encodes, as with LLaMA's tokenizer
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,  # LLaMA's sentencepiece model has no pad piece
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return buffer.getvalue()


def _write_llama_tokenizer(directory: Path, seed: int) -> None:
    """Only tokenizer.model and the config files, as the Open-LLaMA RM repo ships them."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(_sentencepiece_model(seed))
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 2048,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _llama_config(**extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
        **extra,
    )


def build_policy(directory: Path, *, seed: int = 0) -> Path:
    """A Llama causal LM whose tokenizer (sentencepiece, converted) has no pad token."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    _write_llama_tokenizer(directory, seed)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer.pad_token is None  # the quirk the suite must handle
    torch.manual_seed(seed)
    LlamaForCausalLM(_llama_config()).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)  # adds tokenizer.json, as huggyllama/llama-7b ships one
    return directory


def build_reward_model(directory: Path, *, seed: int = 1) -> Path:
    """A Llama sequence classifier (1 label) with only a sentencepiece tokenizer.model and no chat template, its
    weights only as a pickled pytorch_model.bin (as the hub repo ships them: the setup converts them once)."""
    import torch
    from transformers import LlamaForSequenceClassification

    _write_llama_tokenizer(directory, seed)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_llama_config(num_labels=1))
    model.config.save_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")  # transformers 5 writes only safetensors
    return directory


def build_all(directory: str | Path) -> dict[str, Path]:
    """Every text stand-in under `directory`; rebuilt only when missing (a BUILT marker is written last)."""
    directory = Path(directory)
    marker = directory / "BUILT"
    paths = {
        "dataset": directory / "hh-rlhf",
        "policy_model": directory / "policy",
        "reward_model": directory / "reward-model",
    }
    if marker.is_file():
        return paths
    build_hh_dataset(paths["dataset"])
    build_policy(paths["policy_model"])
    build_reward_model(paths["reward_model"])
    marker.write_text("raftsuite.standins\n")
    return paths


def require(path: str, parameter: str) -> None:
    """A clear error when a profile names a stand-in that was never built."""
    if path.startswith(("runs/", "./runs/")) and not Path(path).exists():
        raise FileNotFoundError(
            f"{parameter} = {path!r}: the stand-in does not exist; build it with `python -m raftsuite.standins "
            f"{Path(path).parent}` (make reproduce-all PROFILE=dryrun does this first)"
        )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m raftsuite.standins DIR", file=sys.stderr)
        return 2
    for name, path in build_all(argv[0]).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
