"""The configuration sections every RAFT run has, and how a config file is read and checked.

A config is a tree of frozen dataclasses, one per section. It is built from a YAML file plus dotted
``key=value`` overrides; unknown keys, wrong types and out-of-range values raise :class:`ConfigError`
naming the dotted key (and the YAML file and line when the value came from a file).

The language-model config (`raftlib.text.config.RAFTConfig`) and the image config
(`raftlib.diffusion.config.DiffusionConfig`) are built from these sections plus their own; `raftlib.config`
reads a file's `modality:` and picks one. Defaults follow the paper (Dong et al. 2023, Table 1 and §4): local ranking, temperature 1.0,
kl_coef 0, 2 epochs per stage, lr 2e-5 with linear decay, 128 new tokens, 2048 prompts per stage.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config value is missing, unknown or invalid. The message names the key."""


# ----------------------------------------------------------------------------------------------
# Sections. Every field has a one-line docstring (the string literal under it).
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSection:
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (effective scale alpha / r)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    target_modules: list[str] | None = None
    """Module names to adapt; None lets peft pick its default for the architecture."""

    def validate(self, key: str) -> None:
        require(self.r >= 1, f"{key}.r", self.r, "must be >= 1")
        require(self.alpha >= 1, f"{key}.alpha", self.alpha, "must be >= 1")
        require(0.0 <= self.dropout < 1.0, f"{key}.dropout", self.dropout, "must be in [0, 1)")


@dataclass(frozen=True)
class DataSection:
    prompts: str = ""
    """Prompt source: a .jsonl, .parquet or .csv file, or a Hugging Face dataset name/dir (required)."""
    prompt_column: str = "prompt"
    """Column holding the prompt text. Other columns reach the reward as keyword lists."""
    split: str = "train"
    """Dataset split, when `prompts` is a Hugging Face dataset."""
    eval_prompts: int = 64
    """Prompts held out (after a seeded shuffle) for the per-iteration held-out evaluation."""
    eval_file: str | None = None
    """Held-out prompts from a file of their own (.jsonl/.parquet/.csv, every row; same prompt column), e.g. a
    benchmark's test set; then `eval_prompts` must be 0 and every row of `prompts` trains."""
    reference_column: str | None = None
    """Column with reference responses; when set, eval reports their perplexity."""
    max_prompt_tokens: int | None = None
    """Keep only the last this-many prompt tokens (the paper cut HH-RLHF prompts to 256)."""

    def validate(self, key: str) -> None:
        require(bool(self.prompts), f"{key}.prompts", self.prompts, "is required")
        require(bool(self.prompt_column), f"{key}.prompt_column", self.prompt_column, "is empty")
        require(self.eval_prompts >= 0, f"{key}.eval_prompts", self.eval_prompts, "must be >= 0")
        if self.eval_file:
            require(self.eval_prompts == 0, f"{key}.eval_prompts", self.eval_prompts, "must be 0 with data.eval_file")
        if self.max_prompt_tokens is not None:
            require(self.max_prompt_tokens >= 1, f"{key}.max_prompt_tokens", self.max_prompt_tokens, "must be >= 1")


@dataclass(frozen=True)
class RewardComponentSection:
    fn: str = ""
    """Built-in reward name or a `module:function` path you wrote."""
    weight: float = 1.0
    """Weight of this component in the mix."""
    args: dict[str, Any] = field(default_factory=dict)
    """When given, `fn` is a factory: `fn(**args)` returns the reward callable."""
    name: str | None = None
    """Name of the component in logs and Parquet columns (default: derived from fn)."""

    def validate(self, key: str) -> None:
        require(bool(self.fn), f"{key}.fn", self.fn, "is required (a built-in name or module:function)")
        require(math.isfinite(self.weight), f"{key}.weight", self.weight, "must be finite")


@dataclass(frozen=True)
class RewardSection:
    fn: str | list[RewardComponentSection] = ""
    """A built-in name, a `module:function` path, or a list of {fn, weight, args, name} to mix (required)."""
    args: dict[str, Any] = field(default_factory=dict)
    """Factory arguments when `fn` is a single name or path."""
    batch_size: int = 64
    """Samples passed to the reward callable per call."""
    timeout_s: float | None = None
    """Fail a reward call that takes longer than this (seconds); None waits forever."""

    @property
    def components(self) -> list[RewardComponentSection]:
        """The reward as a list of weighted components (one component when `fn` is a string)."""
        if isinstance(self.fn, str):
            return [RewardComponentSection(fn=self.fn, weight=1.0, args=dict(self.args))]
        return list(self.fn)

    def validate(self, key: str) -> None:
        if isinstance(self.fn, str):
            require(bool(self.fn), f"{key}.fn", self.fn, "is required (a built-in name, module:function or a list)")
        else:
            require(len(self.fn) > 0, f"{key}.fn", self.fn, "is an empty list")
            require(not self.args, f"{key}.args", self.args, "must be given per component when fn is a list")
            names = []
            for i, component in enumerate(self.fn):
                component.validate(f"{key}.fn[{i}]")
                names.append(component.name or component.fn)
            require(len(set(names)) == len(names), f"{key}.fn", names, "has duplicate component names; set `name`")
        require(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "must be >= 1")
        if self.timeout_s is not None:
            require(self.timeout_s > 0, f"{key}.timeout_s", self.timeout_s, "must be > 0 (or null for no limit)")


@dataclass(frozen=True)
class SelectionSection:
    strategy: Literal["local", "global", "threshold", "count"] = "local"
    """local: best of K per prompt (paper default); global: top 1/K of the batch; threshold: key >= threshold;
    count: the `kept_counts[t - 1]` best of the batch at iteration t (a control matched to another run's counts)."""
    kl_coef: float = 0.0
    """beta of Eq. 5: rank by r - beta * log(pi_theta / pi_0). Changes the ranking only, never the loss."""
    keep_per_prompt: int = 1
    """local: how many of the K samples to keep per prompt."""
    threshold: float | None = None
    """threshold: keep every sample whose ranking key is >= this value."""
    max_kept: int | None = None
    """After the strategy, keep at most this many, best key first (the SD notebook: top 8 of 10 winners)."""
    kept_counts: list[int] | None = None
    """count: how many samples to keep at each iteration, e.g. the counts a threshold run kept, so a random control
    (a random reward) fine-tunes on exactly as many samples as the run it controls."""
    external_samples: str | None = None
    """A .jsonl/.parquet of extra (prompt_id, completion) candidates, e.g. a teacher's, added to the pool."""

    def validate(self, key: str) -> None:
        require(self.kl_coef >= 0.0, f"{key}.kl_coef", self.kl_coef, "must be >= 0")
        require(self.keep_per_prompt >= 1, f"{key}.keep_per_prompt", self.keep_per_prompt, "must be >= 1")
        if self.max_kept is not None:
            require(self.max_kept >= 1, f"{key}.max_kept", self.max_kept, "must be >= 1 (or null for no cap)")
        if self.strategy == "threshold":
            require(
                self.threshold is not None, f"{key}.threshold", self.threshold, "is required when strategy is threshold"
            )
        if self.strategy == "count":
            require(
                bool(self.kept_counts), f"{key}.kept_counts", self.kept_counts, "is required when strategy is count"
            )
            require(all(c >= 1 for c in self.kept_counts), f"{key}.kept_counts", self.kept_counts, "must all be >= 1")


@dataclass(frozen=True)
class TrainingSection:
    learning_rate: float = 2.0e-5
    """Peak learning rate (paper: 2e-5)."""
    epochs: int = 2
    """Passes over the kept set per iteration (paper: 2)."""
    micro_batch_size: int = 8
    """Kept samples per forward/backward."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    lr_scheduler: Literal["linear", "constant", "cosine"] = "linear"
    """Schedule within each iteration's fine-tune (paper: linear decay)."""
    warmup_ratio: float = 0.0
    """Fraction of each iteration's optimizer steps spent warming up."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision passed to accelerate."""
    packing: bool = False
    """Padding-free micro-batches: a micro-batch's samples are concatenated into one row whose position ids
    restart at each sample, so no step computes on padding. Same samples per step, same loss (language models)."""
    loss_chunk_tokens: int = 0
    """Chunked cross-entropy: logits only at completion positions, this many tokens at a time, each chunk
    recomputed in the backward pass, so a large vocabulary's logits never sit in memory at once; 0 = off."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about a third more compute)."""
    loss: str = "sft"
    """A name in `raftlib.text.losses.LOSSES` or a `module:name` factory you wrote. sft: cross-entropy on the kept
    set (RAFT); raftpp: RAFT++'s per-token ratio to the sampling policy, PPO-clipped (its log-probabilities taken
    once per stage). Every loss is summed over completion tokens and each optimizer step divided by its token
    count (`raftlib.finetune`)."""
    clip_range: float = 0.2
    """raftpp: clip the ratio below at 1 - clip_range (and above at 1 + clip_range unless clip_range_high)."""
    clip_range_high: float | None = None
    """raftpp: upper clip 1 + clip_range_high ("clip-higher", e.g. 0.28 with clip_range 0.2); None = clip_range."""

    def validate(self, key: str) -> None:
        require(self.clip_range >= 0.0, f"{key}.clip_range", self.clip_range, "must be >= 0")
        if self.clip_range_high is not None:
            require(self.clip_range_high >= 0.0, f"{key}.clip_range_high", self.clip_range_high, "must be >= 0")
        require(bool(self.loss), f"{key}.loss", self.loss, "is empty (a built-in loss name or module:name)")
        require(self.loss_chunk_tokens >= 0, f"{key}.loss_chunk_tokens", self.loss_chunk_tokens, "must be >= 0")
        require(self.learning_rate > 0.0, f"{key}.learning_rate", self.learning_rate, "must be > 0")
        require(self.epochs >= 1, f"{key}.epochs", self.epochs, "must be >= 1")
        require(self.micro_batch_size >= 1, f"{key}.micro_batch_size", self.micro_batch_size, "must be >= 1")
        require(
            self.gradient_accumulation_steps >= 1,
            f"{key}.gradient_accumulation_steps",
            self.gradient_accumulation_steps,
            "must be >= 1",
        )
        require(0.0 <= self.warmup_ratio < 1.0, f"{key}.warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        require(self.weight_decay >= 0.0, f"{key}.weight_decay", self.weight_decay, "must be >= 0")
        require(self.max_grad_norm >= 0.0, f"{key}.max_grad_norm", self.max_grad_norm, "must be >= 0")


@dataclass(frozen=True)
class LoopSection:
    iterations: int = 10
    """RAFT stages to run (paper: 10-18 until the reward converges)."""
    prompts_per_iteration: int = 2048
    """b: prompts sampled per stage (paper: 2048)."""
    eval_samples_per_prompt: int = 1
    """Completions per held-out prompt at each evaluation."""
    eval_every: int = 1
    """Evaluate after every this-many iterations (and after the last; the initial model always): 1 evaluates
    every iteration, a larger value saves the held-out generation of the others."""
    eval_kl: bool = True
    """Measure the held-out samples' KL to the initial model (text: one more forward per sample with pi_0)."""
    keep_checkpoints: int | None = None
    """Keep only the newest this-many iteration checkpoints (None keeps all; final/ is always written)."""
    process_group_timeout_minutes: float = 60.0
    """Several processes: how long a process waits at a collective for the others (torch.distributed timeout).
    The others wait while the main process alone selects (KL reference log-probs) and evaluates, so this must
    exceed those stages (`python -m raftlib plan` estimates them); NCCL's own default is 10 minutes."""
    pass_threshold: float | None = None
    """A held-out sample counts as correct when its reward is >= this (1.0 for a 0/1 verifier); when set, the
    evaluation reports eval_pass_at_1 and eval_pass_at_k (a None reward, e.g. an unparsable answer, is wrong)."""
    pass_k: int | None = None
    """k of eval_pass_at_k, at most eval_samples_per_prompt (None: eval_samples_per_prompt); the unbiased
    estimator of Chen et al. 2021 from the n = eval_samples_per_prompt samples of each prompt."""

    def validate(self, key: str) -> None:
        require(
            self.process_group_timeout_minutes > 0,
            f"{key}.process_group_timeout_minutes",
            self.process_group_timeout_minutes,
            "must be > 0",
        )
        require(self.iterations >= 1, f"{key}.iterations", self.iterations, "must be >= 1")
        require(self.eval_every >= 1, f"{key}.eval_every", self.eval_every, "must be >= 1")
        require(
            self.prompts_per_iteration >= 1, f"{key}.prompts_per_iteration", self.prompts_per_iteration, "must be >= 1"
        )
        require(
            self.eval_samples_per_prompt >= 1,
            f"{key}.eval_samples_per_prompt",
            self.eval_samples_per_prompt,
            "must be >= 1",
        )
        if self.keep_checkpoints is not None:
            require(self.keep_checkpoints >= 1, f"{key}.keep_checkpoints", self.keep_checkpoints, "must be >= 1")
        if self.pass_k is not None:
            require(
                1 <= self.pass_k <= self.eval_samples_per_prompt,
                f"{key}.pass_k",
                self.pass_k,
                f"must be in [1, eval_samples_per_prompt = {self.eval_samples_per_prompt}]",
            )


@dataclass(frozen=True)
class LoggingSection:
    tensorboard: bool = True
    """Also log metrics to TensorBoard through accelerate's trackers (RUN/tensorboard)."""
    progress_bars: bool = True
    """tqdm progress bars (terminal and Jupyter) on generation, scoring, fine-tuning and eval."""
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of the `raftlib` logger."""

    def validate(self, key: str) -> None:
        """Every value is already type-checked; nothing range-bound here."""


class ConfigFile:
    """Shared by the top-level configs (RAFTConfig, DiffusionConfig): derived sizes, YAML, dicts, overrides.

    Both have generation.samples_per_prompt, selection, training and loop sections.
    """

    # -- derived quantities ---------------------------------------------------------------------

    @property
    def samples_per_iteration(self) -> int:
        return self.loop.prompts_per_iteration * self.generation.samples_per_prompt

    @property
    def kept_per_iteration(self) -> int | None:
        """Upper bound on kept samples per iteration (None for threshold selection: data-dependent)."""
        if self.selection.strategy == "local":
            kept = self.loop.prompts_per_iteration * min(
                self.selection.keep_per_prompt, self.generation.samples_per_prompt
            )
        elif self.selection.strategy == "global":
            kept = self.loop.prompts_per_iteration
        elif self.selection.strategy == "count":
            kept = max(self.selection.kept_counts)
        else:
            return self.selection.max_kept
        return kept if self.selection.max_kept is None else min(kept, self.selection.max_kept)

    @property
    def optimizer_steps_per_iteration(self) -> int | None:
        kept = self.kept_per_iteration
        if kept is None:
            return None
        micro_batches = math.ceil(kept / self.training.micro_batch_size)
        return self.training.epochs * math.ceil(micro_batches / self.training.gradient_accumulation_steps)

    def derived(self) -> dict[str, int | None]:
        """Sizes implied by the config, logged at the start of every run."""
        return {
            "samples_per_iteration": self.samples_per_iteration,
            "kept_per_iteration": self.kept_per_iteration,
            "optimizer_steps_per_iteration": self.optimizer_steps_per_iteration,
        }

    # -- construction ---------------------------------------------------------------------------

    def validate(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)
        require(bool(self.output_dir), "output_dir", self.output_dir, "is empty")
        # An optional package a setting asks for: named here, before any model loads (accelerate would drop a
        # missing tracker without a word; peft would fail minutes in, at the first fine-tune).
        require_package(self.logging.tensorboard, "tensorboard", "logging.tensorboard", True, "tensorboard")
        lora = getattr(self.model, "lora", None)
        require_package(lora is not None, "peft", "model.lora", lora, "lora")
        if self.selection.strategy == "count":
            counts = self.selection.kept_counts
            require(
                len(counts) >= self.loop.iterations,
                "selection.kept_counts",
                counts,
                f"holds {len(counts)} counts for {self.loop.iterations} iterations (loop.iterations)",
            )
        return self

    @classmethod
    def from_dict(cls, raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), *, source: str = "<dict>"):
        """Build from a plain dict, apply dotted overrides, type-check and validate."""
        return _build_config(cls, raw, list(overrides), source=source, lines={})

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()):
        """Read a YAML config; errors name the file, line and key."""
        raw, node = read_yaml(Path(path))
        return _build_config(cls, raw, list(overrides), source=str(path), lines=_key_lines(node))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=ConfigDumper, sort_keys=False)

    def replace(self, overrides: list[str] | tuple[str, ...]):
        """A copy with dotted overrides applied (validated)."""
        return _build_config(type(self), self.to_dict(), list(overrides), source="<config>", lines={})


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that `2e-4` and `1E5` are numbers.

    PyYAML follows YAML 1.1, whose float needs a dot and a signed exponent (`2.0e-4`), so `2e-4` arrived as the
    string "2e-4" and a learning rate typed that way was refused. YAML 1.2, Python and every config a researcher
    copies from write it without the dot.
    """


# A float without a dot (`2e-4`, `1E5`); `.5e3` needs a digit after the dot, so `._e5` stays a string.
_DOTLESS_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")


class ConfigDumper(yaml.SafeDumper):
    """PyYAML's safe dumper, except that it quotes the strings `ConfigLoader` would read as numbers.

    Without it a string such as "1234e56" would be written bare and read back as a float.
    """


for _yaml_class in (ConfigLoader, ConfigDumper):
    _yaml_class.yaml_implicit_resolvers = {
        first: list(resolvers) for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    # Appended after the 1.1 resolvers, so an integer (`8`) and a dotted float still resolve as before.
    _yaml_class.add_implicit_resolver("tag:yaml.org,2002:float", _DOTLESS_FLOAT, list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """`yaml.safe_load` with `ConfigLoader`: what every config file, override and notebook parameter is read with."""
    return yaml.load(text, Loader=ConfigLoader)  # a SafeLoader: no arbitrary objects


def read_yaml(path: Path) -> tuple[dict[str, Any], yaml.Node | None]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc})") from None
    try:
        node = yaml.compose(text, Loader=ConfigLoader)
        raw = load_yaml(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {exc.problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw, node


# ----------------------------------------------------------------------------------------------
# Building and checking
# ----------------------------------------------------------------------------------------------


def require(ok: bool, key: str, value: Any, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r}: {message}")


def require_package(asked: bool, module: str, key: str, value: Any, extra: str) -> None:
    """When a setting asks for an optional package, it must import; else the error names the install command."""
    import importlib.util

    if asked and importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"{key} = {value!r} needs the {module} package, which is not installed: "
            f"pip install 'raftlib[{extra}]' (or pip install {module}); or leave the setting off"
        )


def parse_override(override: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected dotted.key=value")
    key, _, text = override.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r}: empty key")
    try:
        value = load_yaml(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {override!r}: value is not valid YAML ({exc})") from None
    return key.split("."), value


def _apply_override(top: type, raw: dict[str, Any], parts: list[str], value: Any, override: str) -> None:
    node = raw
    cls: Any = top
    for depth, part in enumerate(parts):
        known = {f.name: f for f in dataclasses.fields(cls)} if cls is not None else None
        dotted = ".".join(parts[: depth + 1])
        if known is not None and part not in known:
            raise ConfigError(f"override {override!r}: unknown key {dotted!r} (known: {', '.join(sorted(known))})")
        if depth == len(parts) - 1:
            node[part] = value
            return
        field_type = _unwrap_optional(_hints(cls)[part]) if known is not None else None
        cls = field_type if dataclasses.is_dataclass(field_type) else None
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {dotted!r} is not a section")
        node = child


def _build_config(top: type, raw: dict[str, Any], overrides: list[str], *, source: str, lines: dict[str, int]):
    import copy

    raw = copy.deepcopy(raw)
    overridden: dict[str, str] = {}
    for override in overrides:
        parts, value = parse_override(override)
        _apply_override(top, raw, parts, value, override)
        overridden[".".join(parts)] = override
    try:
        config = _build(top, raw, prefix="", lines=lines, source=source)
        return config.validate()
    except ConfigError as exc:
        raise ConfigError(_locate(str(exc), source, lines, overridden)) from None


def _locate(message: str, source: str, lines: dict[str, int], overridden: dict[str, str]) -> str:
    """Say where the offending value came from: the override that set it, or file:line in the YAML."""
    key = message.split(" ", 1)[0].rstrip(":")
    for prefix in [key] + [key.rsplit(".", n)[0] for n in range(1, key.count(".") + 1)]:
        if prefix in overridden:
            return f"{message} (from override {overridden[prefix]!r})"
    line = lines.get(key)
    while line is None and "." in key:
        key = key.rsplit(".", 1)[0]
        line = lines.get(key)
    if line is not None:
        return f"{source}:{line}: {message}"
    if source not in ("<dict>", "<config>"):
        return f"{source}: {message}"
    return message


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _unwrap_optional(tp: Any) -> Any:
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _build(cls: type, raw: Any, *, prefix: str, lines: dict[str, int], source: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} = {raw!r}: expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"{key}: unknown key (known in this section: {', '.join(sorted(fields))})")
    values = {}
    hints = _hints(cls)
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, key=f"{prefix}{name}", lines=lines, source=source)
    return cls(**values)


def _coerce(tp: Any, value: Any, *, key: str, lines: dict[str, int], source: str) -> Any:
    """Check `value` against the annotation `tp`; build nested sections. Ints widen to floats."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key=key, lines=lines, source=source)
            except ConfigError as exc:
                errors.append(str(exc))
        # A nested section's own error (e.g. an unknown key inside it) is more useful than "wrong type".
        nested = [e for e in errors if not e.startswith(f"{key} = ")]
        if nested:
            raise ConfigError(nested[0])
        raise ConfigError(f"{key} = {value!r}: expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if value is None:
            raise ConfigError(f"{key} = None: expected a mapping")
        return _build(tp, value, prefix=f"{key}.", lines=lines, source=source)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key} = {value!r}: expected one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} = {value!r}: expected a list")
        (item_type,) = typing.get_args(tp)
        return [_coerce(item_type, v, key=f"{key}[{i}]", lines=lines, source=source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r}: expected a mapping")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r}: expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"{key} = {value!r}: expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r}: expected a string")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module, not user input


def _type_name(tp: Any) -> str:
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    origin = typing.get_origin(tp)
    if origin is list:
        return "a list"
    return getattr(tp, "__name__", str(tp))


def _key_lines(node: yaml.Node | None, prefix: str = "") -> dict[str, int]:
    """Map every dotted key in a composed YAML tree to its 1-based line number."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            lines[dotted] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, f"{dotted}."))
    elif isinstance(node, yaml.SequenceNode):
        base = prefix.rstrip(".")
        for i, item in enumerate(node.value):
            lines[f"{base}[{i}]"] = item.start_mark.line + 1
            lines.update(_key_lines(item, f"{base}[{i}]."))
    return lines
