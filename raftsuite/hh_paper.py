"""The `paper` profile of the HH-RLHF notebook: Anthropic/hh-rlhf, a hub policy and a hub reward model.

It cannot run here (no hub access, no GPU). Every id is a notebook parameter, and the same code runs
in the tests on local dirs shaped like the hub's (a dataset dir of HH-format rows, tiny model dirs),
so the path is exercised even though the paper-scale run is not.

HH-RLHF rows are whole dialogues: `"\\n\\nHuman: ...\\n\\nAssistant: ..."` in `chosen` and `rejected`. The
prompt is everything up to and including the last `"\\n\\nAssistant:"`; the response is the rest.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from raftlib.config import ModelSection, TrainingSection
from raftlib.data import DataError
from raftlib.records import Prompt
from raftlib.store import atomic_write_text
from raftlib.text.finetune import finetune
from raftlib.text.models import load_policy, load_tokenizer, save_model
from raftsuite import children

logger = logging.getLogger(__name__)

ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"

SUBSETS: dict[str, tuple[str, ...]] = {
    # Which HH data the authors' RM saw is not settled offline: the secondary write-ups of the paper say the
    # helpful subset; the RM card's July 2023 revisions name Dahoas/full-hh-rlhf (112K / 12.5K comparisons, the
    # paper's counts) and say SFT and RM training also used the first 6,275 test rows (docs/paper.md).
    # The profiles choose `helpful`; `subset` makes the other readings one parameter away.
    "helpful": ("helpful-base", "helpful-online", "helpful-rejection-sampled"),
    "harmless": ("harmless-base",),
    "all": ("helpful-base", "helpful-online", "helpful-rejection-sampled", "harmless-base"),
}
"""`subset` names -> HH-RLHF data dirs. red-team-attempts is left out: it has transcripts, not chosen/rejected."""
DATA_DIRS = SUBSETS["all"]


def resolve_subset(subset: str) -> tuple[str, ...]:
    """A `subset` parameter (helpful | harmless | all, or comma-separated data dirs) as HH-RLHF data dirs."""
    if subset in SUBSETS:
        return SUBSETS[subset]
    dirs = tuple(d.strip() for d in subset.split(",") if d.strip())
    unknown = [d for d in dirs if d not in DATA_DIRS]
    if not dirs or unknown:
        raise ValueError(
            f"subset = {subset!r}: unknown {', '.join(unknown) or 'empty value'}; use one of "
            f"{', '.join(SUBSETS)} or comma-separated data dirs of {', '.join(DATA_DIRS)}"
        )
    return dirs


def split_dialogue(text: str) -> tuple[str, str]:
    """(prompt ending in '\\n\\nAssistant:', response) of one HH-RLHF dialogue."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise DataError(f"not an HH-RLHF dialogue (no {ASSISTANT!r}): {text[:80]!r}")
    return text[: cut + len(ASSISTANT)], text[cut + len(ASSISTANT) :]


def read_hh(dataset: str, split: str, subset: str = "helpful") -> list[dict[str, Any]]:
    """The rows of one split of the chosen HH-RLHF data dirs (`datasets.load_dataset(dataset, data_dir=...)`)."""
    import datasets

    rows = []
    for data_dir in resolve_subset(subset):
        try:
            part = datasets.load_dataset(dataset, data_dir=data_dir, split=split)
        except Exception as exc:  # datasets raises many types for a missing dir, split or file
            raise DataError(f"dataset = {dataset!r}, subset dir {data_dir!r}, split {split!r}: {exc}") from exc
        rows += part.to_list()
    return rows


def hh_prompts(
    dataset: str,
    split: str,
    tokenizer,
    max_prompt_tokens: int = 256,
    limit: int | None = None,
    *,
    subset: str = "helpful",
    exclude: set[str] | frozenset[str] = frozenset(),
) -> list[dict[str, str]]:
    """Prompts and chosen responses of HH-RLHF; prompts over `max_prompt_tokens` are dropped, as in the
    paper, and so are repeated prompts and prompts in `exclude` (the test split repeats train dialogues);
    then the first `limit` (e.g. the paper's 4,608 test prompts)."""
    out, seen = [], set(exclude)
    for row in read_hh(dataset, split, subset):
        prompt, chosen = split_dialogue(row["chosen"])
        if prompt in seen:
            continue
        seen.add(prompt)
        if len(tokenizer(prompt)["input_ids"]) <= max_prompt_tokens:
            # the continuation as the dialogue writes it after "Assistant:" (its leading space included): SFT
            # trains on these ids and the perplexity scores the same ids (sft_example)
            out.append({"prompt": prompt, "reference": chosen.rstrip()})
            if limit and len(out) == limit:
                break
    return out


# ----------------------------------------------------------------------------------------------
# The reward model's input format
# ----------------------------------------------------------------------------------------------


def open_llama_rm_format(prompt: str, completion: str) -> str:
    """HH text as `weqweasdas/hh_rlhf_rm_open_llama_3b` was trained to read it.

    Its model card scores texts such as (the card's own example, shortened):

        "###Human: My daughter wants to know how to convert fractions to decimals, but I'm not sure how to
        explain it. Can you help? ###Assistant: Sure. So one way of converting fractions to decimals is ..."

    i.e. each `\\n\\nHuman: ` turn becomes `###Human: `, each `\\n\\nAssistant: ` turn ` ###Assistant: `
    (one space before `###`, none at the start), with no chat template. The card's preprocessing section says
    `\n\nHuman` and `\n\nAssistant` were replaced by `###Human` and `###Assistant` before training; its usage
    example (above) has the space before `###`, and that is what we send.
    """
    text = re.sub(r"\s*\n\nHuman:\s*", " ###Human: ", prompt + completion)
    text = re.sub(r"\s*\n\nAssistant:\s*", " ###Assistant: ", text)
    return text.strip()


def raw_format(prompt: str, completion: str) -> str:
    """prompt + completion unchanged (the tiny profile's reward model was trained on exactly this)."""
    return prompt + completion


FORMATTERS: dict[str, Callable[[str, str], str]] = {"open_llama_hh": open_llama_rm_format, "raw": raw_format}
"""Named reward-model input formats; the reward config names one (`reward.args.formatter`)."""


class FormattedRewardModel:
    """raftlib's `RewardModelScorer` fed texts built by a named formatter (never the tokenizer's chat template)."""

    def __init__(self, path: str, formatter: str = "open_llama_hh", **kwargs: Any) -> None:
        from raftlib.text.rewards import RewardModelScorer

        if formatter not in FORMATTERS:
            raise ValueError(f"reward.args.formatter = {formatter!r}: known formatters {', '.join(FORMATTERS)}")
        self.format = FORMATTERS[formatter]
        self.scorer = RewardModelScorer(path, use_chat_template=False, **kwargs)

    def setup(self) -> None:
        self.scorer.setup()

    def teardown(self) -> None:
        self.scorer.teardown()

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
        texts = [self.format(p, c) for p, c in zip(prompts, completions, strict=True)]
        return self.scorer(texts, [""] * len(texts))


def formatted_reward_model(path: str, formatter: str = "open_llama_hh", **kwargs: Any) -> FormattedRewardModel:
    """Reward factory for configs: `reward: {fn: raftsuite.hh_paper:formatted_reward_model, args: {path,
    formatter, dtype, batch_size}}`."""
    return FormattedRewardModel(path, formatter, **kwargs)


# ----------------------------------------------------------------------------------------------
# The setup: prompts (train / test) and the SFT policy, built once per settings and shared
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaperSetup:
    sft_model: Path | str
    reward_model: str
    prompts: Path
    """Train-split prompts only: RAFT's prompts (its per-iteration eval holds out some of them)."""
    eval_prompts_file: Path
    """Test-split prompts only, none of them a train prompt: the notebooks' evaluation set."""
    train_prompts: int
    eval_prompts: int
    seconds: float


def test_prompts(setup: PaperSetup) -> list[Prompt]:
    """The evaluation prompts (test split) as raftlib Prompt records with their `reference` column."""
    return read_test_prompts(setup.eval_prompts_file)


def read_test_prompts(path: Path) -> list[Prompt]:
    """A setup's eval_prompts.jsonl as Prompt records (prompt_id = row, the `reference` column kept)."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [Prompt(prompt_id=i, text=r["prompt"], columns={"reference": r["reference"]}) for i, r in enumerate(rows)]


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive lock file: a second notebook started at once waits here, then reuses the build."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@dataclass(frozen=True)
class PaperSetupRequest:
    """What the HH-RLHF setup is built from (`prepare_paper_setup`): the build is cached by these values."""

    policy_model: str
    dataset: str
    reward_model: str
    sft_model: str = ""
    subset: str = "helpful"
    max_prompt_tokens: int = 256
    sft_examples: int | None = None
    sft_learning_rate: float = 2e-5
    sft_micro_batch_size: int = 8
    eval_prompts: int = 4608
    train_limit: int | None = None
    policy_dtype: str = "bfloat16"
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = False
    num_processes: int = 1
    sft_accelerate_config: str = ""


def sft_example(tokenizer, row: Mapping[str, str]) -> list[list[int]]:
    """[prompt ids, completion ids] of one SFT example: the prompt as RAFT encodes HH text (no template, the
    tokenizer's BOS), then the reference's ids exactly as `reference_perplexity` scores them, then the EOS (SFT
    teaches the model to stop; the runs' `eval_reference_ppl` scores the response text alone, without it)."""
    completion = tokenizer(row["reference"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [tokenizer(row["prompt"])["input_ids"], completion]


PAPER_SETUP_FORMAT = 2
"""Part of a setup's cache key: raised when what a setup holds changes for the same request (2: references keep
their leading space, the reward model as safetensors), so a setup built by older code is rebuilt, not reused."""


def prepare_paper_setup(directory: str | Path, request: PaperSetupRequest, progress: bool = True) -> PaperSetup:
    """HH-RLHF prompts (train and test kept apart), and the SFT policy: `sft_model` if given, else one epoch of
    SFT of `policy_model` on HH-RLHF chosen responses (the paper's LLaMA-7B-SFT), in its own process(es)
    (`sft_child`: fp32 master weights, `mixed_precision` autocast, `num_processes` under `sft_accelerate_config`).

    Built once per settings under `directory` (every notebook of a profile passes the same one): under an
    exclusive lock, into a temporary dir renamed into place, with setup.json written last; a second caller
    with the same settings (even one started at the same moment) reuses it.
    """
    directory = Path(directory)
    resolve_subset(request.subset)  # a wrong subset fails before anything loads
    settings = asdict(request) | {"setup_format": PAPER_SETUP_FORMAT}
    record = directory / "setup.json"
    with _exclusive(directory.parent / f".{directory.name}.lock"):
        if record.is_file():
            saved = json.loads(record.read_text(encoding="utf-8"))
            if saved["settings"] == settings:
                logger.info("reusing the HH-RLHF setup in %s", directory)
                return _paper_setup_from_record(saved)
            logger.info("%s was built with other settings: rebuilding it", directory)
        tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        setup = _build_paper_setup(tmp, settings, progress)
        old = directory.with_name(f"{directory.name}.old-{os.getpid()}")
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
        setup = PaperSetup(
            **{k: _moved(v, tmp, directory) if isinstance(v, Path) else v for k, v in asdict(setup).items()}
        )
        for field, name in (("sft_model", "sft"), ("reward_model", REWARD_MODEL_DIR)):  # built here: moved too
            if str(getattr(setup, field)) == str(tmp / name):
                setup = PaperSetup(**(asdict(setup) | {field: str(directory / name)}))
        body = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(setup).items()}
        atomic_write_text(record, json.dumps({"settings": settings, "setup": body}, indent=2) + "\n")
        return setup


def _moved(path: Path, old: Path, new: Path) -> Path:
    return new / path.relative_to(old) if path.is_relative_to(old) else path


def _paper_setup_from_record(saved: dict[str, Any]) -> PaperSetup:
    body = saved["setup"]
    paths = {"prompts", "eval_prompts_file"}
    return PaperSetup(**{k: Path(v) if k in paths else v for k, v in body.items()})


def _build_paper_setup(directory: Path, settings: dict[str, Any], progress: bool) -> PaperSetup:
    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    policy_model, sft_model = settings["policy_model"], settings["sft_model"]
    tokenizer = load_tokenizer(ModelSection(path=sft_model or policy_model))
    dataset, subset, cut = settings["dataset"], settings["subset"], settings["max_prompt_tokens"]
    train = hh_prompts(dataset, "train", tokenizer, cut, settings["train_limit"], subset=subset)
    # The evaluation set is the test split only, less any prompt that is also a train prompt.
    train_texts = {r["prompt"] for r in hh_prompts(dataset, "train", tokenizer, 10**9, subset=subset)}
    test = hh_prompts(dataset, "test", tokenizer, cut, settings["eval_prompts"], subset=subset, exclude=train_texts)
    prompts, eval_file = directory / "prompts.jsonl", directory / "eval_prompts.jsonl"
    for path, rows in ((prompts, train), (eval_file, test)):
        with open(path, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    if not sft_model:
        rows = train[: settings["sft_examples"]] if settings["sft_examples"] else train
        examples = directory / "sft_examples.jsonl"
        with open(examples, "w", encoding="utf-8") as handle:  # the raw HH text, as RAFT reads it (no template)
            for r in rows:
                handle.write(json.dumps(sft_example(tokenizer, r)) + "\n")
        training = {
            "learning_rate": settings["sft_learning_rate"],
            "epochs": 1,
            "micro_batch_size": settings["sft_micro_batch_size"],
            "mixed_precision": settings["mixed_precision"],
            "gradient_checkpointing": settings["gradient_checkpointing"],
        }
        job = {
            "policy_model": policy_model,
            "examples": str(examples),
            "training": training,
            "output_dir": str(directory / "sft"),
            "progress": progress,
        }
        # Its own process(es): the kernel never holds the SFT's GPU memory when the RAFT workers start, and a 7B
        # full fine-tune (fp32 masters: 16 bytes per parameter) can shard over FSDP (`sft_accelerate_config`).
        children.run_in_child(
            "raftsuite.hh_paper:sft_child",
            {"job": job},
            directory / "sft.child.json",
            directory / "sft.log",
            num_processes=settings["num_processes"],
            accelerate_config=settings["sft_accelerate_config"],
        )
        sft_model = str(directory / "sft")
    return PaperSetup(
        sft_model=sft_model,
        reward_model=safetensors_reward_model(settings["reward_model"], directory),
        prompts=prompts,
        eval_prompts_file=eval_file,
        train_prompts=len(train),
        eval_prompts=len(test),
        seconds=time.perf_counter() - started,
    )


REWARD_MODEL_DIR = "reward_model"
"""Under a setup: the reward model with safetensors weights, when its source ships only a pytorch_model.bin."""


def safetensors_reward_model(source: str, directory: Path) -> str:
    """The reward model as every stage loads it: `source` when it ships safetensors weights, else a copy under
    DIRECTORY/reward_model converted once here, its weights as model.safetensors in their own dtype and every other
    file (tokenizer.model included: the sentencepiece check reads it) as it was.

    The authors' RM (weqweasdas/hh_rlhf_rm_open_llama_3b) ships only a 6.65 GB pytorch_model.bin (its safetensors
    sit on refs/pr/2, which nothing here pins): each score and evaluation stage, on every rank, would unpickle it
    into memory again; a safetensors file is mapped instead. A hub id is downloaded once (`snapshot_download`).
    """
    from transformers import AutoModelForSequenceClassification

    def needs_converting(names) -> bool:  # no safetensors, and a pickled checkpoint to convert
        names = [Path(n).name for n in names]
        pickled = any(n.startswith("pytorch_model") and n.endswith(".bin") for n in names)
        return pickled and not any(n.endswith(".safetensors") for n in names)

    root = Path(source).expanduser()
    if not root.is_dir():
        from huggingface_hub import list_repo_files, snapshot_download

        if not needs_converting(list_repo_files(source)):
            return source  # the runs' own loads fetch what they need; nothing is downloaded twice
        root = Path(snapshot_download(source))
    if not needs_converting(p.name for p in root.iterdir()):
        return source  # already mapped, or no weights to convert (the loader then names what is missing)
    target = directory / REWARD_MODEL_DIR
    target.mkdir(parents=True, exist_ok=True)
    for path in root.iterdir():
        if path.is_file() and not path.name.startswith("pytorch_model") and path.name != "config.json":
            shutil.copy2(path, target / path.name)
    started = time.perf_counter()
    model, info = AutoModelForSequenceClassification.from_pretrained(root, dtype="auto", output_loading_info=True)
    if info.get("missing_keys"):  # a causal LM's .bin gets a random score head: saved, it would pass as trained
        from raftlib.hub import ModelLoadError

        raise ModelLoadError(
            f"reward model {source!r} lacks trained weights for {', '.join(sorted(info['missing_keys']))}; is it "
            "a causal LM or base model rather than a sequence-classification reward model?"
        )
    model.save_pretrained(target, safe_serialization=True)
    logger.info(
        "reward model %s: weights converted to safetensors in %s (%.0f s)",
        source,
        target,
        time.perf_counter() - started,
    )
    return str(target)


def sft_child(job: dict[str, Any]) -> None:
    """One epoch of SFT on HH-RLHF chosen responses (in a child; every worker under `accelerate launch`).

    The weights load in float32 whatever the RAFT policy's dtype: they are the optimizer's master weights, under
    `training.mixed_precision` autocast (bf16 on a GPU). Pure-bf16 AdamW would round away most updates at lr 2e-5
    (raftlib.finetune warns when a fine-tune's trainable weights are not float32). Under an FSDP launch the
    weights are gathered once to the main process, which writes the model.
    """
    from raftlib.sharding import build_accelerator, full_state_dict, is_sharded

    section = TrainingSection(**job["training"])
    accelerator = build_accelerator(section)
    tokenizer = load_tokenizer(ModelSection(path=job["policy_model"]))
    policy = load_policy(ModelSection(path=job["policy_model"], dtype="float32"), device=accelerator.device)
    with open(job["examples"], encoding="utf-8") as handle:
        examples = [tuple(json.loads(line)) for line in handle]
    policy, _ = finetune(
        policy,
        examples,
        section,
        pad_id=tokenizer.pad_token_id,
        seed=0,
        iteration=0,
        accelerator=accelerator,
        progress=job["progress"],
    )
    weights = full_state_dict(policy) if is_sharded(accelerator) else None
    if accelerator.is_main_process:
        save_model(policy, tokenizer, Path(job["output_dir"]), state_dict=weights)
    accelerator.wait_for_everyone()
    del policy, weights
    accelerator.free_memory()


def paper_reference_rows() -> dict[str, dict[str, Any]]:
    """Table 3 of the paper (HH-RLHF, LLaMA-7B), from the secondary write-ups in docs/paper.md."""
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
