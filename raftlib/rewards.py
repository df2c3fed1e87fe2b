"""Reward plug-ins: how a config's `reward` becomes one weighted scorer.

A reward is a plain callable (TRL's contract):

    def my_reward(prompts: list[str], completions: list[str], **columns) -> list[float | None]

Extra data columns arrive as keyword lists aligned with the completions. `None` means "could not
score": never kept, always counted. A config names a reward by built-in name or by a `module:function`
path you wrote; with `args` the named object is a *factory* called once as `fn(**args)` to build the
callable (it can load a scorer once and return a closure).

A callable may also define `setup()` and `teardown()`: the scoring stage calls them around each
scoring pass, which is how the reward model is loaded to score and freed afterwards, so that only one
large model is resident at a time.

Built-in names resolve lazily through `BUILT_INS` (name -> `module:factory`): the text rewards live in
`raftlib.text.rewards`, the image rewards in `raftlib.diffusion.rewards`, and this module imports neither, so
scoring text never loads CLIP and neither side imports the other. The scoring stage, which runs a scorer over
samples in resumable batches, is `raftlib.scoring`.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from raftlib.records import Scores
from raftlib.sections import RewardComponentSection, RewardSection

logger = logging.getLogger(__name__)


class RewardFn(Protocol):
    def __call__(self, prompts: list[str], completions: list[str], **columns: list[Any]) -> list[float | None]: ...


class RewardError(ValueError):
    """A reward could not be resolved, or returned something unusable; the message names it."""


BUILT_INS: dict[str, str] = {
    "length": "raftlib.text.rewards:length_reward",
    "exact_answer": "raftlib.text.rewards:exact_answer_reward",
    "reward_model": "raftlib.text.rewards:reward_model",
    "clip_score": "raftlib.diffusion.rewards:clip_score",
    "aesthetic": "raftlib.diffusion.rewards:aesthetic",
    "jpeg_compressibility": "raftlib.diffusion.rewards:jpeg_compressibility",
    "classifier_probability": "raftlib.diffusion.rewards:classifier_probability",
}
"""The built-in reward factories by config name, imported on first use."""

REGISTRY: dict[str, Callable[..., RewardFn]] = {}
"""Factories registered in code with `@register(name)`: `REGISTRY[name](**args)` returns a reward callable.
A registered name shadows a built-in of the same name."""


def register(name: str):
    """Make `name` usable as `reward.fn` in a config, for a factory defined in your own code."""

    def decorate(factory):
        REGISTRY[name] = factory
        return factory

    return decorate


def reward_names() -> list[str]:
    """Every name `reward.fn` accepts without a `module:function` path."""
    return sorted(set(BUILT_INS) | set(REGISTRY))


# ----------------------------------------------------------------------------------------------
# Resolving a config into one scorer
# ----------------------------------------------------------------------------------------------


def import_object(path: str, what: str = "reward") -> Any:
    """`package.module:attribute` -> the object. Only explicit paths the user wrote are imported; errors name the
    setting as `what` (a reward, `training.loss`, a classifier)."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        if what == "reward":
            raise RewardError(
                f"reward {path!r} is neither a built-in ({', '.join(reward_names())}) nor a module:function path"
            )
        raise RewardError(f"{what} {path!r}: expected a module:name path")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RewardError(f"{what} {path!r}: cannot import module {module_name!r}: {exc}") from exc
    obj = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"{what} {path!r}: module {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"{what} {path!r} is not callable")
    return obj


def resolve_component(component: RewardComponentSection) -> RewardFn:
    factory = REGISTRY.get(component.fn)
    if factory is None and component.fn in BUILT_INS:
        factory = import_object(BUILT_INS[component.fn])
    if factory is not None:
        try:
            return factory(**component.args)
        except TypeError as exc:
            raise RewardError(f"reward {component.fn!r}: bad args {component.args}: {exc}") from exc
    target = import_object(component.fn)
    if component.args:
        return target(**component.args)
    return target


@dataclass
class WeightedReward:
    """A weighted sum of named components. The total is None when any weighted component is None for a sample;
    a component of weight 0 is only recorded (its column in the Parquet rows), so its None changes nothing."""

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
            parts = [(weight, values[name][i]) for name, weight, _ in self.components if weight != 0]
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
