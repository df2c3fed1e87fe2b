"""The built-in text rewards: length, exact answer (a verifier) and a Hugging Face reward model.

Each is a factory named in `raftlib.rewards.BUILT_INS` (config `reward.fn: length`, ...) and returns a callable
with the reward contract `(prompts, completions, **columns) -> list[float | None]`.
"""

from __future__ import annotations

import logging
import re
import weakref
from dataclasses import dataclass
from typing import Any

from raftlib.rewards import RewardError, RewardFn

logger = logging.getLogger(__name__)


def length_reward(unit: str = "words", target: int | None = None) -> RewardFn:
    """Completion length in words or characters; with `target`, minus the distance to it."""
    if unit not in ("words", "chars"):
        raise RewardError(f"length reward: unit must be 'words' or 'chars', got {unit!r}")

    def length(prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        sizes = [len(c.split()) if unit == "words" else len(c) for c in completions]
        if target is None:
            return [float(s) for s in sizes]
        return [-float(abs(s - target)) for s in sizes]

    return length


_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_ANSWER_LINE = re.compile(r"(?:answer is|answer:|####)\s*([^\n]+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def extract_answer(text: str) -> str | None:
    """The final answer of a math-style completion: \\boxed{..}, else 'answer is ..'/'####', else None.

    No fallback to 'the last number in the text': a completion that never states an answer must
    not be credited for a number it happened to mention.
    """
    boxed = _BOXED.findall(text)
    if boxed:
        return boxed[-1].strip()
    lines = _ANSWER_LINE.findall(text)
    if lines:
        return lines[-1].strip().rstrip(".")
    return None


def normalize_answer(answer: str) -> str:
    """Canonical form for comparison: strip $, spaces, thousands commas; numbers as numbers."""
    text = answer.strip().strip("$").replace(" ", "").rstrip(".")
    match = _NUMBER.fullmatch(text)
    if match:
        text = text.replace(",", "")
        if "/" in text:
            numerator, denominator = text.split("/")
            if float(denominator) != 0:
                return repr(float(numerator) / float(denominator))
        return repr(float(text))
    return text.lower()


def exact_answer_reward(answer_column: str = "answer") -> RewardFn:
    """1.0 if the completion's final answer equals the `answer_column` value, 0.0 if it differs,
    None if no answer could be parsed (a parse failure is never a reward of 1)."""

    def exact_answer(prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        if answer_column not in columns:
            raise RewardError(
                f"exact_answer reward: the data has no column {answer_column!r} "
                f"(columns: {', '.join(sorted(columns)) or 'none'}); set reward.args.answer_column"
            )
        rewards: list[float | None] = []
        for completion, expected in zip(completions, columns[answer_column], strict=True):
            parsed = extract_answer(completion)
            if parsed is None:
                rewards.append(None)
            else:
                rewards.append(1.0 if normalize_answer(parsed) == normalize_answer(str(expected)) else 0.0)
        return rewards

    return exact_answer


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    sentencepiece: Any
    reference: Any
    holders: int = 0


_LOADED: weakref.WeakValueDictionary[tuple, _Loaded] = weakref.WeakValueDictionary()
"""The reward models loaded in this process, by (path, dtype, device, trust_remote_code), with how many scorers
hold each: two scorers of one model (a baseline's training reward beside its held-out evaluation's, each with its
own batch size and text format) share one copy of its weights, which leaves when the last lets go. The values are
weak: only the scorers holding a copy keep it, so a scorer dropped without `teardown` (an exception in between)
takes its share with it instead of pinning the weights in the process."""


class RewardModelScorer:
    """A Hugging Face sequence-classification reward model (one logit = the reward).

    Loaded in `setup()` and freed in `teardown()`. When its tokenizer has a chat template the
    (prompt, completion) pair is formatted as a user/assistant conversation, as such RMs were trained.
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 16,
        max_length: int | None = None,
        device: str | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        use_chat_template: bool | None = None,
    ) -> None:
        self.path = path
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        self.use_chat_template = use_chat_template
        self.model = None
        self.tokenizer = None
        self.sentencepiece = None
        """The reward model's sentencepiece processor, once its fast tokenizer has encoded a text differently
        (on the probes at setup, or on a text it scores): from then on every text is encoded with it."""
        self.reference = None
        """The sentencepiece processor of the model's `tokenizer.model`, when it ships one: each batch the fast
        tokenizer encodes is checked against it first, so a difference the probes missed is caught on the data."""
        self.holders = 0
        """setup() calls not yet matched by teardown(): the model stays loaded while anyone holds it."""
        self._key: tuple = ()
        self._shared: _Loaded | None = None

    def setup(self) -> None:
        """Load the model, once: nested setup/teardown pairs (a stage inside a caller that holds the reward for
        several stages) share one load, freed when the outermost teardown comes."""
        self.holders += 1
        if self.model is not None:
            return
        import torch

        key = (self.path, self.dtype, self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        key += (self.trust_remote_code,)
        shared = _LOADED.get(key)
        if shared is None:
            try:
                self._load(key[2])
            except BaseException:
                self.model = self.tokenizer = self.sentencepiece = self.reference = None  # not half-held
                self.holders -= 1
                raise
            shared = _Loaded(self.model, self.tokenizer, self.sentencepiece, self.reference)
            _LOADED[key] = shared
        shared.holders += 1
        self._shared = shared
        self.model, self.tokenizer, self._key = shared.model, shared.tokenizer, key
        self.sentencepiece, self.reference = shared.sentencepiece, shared.reference

    def _load(self, device: str) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from raftlib.hub import ModelLoadError, check_local

        check_local(self.path, "reward model")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=self.trust_remote_code)
            model, info = AutoModelForSequenceClassification.from_pretrained(
                self.path,
                dtype=getattr(torch, self.dtype),
                trust_remote_code=self.trust_remote_code,
                output_loading_info=True,
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(
                f"reward model {self.path!r} could not be loaded as a sequence classifier: {exc}"
            ) from exc
        if info.get("missing_keys"):
            # A causal LM dir loads "fine" with a freshly initialised, untrained score head: refuse it.
            missing = ", ".join(sorted(info["missing_keys"]))
            raise ModelLoadError(
                f"reward model {self.path!r} lacks trained weights for {missing}; "
                "is it a causal LM or base model rather than a sequence-classification reward model?"
            )
        self.model = model.to(device)
        if self.model.config.num_labels != 1:
            raise ModelLoadError(
                f"reward model {self.path!r} has {self.model.config.num_labels} labels; a reward model has exactly 1"
            )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval()
        self.reference = sentencepiece_processor(self.path)
        self.sentencepiece = check_against_sentencepiece(self.tokenizer, self.path, self.reference)

    def teardown(self) -> None:
        import gc

        import torch

        self.holders = max(0, self.holders - 1)
        if self.holders or self.model is None:
            return
        shared, self._shared = self._shared, None
        shared.holders -= 1
        if not shared.holders:
            _LOADED.pop(self._key, None)
        self.model = None
        self.tokenizer = None
        self.sentencepiece = self.reference = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _texts(self, prompts: list[str], completions: list[str]) -> list[str]:
        templated = self.use_chat_template
        if templated is None:
            templated = bool(getattr(self.tokenizer, "chat_template", None))
        if not templated:
            return [p + c for p, c in zip(prompts, completions, strict=True)]
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": c}], tokenize=False
            )
            for p, c in zip(prompts, completions, strict=True)
        ]

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        import torch

        loaded_here = self.model is None
        if loaded_here:
            self.setup()
        try:
            texts = self._texts(prompts, completions)
            scores: list[float | None] = []
            device = next(self.model.parameters()).device
            for start in range(0, len(texts), self.batch_size):
                chunk = texts[start : start + self.batch_size]
                if self.sentencepiece is None and self.reference is not None:
                    self._check_on(chunk)
                if self.sentencepiece is not None:
                    batch = sentencepiece_batch(self.sentencepiece, self.tokenizer, chunk, self.max_length)
                    batch = {k: v.to(device) for k, v in batch.items()}
                else:
                    batch = self.tokenizer(
                        chunk,
                        return_tensors="pt",
                        padding=True,
                        truncation=self.max_length is not None,
                        max_length=self.max_length,
                    ).to(device)
                with torch.no_grad():
                    logits = self.model(**batch).logits[:, 0].float()  # (B,)
                scores.extend(float(v) for v in logits.cpu())
            return scores
        finally:
            if loaded_here:
                self.teardown()

    def _check_on(self, texts: list[str]) -> None:
        """Switch to sentencepiece (for this model in this process) if the fast tokenizer encodes any of `texts`
        otherwise: texts it encodes alike get the same tokens either way, so every text scored gets the
        reward model's own tokens."""
        differing = first_difference(self.tokenizer, self.reference, texts)
        if differing is not None:
            _warn_differs(self.path, *differing)
            self.sentencepiece = self.reference
            if self._shared is not None:
                self._shared.sentencepiece = self.reference


SENTENCEPIECE_PROBES = (
    "###Human: How do I   bake bread?\n\n###Assistant:  First, mix  flour and water.",
    "  Two  spaces,\ttabs\t and trailing spaces   ",
    "Numbers 1,024 and 3.14; emoji 🙂 and accents: café, naïve.",
)
"""Texts with what HH-RLHF holds and converted fast tokenizers get wrong (runs of spaces: transformers#24233)."""


def sentencepiece_model_file(path: str):
    """The `tokenizer.model` of a reward model: in its dir, or for a hub id the repo's (downloaded to the hub
    cache, as `from_pretrained` does for the files it needs: a fast tokenizer alone never fetches it); None when
    there is none. A hub file that cannot be fetched (offline, not cached) is warned about: the check is skipped."""
    from pathlib import Path

    local = Path(path).expanduser()
    if local.is_dir():
        model_file = local / "tokenizer.model"
        return model_file if model_file.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(path, "tokenizer.model"))
    except LocalEntryNotFoundError as exc:  # offline and not cached (a subclass of the next: caught first)
        reason = exc
    except EntryNotFoundError:
        return None  # the repo ships no sentencepiece model: nothing to compare against
    except OSError as exc:  # the hub unreachable
        reason = exc
    logger.warning(
        "reward model %r: its tokenizer.model could not be fetched (%s); the fast tokenizer is not checked "
        "against sentencepiece",
        path,
        reason,
    )
    return None


def sentencepiece_processor(path: str):
    """The sentencepiece processor of the model's (dir or hub repo) `tokenizer.model`; None when it ships none
    (or sentencepiece is not installed: it is in the suite's environment)."""
    model_file = sentencepiece_model_file(path)
    if model_file is None:
        return None
    try:
        import sentencepiece
    except ImportError:
        return None
    return sentencepiece.SentencePieceProcessor(model_file=str(model_file))


def first_difference(tokenizer, processor, texts) -> tuple[str, list[int], list[int]] | None:
    """The first of `texts` that `tokenizer` (no special tokens) and `processor` encode differently, with both
    encodings; None when they agree on all."""
    for text in texts:
        fast = tokenizer(text, add_special_tokens=False)["input_ids"]
        slow = processor.encode(text)
        if fast != slow:
            return text, fast, slow
    return None


def _warn_differs(path: str, text: str, fast: list[int], slow: list[int]) -> None:
    logger.warning(
        "reward model %r: its fast tokenizer encodes %r as %s... but its tokenizer.model (sentencepiece) as "
        "%s...: scoring encodes with sentencepiece, as the reward model was trained (transformers#24233)",
        path, text[:200], fast[:12], slow[:12],
    )  # fmt: skip


def check_against_sentencepiece(tokenizer, path: str, processor=None):
    """When the model (dir or hub repo) ships a sentencepiece `tokenizer.model`, the (always fast, in transformers 5) tokenizer
    must encode as sentencepiece does. A converted fast tokenizer that differs (Open-LLaMA's, on repeated spaces:
    transformers#24233) would score other tokens than the reward model was trained on: then the sentencepiece
    processor is returned and the scorer encodes with it (a warning names the text that differed); None when the
    fast tokenizer agrees on `SENTENCEPIECE_PROBES` or there is no tokenizer.model. (The scorer goes on checking
    every batch it scores: see `RewardModelScorer.reference`.)"""
    processor = processor if processor is not None else sentencepiece_processor(path)
    if processor is None:
        return None
    differing = first_difference(tokenizer, processor, SENTENCEPIECE_PROBES)
    if differing is None:
        return None
    _warn_differs(path, *differing)
    return processor


def sentencepiece_batch(processor, tokenizer, texts: list[str], max_length: int | None) -> dict:
    """`texts` encoded by sentencepiece as the fast tokenizer would frame them: its BOS when it adds one,
    truncated to `max_length`, padded with its pad id on its padding side, with the attention mask."""
    import torch

    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    rows = [([tokenizer.bos_token_id] if adds_bos else []) + processor.encode(t) for t in texts]
    rows = [r[:max_length] if max_length else r for r in rows]
    width = max(map(len, rows))
    pad, left = tokenizer.pad_token_id, tokenizer.padding_side == "left"
    ids = [([pad] * (width - len(r)) + r) if left else (r + [pad] * (width - len(r))) for r in rows]
    mask = [([0] * (width - len(r)) + [1] * len(r)) if left else ([1] * len(r) + [0] * (width - len(r))) for r in rows]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}


def reward_model(path: str, **kwargs: Any) -> RewardFn:
    """Built-in `reward_model`: args {path, batch_size, max_length, device, dtype, trust_remote_code}."""
    return RewardModelScorer(path, **kwargs)
