"""The HH-RLHF experiment in miniature (paper §4, Table 3), offline.

The paper: LLaMA-7B → SFT on HH-RLHF chosen responses → a Bradley-Terry reward model (Open-LLaMA-3B,
75.48% validation accuracy) → RAFT against that reward, compared with PPO and SFT.

The tiny stand-in, same shape:
- prompts: sentence openings written for the suite (notebooks/data/openings.jsonl);
- a hidden *gold* preference (VADER sentiment of the continuation plus a fluency term) plays the
  human labellers: it labels pairs sampled from the base model, and it scores the final models, but
  RAFT never sees it;
- SFT on the preferred continuations; a Bradley-Terry reward model (GPT-2 sequence classifier
  initialised from the base model) trained on the pairs: the *proxy* reward RAFT optimises;
- baselines: the SFT model, best-of-K at inference, SFT on random samples (same count, no ranking),
  and TRL's GRPO at an equal sample budget (TRL no longer ships PPO).

Everything here is a plain function the notebooks call; all models are Hugging Face dirs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raftlib import metrics as M
from raftlib.batches import Batches
from raftlib.config import DataSection, GenerationSection, ModelSection, TrainingSection
from raftlib.data import load_prompts
from raftlib.records import Prompt, Sample
from raftlib.text.finetune import finetune
from raftlib.text.generate import Draw, generate_from
from raftlib.text.models import load_tokenizer, save_model

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# The hidden gold preference and the toy rewards
# ----------------------------------------------------------------------------------------------

_VADER = None


def _vader():
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _VADER = SentimentIntensityAnalyzer()
    return _VADER


def fluency(completion: str) -> float:
    """0 for varied text of 5+ words; down to about -1.5 for repetitive or near-empty text."""
    words = M.words(completion)
    if not words:
        return -1.5
    repetition = 1.0 - len(set(words)) / len(words)
    short = 0.5 if len(words) < 5 else 0.0
    return -max(0.0, repetition - 0.25) * 2.0 - short


def gold_reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """The hidden gold preference: VADER compound sentiment of the continuation plus fluency.

    It stands in for the human labellers of HH-RLHF. It is never given to RAFT, only used to label
    the preference pairs and to score the finished models, so over-optimisation of the learned proxy
    shows up as proxy reward rising while gold reward stalls or falls.
    """
    analyzer = _vader()
    return [analyzer.polarity_scores(c)["compound"] + fluency(c) for c in completions]


def random_reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """A reward that ranks at random (a hash of the text): RAFT with it is 'SFT on random samples'."""
    return [
        int(hashlib.sha256(f"{p}\x00{c}".encode()).hexdigest()[:8], 16) / 16**8
        for p, c in zip(prompts, completions, strict=True)
    ]


# ----------------------------------------------------------------------------------------------
# Setup: preference pairs, SFT model, reward model (cached: both notebooks reuse one setup)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetupSettings:
    base_model: str = "assets/tiny-lm"
    openings: str = "notebooks/data/openings.jsonl"
    eval_prompts: int = 64
    samples_per_pair_prompt: int = 8
    max_new_tokens: int = 32
    min_gold_gap: float = 0.05
    sft_learning_rate: float = 5e-4
    sft_epochs: int = 2
    rm_learning_rate: float = 1e-4
    rm_epochs: int = 2
    rm_batch_size: int = 16
    seed: int = 0


@dataclass(frozen=True)
class Setup:
    directory: Path
    sft_model: Path
    reward_model: Path
    prompts: Path
    """JSONL of every opening with a `reference` column (a preferred continuation) for perplexity."""
    pairs_train: int
    pairs_heldout: int
    rm_accuracy_train: float
    rm_accuracy_heldout: float
    seconds: float
    settings: dict[str, Any]


def prepare_setup(directory: str | Path, settings: SetupSettings = SetupSettings(), *, progress: bool = False) -> Setup:
    """Build (or reuse, when `directory` holds one built with the same settings) pairs, SFT and RM."""
    directory = Path(directory)
    record = directory / "setup.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved["settings"] == asdict(settings):
            logger.info("reusing the setup in %s", directory)
            return _setup_from_record(saved, directory)
    started = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    splits = load_prompts(DataSection(prompts=settings.openings, eval_prompts=settings.eval_prompts), settings.seed)
    base_section = ModelSection(path=settings.base_model)
    tokenizer = load_tokenizer(base_section)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(settings.base_model)
    generation = GenerationSection(
        samples_per_prompt=settings.samples_per_pair_prompt,
        temperature=1.0,
        max_new_tokens=settings.max_new_tokens,
        prompts_per_batch=16,
    )
    # 1. pairs: K continuations per opening from the base model, paired (0,1), (2,3), ... and labelled by gold
    all_prompts = splits.train + splits.eval
    draw = Draw(seed=settings.seed, stream=1, samples_per_prompt=generation.samples_per_prompt, prompts_per_batch=16)
    samples = generate_from(
        base, tokenizer, all_prompts, generation, draw, Batches(progress=progress, description="pairs")
    )
    gold = gold_reward([s.prompt for s in samples], [s.completion for s in samples])
    eval_ids = {p.prompt_id for p in splits.eval}
    pairs_train, pairs_heldout = [], []
    for i in range(0, len(samples) - 1, 2):
        a, b = samples[i], samples[i + 1]
        if a.prompt_id != b.prompt_id or abs(gold[i] - gold[i + 1]) < settings.min_gold_gap:
            continue
        chosen, rejected = (a, b) if gold[i] > gold[i + 1] else (b, a)
        (pairs_heldout if a.prompt_id in eval_ids else pairs_train).append((chosen, rejected))
    _write_pairs(directory / "pairs_train.jsonl", pairs_train)
    _write_pairs(directory / "pairs_heldout.jsonl", pairs_heldout)

    # 2. prompts file for RAFT: each opening with a preferred continuation as its reference response
    reference = {}
    for chosen, _ in pairs_train + pairs_heldout:
        reference.setdefault(chosen.prompt_id, chosen.completion)
    by_id = sorted(all_prompts, key=lambda p: p.prompt_id)
    with open(directory / "prompts.jsonl", "w", encoding="utf-8") as handle:
        for prompt in by_id:
            handle.write(json.dumps({"prompt": prompt.text, "reference": reference.get(prompt.prompt_id, "")}) + "\n")

    # 3. SFT on the preferred continuations (the paper's SFT on HH-RLHF chosen responses)
    examples = [(c.prompt_token_ids, c.completion_token_ids) for c, _ in pairs_train]
    sft_section = TrainingSection(
        learning_rate=settings.sft_learning_rate, epochs=settings.sft_epochs, micro_batch_size=16
    )
    sft, _ = finetune(
        base, examples, sft_section, pad_id=tokenizer.pad_token_id, seed=settings.seed, iteration=0, progress=progress
    )
    save_model(sft, tokenizer, directory / "sft")

    # 4. Bradley-Terry reward model on the same pairs, initialised from the base model
    accuracy_train, accuracy_heldout = train_reward_model(
        settings.base_model, pairs_train, pairs_heldout, directory / "reward_model", settings, progress=progress
    )
    setup = Setup(
        directory=directory,
        sft_model=directory / "sft",
        reward_model=directory / "reward_model",
        prompts=directory / "prompts.jsonl",
        pairs_train=len(pairs_train),
        pairs_heldout=len(pairs_heldout),
        rm_accuracy_train=accuracy_train,
        rm_accuracy_heldout=accuracy_heldout,
        seconds=time.perf_counter() - started,
        settings=asdict(settings),
    )
    record.write_text(
        json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(setup).items()}, indent=2) + "\n"
    )
    return setup


def _setup_from_record(saved: dict[str, Any], directory: Path) -> Setup:
    """The recorded setup, its files found in `directory`, where it lies now: a runs/ folder moved or
    copied elsewhere still holds a usable setup (the record names the folder it was built in)."""
    built_in = Path(saved["directory"])

    def here(value: str) -> Path:
        path = Path(value)
        return directory / path.relative_to(built_in) if path.is_relative_to(built_in) else path

    paths = {"directory", "sft_model", "reward_model", "prompts"}
    return Setup(**{k: here(v) if k in paths else v for k, v in saved.items()})


def _write_pairs(path: Path, pairs: list[tuple[Sample, Sample]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for chosen, rejected in pairs:
            handle.write(
                json.dumps({"prompt": chosen.prompt, "chosen": chosen.completion, "rejected": rejected.completion})
                + "\n"
            )


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(r_chosen - r_rejected), averaged: the reward-model loss of the paper (and of InstructGPT)."""
    return -torch.nn.functional.logsigmoid(chosen_scores - rejected_scores).mean()


def train_reward_model(
    base_model: str,
    pairs_train: Sequence[tuple[Sample, Sample]],
    pairs_heldout: Sequence[tuple[Sample, Sample]],
    directory: Path,
    settings: SetupSettings,
    *,
    progress: bool = False,
) -> tuple[float, float]:
    """Train a GPT-2 sequence classifier with the Bradley-Terry loss; returns (train, held-out) accuracy.

    Texts are `prompt + completion`, tokenized exactly as raftlib's `reward_model` scorer will see them.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForSequenceClassification.from_pretrained(
        base_model, num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.rm_learning_rate, weight_decay=0.01)
    rng = np.random.default_rng(settings.seed)

    def scores(texts: list[str]) -> torch.Tensor:
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        return model(**batch).logits[:, 0]  # (B,)

    def accuracy(pairs) -> float:
        model.eval()
        wins = 0
        with torch.no_grad():
            for start in range(0, len(pairs), 64):
                chunk = pairs[start : start + 64]
                c = scores([p.prompt + p.completion for p, _ in chunk])
                r = scores([p.prompt + q.completion for p, q in chunk])
                wins += int((c > r).sum())
        return wins / max(1, len(pairs))

    steps = settings.rm_epochs * math.ceil(len(pairs_train) / settings.rm_batch_size)
    bar = tqdm(total=steps, desc="reward model", disable=None if progress else True, leave=False)
    for _ in range(settings.rm_epochs):
        model.train()
        order = rng.permutation(len(pairs_train))
        for start in range(0, len(order), settings.rm_batch_size):
            chunk = [pairs_train[i] for i in order[start : start + settings.rm_batch_size]]
            loss = bradley_terry_loss(
                scores([c.prompt + c.completion for c, _ in chunk]), scores([c.prompt + r.completion for c, r in chunk])
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
    bar.close()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return accuracy(list(pairs_train)), accuracy(list(pairs_heldout))


# ----------------------------------------------------------------------------------------------
# The proxy reward and loading saved models (evaluation itself is raftlib's: raftlib.evaluation)
# ----------------------------------------------------------------------------------------------


def load_scorer(reward_model: str | Path, *, formatter: str = "raw", dtype: str = "float32", batch_size: int = 64):
    """The proxy reward (the trained RM) as a raftlib reward callable, loaded once, on CUDA when present.

    `formatter` names the RM's input format (`raftsuite.hh_paper.FORMATTERS`): "raw" for the tiny RM,
    "open_llama_hh" for the authors' HH RM.
    """
    from raftsuite.hh_paper import FormattedRewardModel

    scorer = FormattedRewardModel(str(reward_model), formatter, batch_size=batch_size, dtype=dtype)
    scorer.setup()
    return scorer


def reward_section(
    reward_model: str | Path, formatter: str = "raw", dtype: str = "float32", batch_size: int = 64
) -> dict[str, Any]:
    """A RAFT config's `reward` section for the proxy RM.

    The tiny RM read raw in fp32 stays raftlib's built-in `reward_model` (the configs, and so the run dirs the
    tiny profile resumes, are what they were); any other format or dtype goes through the named formatter.
    """
    if formatter == "raw" and dtype == "float32":
        return {"fn": "reward_model", "args": {"path": str(reward_model), "batch_size": batch_size}}
    return {
        "fn": "raftsuite.hh_paper:formatted_reward_model",
        "args": {"path": str(reward_model), "formatter": formatter, "dtype": dtype, "batch_size": batch_size},
    }


def resolve_dtype(value: str, parameter: str = "policy_dtype") -> str:
    """A dtype parameter: "auto" is bfloat16 on CUDA and float32 elsewhere; else float32 | bfloat16 | float16."""
    if value == "auto":
        return "bfloat16" if torch.cuda.is_available() else "float32"
    if value not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{parameter} = {value!r}: use auto, float32, bfloat16 or float16")
    return value


def model_device() -> str:
    """Where the baselines and the evaluation run: this process's GPU when there is one (under `accelerate launch`
    the one torchrun gave it, LOCAL_RANK: plain "cuda" would put every rank's copy on GPU 0)."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def load_causal_lm(path: str | Path, dtype: str = "float32"):
    """(model on `model_device()` in eval mode, tokenizer with a pad token) of a saved policy."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).to(model_device()).eval()
    return model, load_tokenizer(ModelSection(path=str(path)))


def gold_over_iterations(run_dir: str | Path) -> list[dict[str, float]]:
    """Proxy (the run's eval reward) and gold reward of each iteration's held-out completions."""
    import pyarrow.parquet as pq

    rows = []
    for path in sorted(Path(run_dir).glob("iter_*/eval_samples.parquet")):
        table = pq.read_table(path).to_pylist()
        completions = [r["completion"] for r in table]
        rows.append(
            {
                "iteration": int(path.parent.name.split("_")[1]),
                "proxy_reward": float(np.nanmean([np.nan if r["reward"] is None else r["reward"] for r in table])),
                "gold_reward": float(np.mean(gold_reward([r["prompt"] for r in table], completions))),
                "distinct_2": M.distinct_n(completions, 2),
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------
# The RL baselines' TRL config (raftsuite.hh_methods runs GRPO on HH; raftsuite.reasoning on a verifier)
# ----------------------------------------------------------------------------------------------


def grpo_config(output_dir: str | Path, *, seed: int, use_cpu: bool, **settings: Any):
    """TRL's GRPOConfig as every GRPO baseline of the suite runs it: logged every step, nothing saved, no bars,
    no reporting service; `settings` are the experiment's own (batch, generations, learning rate, clipping...)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(output_dir),
        seed=seed,
        use_cpu=use_cpu,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        **settings,
    )


# ----------------------------------------------------------------------------------------------
# Prompt splits shared by every seed: curve/held-out prompts, validation prompts, fitting prompts
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptPlan:
    """Row indices of a prompts file, fixed for every seed and method.

    `curve`: the prompts every run is evaluated on during training (RAFT's per-iteration evaluation, the GRPO
    callback); in the tiny setting they are also the reported held-out prompts of Table 3. `validation`: train
    prompts kept out of training, on which the learning rates are chosen. `fit`: the prompts runs train on.
    """

    source: str
    curve: tuple[int, ...]
    validation: tuple[int, ...]
    fit: tuple[int, ...]


def prompt_plan(prompts_file: str | Path, curve_prompts: int, validation_prompts: int) -> PromptPlan:
    """Split a prompts file into curve, validation and fit rows (one fixed shuffle, the split seed 0).

    `curve` is exactly what `load_prompts(prompts_file, eval_prompts=curve_prompts, seed=0).eval` holds (the
    tiny Table 3's held-out openings, as before seeds); `validation` is the next `validation_prompts` rows of
    the same shuffle, so it shares no row with `curve`.
    """
    rows = Path(prompts_file).read_text(encoding="utf-8").splitlines()
    if curve_prompts < 1 or validation_prompts < 1:
        raise ValueError(f"prompt_plan: curve_prompts {curve_prompts} and validation_prompts {validation_prompts} >= 1")
    if curve_prompts + validation_prompts >= len(rows):
        raise ValueError(
            f"prompt_plan: {curve_prompts} curve + {validation_prompts} validation prompts leave no training prompt "
            f"of the {len(rows)} in {prompts_file}"
        )
    order = np.random.default_rng([0, 7]).permutation(len(rows))  # load_prompts' shuffle for seed 0
    curve = sorted(order[:curve_prompts].tolist())
    validation = sorted(order[curve_prompts : curve_prompts + validation_prompts].tolist())
    taken = set(curve) | set(validation)
    fit = [i for i in range(len(rows)) if i not in taken]
    return PromptPlan(str(prompts_file), tuple(curve), tuple(validation), tuple(fit))


def plan_prompts(plan: PromptPlan, part: str) -> list[Prompt]:
    """The `curve`, `validation` or `fit` prompts of a plan as records (prompt_id = row in the source file)."""
    rows = Path(plan.source).read_text(encoding="utf-8").splitlines()
    out = []
    for index in getattr(plan, part):
        record = json.loads(rows[index])
        text = record.pop("prompt")
        out.append(Prompt(prompt_id=index, text=text, columns=record))
    return out


def seed_prompts_file(plan: PromptPlan, seed: int, directory: str | Path) -> Path:
    """A prompts file for a run with `seed`: the curve and fit rows only (no validation row), placed so that
    raftlib's own split for that seed (`load_prompts(..., eval_prompts=len(curve), seed)`) holds out exactly
    the curve prompts and trains on exactly the fit prompts. Written once (atomically), then reused."""
    path = Path(directory) / f"prompts_seed{seed}.jsonl"
    if path.is_file():
        return path
    rows = Path(plan.source).read_text(encoding="utf-8").splitlines()
    size = len(plan.curve) + len(plan.fit)
    order = np.random.default_rng([seed, 7]).permutation(size)  # load_prompts' shuffle for this seed
    placed: list[str | None] = [None] * size
    for position, index in zip(sorted(order[: len(plan.curve)].tolist()), plan.curve, strict=True):
        placed[position] = rows[index]
    rest = iter(plan.fit)
    placed = [rows[next(rest)] if line is None else line for line in placed]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(placed) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    split = load_prompts(DataSection(prompts=str(path), eval_prompts=len(plan.curve)), seed)
    curve_texts = {json.loads(rows[i])["prompt"] for i in plan.curve}
    if {p.text for p in split.eval} != curve_texts:  # the placement is the contract: check it, not trust it
        path.unlink()
        raise RuntimeError(f"{path}: raftlib's split for seed {seed} does not hold out the curve prompts")
    return path
