"""Reward plug-ins and the scoring stage.

A reward is a plain callable (TRL's contract):

    def my_reward(prompts: list[str], completions: list[str], **columns) -> list[float | None]

Extra data columns arrive as keyword lists aligned with the completions. `None` means "could not
score": never kept, always counted. A config names a reward by built-in name or by a `module:function`
path you wrote; with `args` the named object is a *factory* called once as `fn(**args)` to build the
callable (it can load a scorer once and return a closure).

A callable may also define `setup()` and `teardown()`: the scoring stage calls them around each
scoring pass, which is how the reward model is loaded to score and freed afterwards, so that only one
large model is resident at a time.
"""

from __future__ import annotations

import importlib
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from raftlib.config import RewardComponentSection, RewardSection
from raftlib.records import Sample, Scores

logger = logging.getLogger(__name__)


class RewardFn(Protocol):
    def __call__(self, prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float | None]: ...


class RewardError(ValueError):
    """A reward could not be resolved, or returned something unusable; the message names it."""


REGISTRY: dict[str, Callable[..., RewardFn]] = {}
"""Built-in reward factories by name: `REGISTRY[name](**args)` returns a reward callable."""


def register(name: str):
    def decorate(factory):
        REGISTRY[name] = factory
        return factory

    return decorate


# ----------------------------------------------------------------------------------------------
# Built-in rewards
# ----------------------------------------------------------------------------------------------


@register("length")
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


@register("exact_answer")
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

    def setup(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from raftlib.models import ModelLoadError, _check_local

        _check_local(self.path, "reward model")
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
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

    def teardown(self) -> None:
        import gc

        import torch

        self.model = None
        self.tokenizer = None
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
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
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


@register("reward_model")
def reward_model(path: str, **kwargs: Any) -> RewardFn:
    """Built-in `reward_model`: args {path, batch_size, max_length, device, dtype, trust_remote_code}."""
    return RewardModelScorer(path, **kwargs)


# ----------------------------------------------------------------------------------------------
# Resolving a config into one scorer
# ----------------------------------------------------------------------------------------------


def import_object(path: str) -> Any:
    """`package.module:attribute` -> the object. Only explicit paths the user wrote are imported."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise RewardError(
            f"reward {path!r} is neither a built-in ({', '.join(sorted(REGISTRY))}) nor a module:function path"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardError(f"reward {path!r}: cannot import module {module_name!r}: {exc}") from exc
    obj = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward {path!r}: module {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward {path!r} is not callable")
    return obj


def resolve_component(component: RewardComponentSection) -> RewardFn:
    if component.fn not in REGISTRY and ":" not in component.fn:
        import raftlib.diffusion.rewards  # noqa: F401  (registers the image rewards on first use)
    if component.fn in REGISTRY:
        try:
            return REGISTRY[component.fn](**component.args)
        except TypeError as exc:
            raise RewardError(f"reward {component.fn!r}: bad args {component.args}: {exc}") from exc
    target = import_object(component.fn)
    if component.args:
        return target(**component.args)
    return target


@dataclass
class WeightedReward:
    """A weighted sum of named components. The total is None when any component is None for a sample."""

    components: list[tuple[str, float, RewardFn]]
    timeout_s: float | None = None
    """A component call taking longer than this raises RewardTimeout (`reward.timeout_s`)."""

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.components]

    def setup(self) -> None:
        for _, _, fn in self.components:
            if hasattr(fn, "setup"):
                fn.setup()

    def teardown(self) -> None:
        for _, _, fn in self.components:
            if hasattr(fn, "teardown"):
                fn.teardown()

    def score(self, *inputs: list[Any], **columns: list[Any]) -> Scores:
        """Score aligned lists: (prompts, completions) for text, (images, prompts) for images."""
        count = len(inputs[0])
        values: dict[str, list[float | None]] = {}
        for name, _, fn in self.components:
            output = call_reward(name, fn, inputs, columns, self.timeout_s)
            values[name] = check_reward_output(name, output, count)
        total: list[float | None] = []
        for i in range(count):
            parts = [(weight, values[name][i]) for name, weight, _ in self.components]
            if any(v is None for _, v in parts):
                total.append(None)
            else:
                total.append(sum(weight * v for weight, v in parts))
        return Scores(reward=total, components=values)


class RewardTimeout(RewardError):
    """A reward call ran past `reward.timeout_s`."""


def call_reward(
    name: str,
    fn: RewardFn,
    inputs: tuple[list[Any], ...],
    columns: dict[str, list[Any]],
    timeout_s: float | None = None,
) -> Any:
    """One reward call; an exception inside it becomes a RewardError naming the reward.

    With `timeout_s` the call runs in a daemon thread and is abandoned when it overruns: Python cannot
    kill a thread, so a hung reward keeps its thread (and whatever it holds) until the process exits,
    but the run stops with a clear error instead of waiting forever, and resuming later loses nothing.
    """
    if timeout_s is None:
        try:
            return fn(*inputs, **columns)
        except RewardError:
            raise
        except Exception as exc:
            raise RewardError(f"reward {name!r} raised {type(exc).__name__}: {exc}") from exc

    import threading

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*inputs, **columns)
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    worker = threading.Thread(target=target, name=f"reward-{name}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise RewardTimeout(
            f"reward {name!r} did not return within reward.timeout_s = {timeout_s:g} s "
            f"({len(inputs[0])} samples); the call was abandoned"
        )
    if "error" in box:
        error = box["error"]
        if isinstance(error, RewardError):
            raise error
        raise RewardError(f"reward {name!r} raised {type(error).__name__}: {error}") from error
    return box["value"]


def component_name(component: RewardComponentSection) -> str:
    if component.name:
        return component.name
    return component.fn.rsplit(":", 1)[-1].rsplit(".", 1)[-1]


def build_reward(section: RewardSection) -> WeightedReward:
    """The config's reward as one scorer (a single reward is a one-component mix of weight 1)."""
    parts = [(component_name(c), c.weight, resolve_component(c)) for c in section.components]
    names = [name for name, _, _ in parts]
    if len(set(names)) != len(names):
        raise RewardError(f"reward components need distinct names, got {names}; set `name` on each")
    return WeightedReward(parts, timeout_s=section.timeout_s)


def check_reward_output(name: str, values: Any, expected: int) -> list[float | None]:
    """Validate one reward call: a list of the right length of numbers or None.

    NaN and inf are kept as they came (selection excludes and counts them); strings, bools and
    other types are an error naming the reward and the index.
    """
    if isinstance(values, (str, bytes)) or (not isinstance(values, Sequence) and not hasattr(values, "tolist")):
        raise RewardError(f"reward {name!r} returned {type(values).__name__}; expected a list of floats or None")
    if hasattr(values, "tolist"):
        values = values.tolist()
    if len(values) != expected:
        raise RewardError(f"reward {name!r} returned {len(values)} values for {expected} completions")
    checked: list[float | None] = []
    for i, value in enumerate(values):
        if value is None:
            checked.append(None)
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RewardError(f"reward {name!r} returned {value!r} ({type(value).__name__}) at index {i}")
        else:
            checked.append(float(value))
    return checked


def is_valid_reward(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


# ----------------------------------------------------------------------------------------------
# The scoring stage
# ----------------------------------------------------------------------------------------------


def score_samples(
    reward: WeightedReward,
    samples: Sequence[Sample],
    columns_by_prompt: dict[int, dict[str, Any]],
    *,
    inputs: Callable[[Sequence[Any]], tuple[list[Any], ...]] | None = None,
    batch_size: int = 64,
    completed: dict[int, Scores] | None = None,
    on_batch=None,
    progress: bool = True,
    batch_indices: Sequence[int] | None = None,
) -> Scores:
    """Score samples in batches; batches in `completed` are reused, `on_batch(b, scores)` persists new ones.

    `inputs(batch)` gives the reward's positional arguments; the default is (prompts, completions).
    `batch_indices` scores only those batches (one process's shard); the result then holds only theirs.
    """
    inputs = inputs or (lambda batch: ([s.prompt for s in batch], [s.completion for s in batch]))
    from tqdm.auto import tqdm

    completed = completed or {}
    column_names = sorted({name for cols in columns_by_prompt.values() for name in cols})
    total: list[float | None] = []
    components: dict[str, list[float | None]] = {name: [] for name in reward.names}
    starts = range(0, len(samples), batch_size)
    wanted = set(range(len(starts)) if batch_indices is None else batch_indices)
    pending = [i for i, _ in enumerate(starts) if i not in completed and i in wanted]
    if pending:
        reward.setup()
    try:
        for index, start in enumerate(
            tqdm(starts, desc="score", unit="batch", disable=None if progress else True, leave=False)
        ):
            batch = samples[start : start + batch_size]
            if index not in wanted:
                continue
            if index in completed:
                scores = completed[index]
            else:
                columns = {
                    name: [columns_by_prompt.get(s.prompt_id, {}).get(name) for s in batch] for name in column_names
                }
                try:
                    scores = reward.score(*inputs(batch), **columns)
                except RewardError as exc:
                    saved = index if on_batch is not None else sum(1 for i in completed if i < index)
                    raise type(exc)(
                        f"{exc} -- while scoring batch {index} (samples {start}..{start + len(batch) - 1}, "
                        f"prompt ids {sorted({s.prompt_id for s in batch})[:8]}); "
                        f"{saved} earlier batches are saved: fix the reward and resume"
                    ) from exc
                if on_batch is not None:
                    on_batch(index, scores)
            total.extend(scores.reward)
            for name in reward.names:
                components[name].extend(scores.components[name])
    finally:
        if pending:
            reward.teardown()
    return Scores(reward=total, components=components)
