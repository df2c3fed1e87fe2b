"""The reasoning notebook's pieces: verifiers, problem files, the four methods as cached child runs.

RAFT for verifiable rewards (rejection-sampling fine-tuning) against RAFT++ (Xiong et al. 2025, arXiv
2504.11343: the same selection with a clipped per-token importance ratio), TRL's GRPO, and a random-selection
control matched in kept count, at equal sample budgets, over several seeds:

- RAFT: keep every verified-correct sample (`selection.strategy: threshold`, threshold 1), cross-entropy.
- RAFT++: the same kept set, `training.loss: raftpp` (ratio to the sampling policy, PPO clip).
- random: at each iteration exactly as many samples as the same seed's RAFT run kept (`selection.strategy:
  count` with RAFT's per-iteration counts), chosen by a random key, correct or not: what fine-tuning on the
  policy's own samples does without the verifier's choice, on the same amount of data.
- GRPO: TRL's GRPOTrainer with the same prompts, K and prompts per generation; `grpo_updates_per_generation`
  optimizer steps per generated batch, each in micro-batches of `micro_batch_size` (gradient accumulation).

Every model is scored by raftlib's one evaluation path (`raftlib.evaluation`) on its own device: RAFT's loop
evaluates each iteration on the held-out problems (`data.eval_file`), GRPO's callback calls the same function
after each generated batch's updates. n samples per held-out problem at the sampling temperature give pass@1
(the paper's avg@n), pass@n and the token entropy of the samples; every (seed, method, iteration, problem) is
kept as one per-problem row. Learning rates are chosen per method on validation problems that no run trains on
and no table reports (`raftsuite.sweeps`), each grid extended until its choice is interior. Each run is a child
process (`raftsuite.children`: its own time and memory, `accelerate launch` when several processes are asked
for), cached by its parameters (`raftsuite.cache`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from raftlib.sections import require_package
from raftsuite import children, sweeps
from raftsuite.cache import as_json, cached, keyed_directory

logger = logging.getLogger(__name__)

METHODS = ("RAFT", "RAFT++", "GRPO", "random")

PAPER = {
    "source": "Xiong et al. 2025, arXiv 2504.11343 v2 (Qwen2.5-Math-7B), (docs/paper.md)",
    "metric": "average of MATH500, Minerva Math, OlympiadBench accuracy (avg@16, temperature 1.0), percent",
    "rows": {
        "base": 23.6,
        "RAFT": 52.3,
        "RAFT++": 56.1,
        "GRPO": 56.3,
        "Reinforce-Rej": 56.4,
        "PPO": 52.5,
        "iterative DPO": 48.8,
    },
}
"""The paper's Table (v2). v1 (April 2025) differs (RAFT 49.9, RAFT++ 52.5, GRPO 53.9): always name the version."""

QWEN_MATH_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."
"""The instruction Qwen2.5-Math's evaluation and the RAFT++ code (RLHFlow/Minimal-RL) append to a problem."""


# ----------------------------------------------------------------------------------------------
# Verifiers: reward 1.0 right, 0.0 wrong, None when no answer can be read
# ----------------------------------------------------------------------------------------------

_INTEGER = re.compile(r"-?\d+")


def parse_integer(completion: str) -> int | None:
    """The completion as one integer (surrounding spaces allowed); None when it is anything else."""
    text = completion.strip()
    return int(text) if _INTEGER.fullmatch(text) else None


def exact_answer(prompts: list[str], completions: list[str], answer: list[str], **columns: Any) -> list[float | None]:
    """Arithmetic verifier: 1.0 when the completion is exactly the answer, 0.0 when another number, None if unparsable."""
    out: list[float | None] = []
    for completion, expected in zip(completions, answer, strict=True):
        value = parse_integer(completion)
        out.append(None if value is None else float(value == int(expected)))
    return out


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) in `text`, braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : i]
    return None  # unbalanced: the completion was cut off inside the box


_STRIP = [r"\left", r"\right", r"\!", r"\,", r"\;", r"\:", "$", r"\displaystyle", "^\\circ", "^{\\circ}", r"\%", "%"]


def normalize_math(answer: str) -> str:
    """A canonical string of a final answer: spacing, \\left/\\right, dfrac/tfrac, \\text{}, trailing period removed."""
    s = answer.strip()
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    for token in _STRIP:
        s = s.replace(token, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)  # \frac12 -> \frac{1}{2}
    s = re.sub(r"\s+", "", s).rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def _as_number(s: str) -> float | None:
    match = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if match:
        sign = -1 if match.group(1) else 1
        denominator = int(match.group(3))
        return None if denominator == 0 else sign * int(match.group(2)) / denominator
    match = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if match:
        return None if int(match.group(2)) == 0 else int(match.group(1)) / int(match.group(2))
    try:
        return float(s)
    except ValueError:
        return None


def math_equal(predicted: str, reference: str) -> bool:
    """Same normalized string, or the same number (integers, decimals, a/b, \\frac{a}{b}) to 1e-6 relative."""
    a, b = normalize_math(predicted), normalize_math(reference)
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    return x is not None and y is not None and math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)


def math_answer(prompts: list[str], completions: list[str], answer: list[str], **columns: Any) -> list[float | None]:
    """Math verifier: the last \\boxed{} of the completion against the reference answer; None when nothing is boxed."""
    out: list[float | None] = []
    for completion, expected in zip(completions, answer, strict=True):
        boxed = last_boxed(completion)
        out.append(None if boxed is None else float(math_equal(boxed, str(expected))))
    return out


VERIFIERS = {"arithmetic": exact_answer, "math": math_answer}


def verifier_path(name: str) -> str:
    """The `module:function` raftlib's reward section takes for a verifier name."""
    if name not in VERIFIERS:
        raise ValueError(f"unknown verifier {name!r} (known: {', '.join(VERIFIERS)})")
    return f"raftsuite.reasoning:{VERIFIERS[name].__name__}"


# ----------------------------------------------------------------------------------------------
# Problem files: train, validation (chooses learning rates), held-out (reported), all fitting the context
# ----------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def read_rows(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a local .jsonl/.parquet file, or of a Hugging Face dataset (hub id or saved dir) split."""
    path = Path(source)
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    from datasets import load_dataset

    return list(load_dataset(source, split=split))


def math_prompts(
    source: str,
    *,
    split: str = "train",
    problem_column: str = "problem",
    answer_column: str = "answer",
    limit: int | None = None,
    seed: int = 0,
) -> list[dict[str, str]]:
    """{prompt, answer} rows of a math dataset in its hub format.

    `answer_column` may hold the final answer (MATH-500's `answer`), a list of answers (OlympiadBench's
    `final_answer`: the first is used) or a worked solution ending in \\boxed{} (NuminaMath-CoT's
    `solution`: the boxed part is used; a solution without one is dropped, it cannot be verified).
    `limit` keeps a seeded random subset.
    """
    rows = read_rows(source, split)
    if rows and (problem_column not in rows[0] or answer_column not in rows[0]):
        raise KeyError(f"{source}: needs columns {problem_column!r} and {answer_column!r}, has {sorted(rows[0])}")
    out = []
    for row in rows:
        answer = row[answer_column]
        if isinstance(answer, list):
            answer = answer[0] if answer else None
        if isinstance(answer, str) and ("\\boxed" in answer or answer_column == "solution"):
            answer = last_boxed(answer)  # a worked solution: its boxed final answer, None when it has none
        if answer is None or str(answer).strip() == "":
            continue
        out.append({"prompt": str(row[problem_column]) + QWEN_MATH_SUFFIX, "answer": str(answer).strip()})
    if limit is not None and limit < len(out):
        order = np.random.default_rng(seed).permutation(len(out))[:limit]
        out = [out[i] for i in sorted(order)]
    return out


@dataclass(frozen=True)
class ProblemFiles:
    """The three disjoint problem files of a profile (JSONL: prompt, answer; held-out rows also name their set)."""

    train: str
    """What every method trains on (RAFT's prompts, GRPO's dataset)."""
    validation: str
    """Scored once per sweep run (its final model): chooses the learning rates; never trained on, never reported."""
    held_out: str
    """Scored at every iteration: the reported numbers (column `set`: the benchmark, averaged as in the paper)."""
    dropped: dict[str, int]
    """Problems dropped from each file because prompt + max_new_tokens exceeds the model's context."""

    def sizes(self) -> dict[str, int]:
        return {name: _line_count(Path(getattr(self, name))) for name in ("train", "validation", "held_out")}

    def sets(self) -> dict[int, str]:
        """{held-out prompt id (its row): its set}."""
        return {i: row["set"] for i, row in enumerate(read_rows(self.held_out))}


def _line_count(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def fitting_rows(rows: Sequence[dict[str, Any]], model: str, max_new_tokens: int) -> tuple[list[dict[str, Any]], int]:
    """The rows whose prompt (as the run encodes it: chat template "auto") plus `max_new_tokens` fits the model's
    context window, and how many were dropped: every method then sees the same problems."""
    from raftlib.config import GenerationSection, ModelSection
    from raftlib.records import Prompt
    from raftlib.text.models import load_tokenizer, read_model_config
    from raftlib.text.prompts import TextFormat, context_window

    section = ModelSection(path=model)
    model_config, generation_config = read_model_config(section)
    text_format = TextFormat.of(load_tokenizer(section), generation_config, GenerationSection(chat_template="auto"))
    prompts = [Prompt(i, row["prompt"], {}) for i, row in enumerate(rows)]
    keep, _, dropped = text_format.fitting(prompts, max_new_tokens, context_window(model_config), "problems")
    return [rows[p.prompt_id] for p in keep], dropped


def problem_files(directory: str | Path, parameters: Mapping[str, Any]) -> ProblemFiles:
    """Write the train, validation and held-out files the notebook's parameters ask for, under `directory`.

    No `train_dataset` (the tiny profile): the arithmetic task; its held-out pool (problems never seen in
    pretraining) gives `eval_problems` reported and, disjoint from them, `validation_problems` validation
    problems. Else: `train_dataset` rows, of which a seeded `validation_problems` are held back for validation,
    and every `eval_datasets` set (each `eval_problems` long, 0: all), one `set` column naming each.
    """
    directory, p = Path(directory), parameters
    if not p["train_dataset"]:
        from raftsuite import tinymath

        train_pairs, pool = tinymath.split()
        order = np.random.default_rng(0).permutation(len(pool))
        reported, validation = order[: p["eval_problems"]], order[p["eval_problems"] :][: p["validation_problems"]]
        if len(validation) < p["validation_problems"]:
            raise ValueError(f"eval_problems + validation_problems exceed the {len(pool)} held-out arithmetic problems")
        train = [{"prompt": q, "answer": str(a)} for q, a in train_pairs]
        held_out = [
            {"prompt": pool[i][0], "answer": str(pool[i][1]), "set": "held-out arithmetic"} for i in sorted(reported)
        ]
        validation = [{"prompt": pool[i][0], "answer": str(pool[i][1])} for i in sorted(validation)]
    else:
        rows = math_prompts(
            p["train_dataset"],
            split=p["train_split"],
            problem_column=p["train_problem_column"],
            answer_column=p["train_answer_column"],
            limit=p["train_limit"] or None,
        )
        order = np.random.default_rng(1).permutation(len(rows))
        validation = [rows[i] for i in sorted(order[: p["validation_problems"]])]
        train = [rows[i] for i in sorted(order[p["validation_problems"] :])]
        held_out = []
        for name, problem, answer in zip(
            p["eval_datasets"], p["eval_problem_columns"], p["eval_answer_columns"], strict=True
        ):
            part = math_prompts(
                name,
                split=p["eval_split"],
                problem_column=problem,
                answer_column=answer,
                limit=p["eval_problems"] or None,
            )
            held_out += [row | {"set": name} for row in part]
    files, dropped = {}, {}
    for name, rows in (("train", train), ("validation", validation), ("held_out", held_out)):
        kept, dropped[name] = fitting_rows(rows, p["base_model"], p["max_new_tokens"])
        files[name] = str(write_jsonl(directory / f"{name}.jsonl", kept))
    return ProblemFiles(**files, dropped=dropped)


# ----------------------------------------------------------------------------------------------
# Settings and runs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReasoningSettings:
    """Everything a run depends on besides its method, learning rate and seed (equal settings: one cache)."""

    base_model: str
    verifier: str = "arithmetic"
    iterations: int = 20
    prompts_per_iteration: int = 128
    samples_per_prompt: int = 4
    max_new_tokens: int = 6
    temperature: float = 1.0
    """Sampling temperature of training and of evaluation alike (the paper: 1.0 both)."""
    eval_samples_per_prompt: int = 8
    """n of avg@n / pass@n on every held-out problem (the paper: 16)."""
    eval_every: int = 1
    """Evaluate on the held-out problems after every this-many iterations (and the last), every method alike."""
    micro_batch_size: int = 16
    loss_chunk_tokens: int = 0
    """RAFT++'s and SFT's logits this many positions at a time (0: whole): a 152k vocabulary needs it at 3k tokens."""
    epochs: int = 1
    clip_range: float = 0.2
    clip_range_high: float = 0.2
    grpo_updates_per_generation: int = 4
    """GRPO's optimizer steps per generated batch (TRL steps_per_generation / gradient accumulation)."""
    grpo_use_vllm: bool = False
    """TRL's GRPO generates with vLLM colocated in each training process (`use_vllm`, 30 % of the GPU): a
    generation batch of 512 rows x 3,072 tokens per GPU does not fit HF generate's KV cache (profile_plan)."""
    policy_dtype: str = "float32"
    """Master weights: float32 for every method (bf16 as autocast only, `mixed_precision`)."""
    mixed_precision: str = "no"
    lora_rank: int = 0
    gradient_checkpointing: bool = False
    generation_backend: str = "eager"
    prompts_per_batch: int = 16
    num_processes: int = 1
    accelerate_config: str = ""
    torch_threads: int = 0
    """Each run's torch CPU threads (0: torch's default); a model this small runs fastest on one."""

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any]) -> ReasoningSettings:
        from raftsuite import hh

        values = {f.name: parameters[f.name] for f in fields(cls) if f.name in parameters}
        values["policy_dtype"] = hh.resolve_dtype(values.get("policy_dtype", "float32"))
        return cls(**values)

    @property
    def samples_per_iteration(self) -> int:
        return self.prompts_per_iteration * self.samples_per_prompt


@dataclass(frozen=True)
class MethodRun:
    method: str
    """RAFT, RAFT++, GRPO or random."""
    learning_rate: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method.replace('+', 'p')}_lr{self.learning_rate:g}_seed{self.seed}"


def raft_config(
    settings: ReasoningSettings,
    files: ProblemFiles,
    run: MethodRun,
    output_dir: str | Path,
    kept_counts: Sequence[int] = (),
) -> dict[str, Any]:
    """The raftlib config of RAFT, RAFT++ or the random control (they differ in reward, selection and loss)."""
    s = settings
    if run.method not in ("RAFT", "RAFT++", "random"):
        raise ValueError(f"{run.method!r} is not a raftlib method (RAFT, RAFT++, random)")
    if run.method == "random":
        if len(kept_counts) < s.iterations:
            raise ValueError(f"the random control needs RAFT's kept count of each of {s.iterations} iterations")
        # Ranked by a random key; the verifier rides along at weight 0, so its evaluation is scored as RAFT's.
        reward = {
            "fn": [
                {"fn": verifier_path(s.verifier), "weight": 0.0, "name": "correct"},
                {"fn": "raftsuite.hh:random_reward", "name": "random"},
            ]
        }
        selection = {"strategy": "count", "kept_counts": [int(c) for c in kept_counts]}
    else:
        reward = {"fn": [{"fn": verifier_path(s.verifier), "name": "correct"}]}
        selection = {"strategy": "threshold", "threshold": 1.0}
    return {
        "model": {"path": s.base_model, "dtype": s.policy_dtype}
        | ({"lora": {"r": s.lora_rank, "alpha": 2 * s.lora_rank}} if s.lora_rank else {}),
        "data": {"prompts": files.train, "eval_prompts": 0, "eval_file": files.held_out},
        "generation": {
            "samples_per_prompt": s.samples_per_prompt,
            "temperature": s.temperature,
            "max_new_tokens": s.max_new_tokens,
            "prompts_per_batch": s.prompts_per_batch,
            "chat_template": "auto",
            "backend": s.generation_backend,
        },
        "reward": reward | {"batch_size": 256},
        "selection": selection,
        "training": {
            "learning_rate": run.learning_rate,
            "epochs": s.epochs,
            "micro_batch_size": s.micro_batch_size,
            "lr_scheduler": "constant",
            "loss": "raftpp" if run.method == "RAFT++" else "sft",
            "loss_chunk_tokens": s.loss_chunk_tokens,
            "clip_range": s.clip_range,
            "clip_range_high": s.clip_range_high,
            "mixed_precision": s.mixed_precision,
            "gradient_checkpointing": s.gradient_checkpointing,
        },
        "loop": {
            "iterations": s.iterations,
            "prompts_per_iteration": s.prompts_per_iteration,
            "eval_samples_per_prompt": s.eval_samples_per_prompt,
            "eval_every": s.eval_every,
            "eval_kl": False,
            "pass_threshold": 1.0,
            "keep_checkpoints": 1,
        },
        "logging": {"progress_bars": False, "tensorboard": False},
        "seed": run.seed,
        "output_dir": str(output_dir),
    }


def evaluation_config(settings: ReasoningSettings, files: ProblemFiles, seed: int, held_out: str | None = None):
    """How every model is evaluated (`raftlib.evaluation.evaluate_policy`): RAFT's evaluation settings, seed
    `seed`'s evaluation stream, on `held_out` (default: the held-out file; the validation file for a sweep)."""
    from raftlib import RAFTConfig

    raw = raft_config(settings, files, MethodRun("RAFT", 1e-4, seed), "unused")  # the verifier, as "correct"
    raw["data"]["eval_file"] = held_out or files.held_out
    return RAFTConfig.from_dict(raw)


def per_problem(rows: Sequence[Mapping[str, Any]], sets: Mapping[int, str]) -> list[dict[str, Any]]:
    """Evaluation rows (one per sample) -> one row per problem: share correct (its pass@1), any correct (pass@n
    with n its samples), share unparsable, token entropy (nats per token), and its set. Correct is the verifier's
    component `reward/correct` (the random control's total is its random key)."""
    by_problem: dict[int, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_problem.setdefault(int(row["prompt_id"]), []).append(row)
    out = []
    for problem, samples in sorted(by_problem.items()):
        rewards = [s["reward/correct"] for s in samples]
        correct = [r is not None and r >= 1.0 for r in rewards]
        tokens = sum(int(s["completion_token_count"]) for s in samples)
        entropy = sum(float(s["entropy"] or 0.0) for s in samples) / tokens if tokens else math.nan
        out.append(
            {
                "problem": problem,
                "set": sets.get(problem, ""),
                "pass_at_1": float(np.mean(correct)),
                "pass_at_n": float(any(correct)),
                "unparsable": float(np.mean([r is None for r in rewards])),
                "entropy": entropy,
            }
        )
    return out


def curve_point(problems: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """One iteration's numbers from its per-problem rows: each measure averaged over the problems of each set,
    then over the sets (the paper's average over benchmarks), plus each set's pass@1 when there are several."""
    by_set: dict[str, list[Mapping[str, Any]]] = {}
    for row in problems:
        by_set.setdefault(row["set"], []).append(row)
    point = {
        key: float(np.mean([np.mean([r[key] for r in rows]) for rows in by_set.values()]))
        for key in ("pass_at_1", "pass_at_n", "unparsable", "entropy")
    }
    if len(by_set) > 1:
        point |= {f"{name}/pass_at_1": float(np.mean([r["pass_at_1"] for r in rows])) for name, rows in by_set.items()}
    return point


def _validation_score(model, settings: ReasoningSettings, files: ProblemFiles, seed: int) -> float:
    from raftlib.evaluation import evaluate_policy

    config = evaluation_config(settings, files, seed, held_out=files.validation)
    return float(evaluate_policy(model, config).metrics["eval_pass_at_1"])


# ----------------------------------------------------------------------------------------------
# The runs, each in a child process: raftlib's loop, or TRL's GRPO with raftlib's evaluation
# ----------------------------------------------------------------------------------------------


def _threads(settings: ReasoningSettings) -> None:
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)


def raftlib_curve(job: dict[str, Any]) -> dict[str, Any]:
    """RAFT, RAFT++ or the random control (in a child): per-problem rows of every iteration's held-out
    evaluation (iteration 0: the base model), the per-iteration kept count and training numbers, and the final
    model's validation pass@1."""
    import pyarrow.parquet as pq

    from raftlib import RAFTConfig, run
    from raftsuite import hh

    settings, files = ReasoningSettings(**job["settings"]), ProblemFiles(**job["files"])
    _threads(settings)
    result = run(RAFTConfig.from_dict(job["config"]))
    if children.rank() != 0:
        return {}
    sets = files.sets()
    iterations, problems = [], []
    for row in result.metrics:
        t = int(row["iteration"])
        evaluated = Path(result.run_dir) / f"iter_{t:04d}" / "eval_samples.parquet"
        if evaluated.is_file():  # loop.eval_every skips some iterations
            problems += [r | {"iteration": t} for r in per_problem(pq.read_table(evaluated).to_pylist(), sets)]
        iterations.append(
            {
                "iteration": t,
                "kept": row.get("kept_count"),
                "train_correct": row.get("reward/correct_mean"),
                "train_entropy": row.get("sample_token_entropy"),
                "train_seconds": sum(
                    row.get(f"time_{s}_s") or 0.0 for s in ("generate", "score", "select", "finetune")
                ),
            }
        )
    model, _ = hh.load_causal_lm(result.final_dir, settings.policy_dtype)
    validation = _validation_score(model, settings, files, int(job["config"]["seed"]))
    return {"iterations": iterations, "problems": problems, "validation_pass_at_1": validation}


def stop_token_ids(model: str) -> list[int]:
    """The ids that end a completion of `model` in this notebook: raftlib's `TextFormat` set for chat template
    "auto" (the tokenizer's and generation config's EOS, and the template's end-of-turn token when it wraps the
    prompts). Qwen2.5's base models end a ChatML turn with `<|im_end|>` while their EOS is `<|endoftext|>` alone."""
    from raftlib.config import GenerationSection, ModelSection
    from raftlib.text.models import load_tokenizer, read_model_config
    from raftlib.text.prompts import TextFormat

    section = ModelSection(path=model)
    _, generation_config = read_model_config(section)
    return sorted(
        TextFormat.of(load_tokenizer(section), generation_config, GenerationSection(chat_template="auto")).eos_ids
    )


def grpo_policy(settings: ReasoningSettings, stop_ids: Sequence[int], learning_rate: float, *, data_parallel: bool):
    """The policy GRPO trains, loaded as TRL loads a model path (`create_model_from_path`, its dtype the run's
    `policy_dtype`: fp32 master weights in the gpu and paper profiles), with `stop_ids` as its generation config's
    EOS. TRL stops a completion, and masks the loss after it, at the generation config's EOS ids and the
    tokenizer's: without this a ChatML completion would run on past `<|im_end|>` to the length limit and train
    on what follows, while RAFT's stop there. A full fine-tune asked in bf16 warns as raftlib's does (pure-bf16
    AdamW rounds most updates away)."""
    import torch
    from trl.trainer.utils import create_model_from_path

    from raftlib.finetune import warn_low_precision_masters

    init: dict[str, Any] = {"dtype": getattr(torch, settings.policy_dtype)}
    if data_parallel:
        init["device_map"] = None  # as TRL does for a path under DDP ("auto" would spread one copy over GPUs)
    policy = create_model_from_path(settings.base_model, **init)
    policy.generation_config.eos_token_id = list(stop_ids)
    if not settings.lora_rank:  # peft's adapters are float32 whatever the base's dtype
        warn_low_precision_masters(policy, learning_rate)
    return policy


def grpo_evaluation_config(settings: ReasoningSettings, files: ProblemFiles, seed: int, held_out: str | None = None):
    """`evaluation_config` as GRPO's callback evaluates on the main process while the other ranks wait: RAFT's
    settings and streams, but a vLLM backend becomes `static` when raftlib's engine would join the launcher's
    process group (several processes: a collective on the main process alone never completes) or sit beside
    TRL's colocated engine (`grpo_use_vllm`: a second copy of the weights and a KV pool on the same GPU)."""
    config = evaluation_config(settings, files, seed, held_out)
    if config.generation.backend == "vllm" and (settings.num_processes > 1 or settings.grpo_use_vllm):
        config = config.replace(["generation.backend=static"])
    return config


def evaluation_copy(model, settings: ReasoningSettings, held: dict[str, Any] | None = None):
    """The GRPO policy as the main process evaluates it, None on the other ranks; every rank must call it.

    Under DDP or one process every rank holds the whole model: the model itself. Under FSDP2 each rank holds a
    shard, and a forward on the main process alone would wait forever for the other ranks' all-gathers: the full
    state dict is gathered to the main process's CPU (`raftlib.sharding.full_state_dict`, a collective) and
    loaded into a plain copy on its device (its own buffers, its generation config the policy's). With `held`
    (one dict per run) the copy is built from the base model once and only its weights are replaced at later
    evaluations, instead of reading the base model from disk each time; it stays resident, as the planner's
    GRPO fine-tune row counts it.
    """
    from torch.distributed.fsdp import FSDPModule

    from raftlib.sharding import full_state_dict
    from raftsuite import hh

    if not any(isinstance(module, FSDPModule) for module in model.modules()):
        return model if children.rank() == 0 else None
    state = full_state_dict(model)
    if children.rank() != 0:
        return None
    copy = (held or {}).get("copy")
    if copy is None:
        copy, _ = hh.load_causal_lm(settings.base_model, settings.policy_dtype)
        if held is not None:
            held["copy"] = copy
    copy.load_state_dict(state)  # strict: a LoRA policy's keys would not match (refused before training)
    copy.generation_config = model.generation_config
    return copy


def check_grpo_sharding(settings: ReasoningSettings) -> None:
    """Refuse, before anything loads, a GRPO run whose held-out evaluation could not gather its policy: FSDP
    version 1 (TRL takes it where raftlib's loop refuses it; its modules are no FSDP2 `FSDPModule`, so rank 0 would
    evaluate a sharded model alone and wait forever) and a sharded LoRA policy (no full weights to gather)."""
    from raftsuite.launch import fsdp_version

    version = fsdp_version(settings.accelerate_config)
    if version is None:
        return
    if version != 2:
        raise ValueError(
            f"accelerate_config {settings.accelerate_config}: fsdp_version {version}; GRPO's held-out evaluation "
            "gathers FSDP2 weights only: set fsdp_version: 2 (examples/accelerate/fsdp.yaml)"
        )
    if settings.lora_rank:
        raise ValueError(
            f"GRPO with lora_rank {settings.lora_rank} under the FSDP accelerate_config "
            f"{settings.accelerate_config}: its held-out evaluation gathers full weights (evaluation_copy), which "
            "a sharded LoRA policy does not have; a LoRA fine-tune fits one GPU per process: use DDP (no "
            "accelerate_config) for it"
        )


def grpo_accumulation_steps(settings: ReasoningSettings, processes: int) -> int:
    """GRPO's gradient accumulation per optimizer step: each process's forward with gradients holds
    `micro_batch_size` sequences (it held a whole update, samples_per_iteration / updates, at once: 128 sequences
    of up to 1,024 tokens on the gpu profile), and an iteration's samples make `grpo_updates_per_generation`
    optimizer steps over all processes."""
    s = settings
    per_update, rest = divmod(s.samples_per_iteration, s.grpo_updates_per_generation * processes * s.micro_batch_size)
    if rest or per_update < 1:
        raise ValueError(
            f"GRPO: {s.samples_per_iteration} samples per iteration do not split into grpo_updates_per_generation "
            f"{s.grpo_updates_per_generation} x {processes} processes x micro_batch_size {s.micro_batch_size}"
        )
    return per_update


def grpo_curve(job: dict[str, Any]) -> dict[str, Any]:
    """TRL's GRPO (in a child) at RAFT's sample budget; the held-out evaluation after each generated batch's
    `grpo_updates_per_generation` optimizer steps, by raftlib's evaluation (main process only)."""
    import os

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOTrainer

    from raftlib.config import ModelSection
    from raftlib.evaluation import evaluate_policy
    from raftlib.text.models import load_tokenizer
    from raftsuite import hh

    settings, files, run = ReasoningSettings(**job["settings"]), ProblemFiles(**job["files"]), MethodRun(**job["run"])
    s, sets = settings, files.sets()
    _threads(settings)
    per_update = grpo_accumulation_steps(settings, int(os.environ.get("WORLD_SIZE", "1")))
    check_grpo_sharding(settings)
    config = grpo_evaluation_config(settings, files, run.seed)
    verify = VERIFIERS[s.verifier]
    iterations, problems = [], []

    def correct(prompts, completions, answer, **kwargs):  # TRL logs reward functions by __name__
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]  # conversational: messages
        return [0.0 if r is None else r for r in verify(prompts, texts, answer)]  # TRL needs a number

    held: dict[str, Any] = {}  # the FSDP evaluation copy, built once (evaluation_copy)

    class Evaluate(TrainerCallback):
        def __init__(self) -> None:
            self.started, self.eval_seconds = 0.0, 0.0

        def measure(self, step: int, state, model) -> None:
            t = step // s.grpo_updates_per_generation
            logged = [h for h in state.log_history if "reward" in h][-s.grpo_updates_per_generation :]
            began = time.perf_counter()
            policy = evaluation_copy(model, s, held)  # every rank: under FSDP a gather
            if policy is not None:
                rows = per_problem(evaluate_policy(policy, config).rows, sets)
                problems.extend(r | {"iteration": t} for r in rows)
                logger.info(
                    "GRPO iter %d/%d | train reward %s | eval pass@1 %.3f | %.1fs",
                    t,
                    s.iterations,
                    f"{np.mean([h['reward'] for h in logged]):.3f}" if logged else "-",
                    curve_point(rows)["pass_at_1"],
                    began - self.started,
                )
            iterations.append(
                {
                    "iteration": t,
                    "kept": None,
                    "train_correct": float(np.mean([h["reward"] for h in logged])) if logged else None,
                    "train_entropy": float(np.mean([h["entropy"] for h in logged if "entropy" in h]))
                    if any("entropy" in h for h in logged)
                    else None,
                    "train_seconds": began - self.started - self.eval_seconds,
                }
            )
            self.eval_seconds += time.perf_counter() - began

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.started = time.perf_counter()
            self.measure(0, state, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            t, rest = divmod(state.global_step, s.grpo_updates_per_generation)
            if not rest and (t % s.eval_every == 0 or t == s.iterations):  # as RAFT's loop.eval_every
                self.measure(state.global_step, state, model)

    peft_config = None
    if s.lora_rank:
        from peft import LoraConfig

        peft_config = LoraConfig(r=s.lora_rank, lora_alpha=2 * s.lora_rank, task_type="CAUSAL_LM")
    use_cpu = not torch.cuda.is_available()
    stop_ids = stop_token_ids(s.base_model)
    args = hh.grpo_config(
        job["output_dir"],
        seed=run.seed,
        use_cpu=use_cpu,
        per_device_train_batch_size=s.micro_batch_size,
        gradient_accumulation_steps=per_update,
        steps_per_generation=s.grpo_updates_per_generation * per_update,  # one generation per iteration
        num_generations=s.samples_per_prompt,
        max_completion_length=s.max_new_tokens,
        temperature=s.temperature,
        learning_rate=run.learning_rate,
        lr_scheduler_type="constant",
        epsilon=s.clip_range,
        epsilon_high=s.clip_range_high,
        beta=0.0,
        max_steps=s.iterations * s.grpo_updates_per_generation,
        ddp_timeout=int(config.loop.process_group_timeout_minutes * 60),  # the others wait while rank 0 evaluates
        gradient_checkpointing=s.gradient_checkpointing,  # TRL's default is on; the runs' setting rules
        bf16=s.mixed_precision == "bf16" and not use_cpu,  # autocast, as RAFT's `training.mixed_precision`
        **(
            {
                "use_vllm": True,
                "vllm_mode": "colocate",
                "vllm_gpu_memory_utilization": 0.3,
                # the engine's weights and KV pool leave the GPU while the policy trains and rank 0 evaluates
                # its gathered copy (so the planner's GRPO fine-tune row leaves the engine's 30 % out)
                "vllm_enable_sleep_mode": True,
                "generation_kwargs": {"stop_token_ids": stop_ids},  # vLLM stops at these as RAFT's engine does
            }
            if s.grpo_use_vllm
            else {}
        ),
    )
    records = read_rows(files.train)
    tokenizer = load_tokenizer(ModelSection(path=s.base_model))
    if getattr(tokenizer, "chat_template", None):  # as raftlib's chat_template "auto": a user turn in the template
        records = [r | {"prompt": [{"role": "user", "content": r["prompt"]}]} for r in records]
    trainer = GRPOTrainer(
        model=grpo_policy(
            s, stop_ids, run.learning_rate, data_parallel=args.distributed_state.distributed_type.name == "MULTI_GPU"
        ),
        reward_funcs=[correct],
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        callbacks=[Evaluate()],
        peft_config=peft_config,
    )
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout; the history keeps them
    trainer.train()
    policy = evaluation_copy(trainer.model, s, held)  # every rank: under FSDP a gather
    if policy is None:
        return {}
    config = grpo_evaluation_config(settings, files, run.seed, held_out=files.validation)
    validation = float(evaluate_policy(policy, config).metrics["eval_pass_at_1"])
    return {"iterations": iterations, "problems": problems, "validation_pass_at_1": validation}


def method_run(
    root: str | Path, settings: ReasoningSettings, files: ProblemFiles, run: MethodRun, kept_counts: Sequence[int] = ()
) -> dict[str, Any]:
    """One run in its own process(es), made once (ROOT/NAME.json, keyed by run, settings and problem files):
    per-iteration and per-problem rows, validation pass@1, peak memory and wall time. RAFT-family runs resume
    their run directory after a kill as raftlib does; GRPO (TRL keeps no resumable state here) starts again."""
    root = Path(root)
    run_dir = root / run.name
    params = {
        "run": asdict(run),
        "settings": asdict(settings),
        "files": asdict(files),
        "kept_counts": list(kept_counts),
    }

    def make() -> dict[str, Any]:
        require_package(settings.lora_rank > 0, "peft", "lora_rank", settings.lora_rank, "lora")  # before a child
        job = {"settings": asdict(settings), "files": asdict(files), "run": asdict(run), "output_dir": str(run_dir)}
        if run.method == "GRPO":
            check_grpo_sharding(settings)  # before a worker starts
            shutil.rmtree(run_dir, ignore_errors=True)
            function = "raftsuite.reasoning:grpo_curve"
        else:
            job["config"] = raft_config(settings, files, run, run_dir, kept_counts)
            function = "raftsuite.reasoning:raftlib_curve"
        launch = {"num_processes": settings.num_processes, "accelerate_config": settings.accelerate_config}
        child = children.run_in_child(
            function, {"job": job}, root / f"{run.name}.child.json", root / f"{run.name}.log", **launch
        )
        return as_json(
            child["result"]
            | {
                "peak_rss_mib": child["peak_rss_mib"],
                "peak_cuda_mib": child["peak_cuda_mib"],
                "process_seconds": child["process_seconds"],
                "run_dir": str(run_dir),
            }
        )

    return cached(root / f"{run.name}.json", params, make)


def runs_root(parent: str | Path, settings: ReasoningSettings, files: ProblemFiles) -> Path:
    """WORK_DIR/runs/<hash of settings and problem files>: a changed setting never reads another's runs."""
    return keyed_directory(parent, "runs", {"settings": asdict(settings), "files": asdict(files)})


def sweep(
    root: str | Path, settings: ReasoningSettings, files: ProblemFiles, grids: Mapping[str, Sequence[float]], seed: int
):
    """Each of RAFT, RAFT++ and GRPO at each rate of its grid (seed `seed`), chosen on validation pass@1, grids
    extended until the choice is interior (`raftsuite.sweeps`). The random control takes RAFT's rate."""

    def score(method: str, rate: float) -> dict[str, Any]:
        record = method_run(root, settings, files, MethodRun(method, rate, seed))
        return {
            "seed": seed,
            "validation_reward": record["validation_pass_at_1"],
            "process_seconds": record["process_seconds"],
        }

    return sweeps.sweep_until_interior(grids, score)


def all_runs(
    root: str | Path,
    settings: ReasoningSettings,
    files: ProblemFiles,
    chosen: Mapping[str, float],
    methods: Sequence[str],
    seeds: Sequence[int],
) -> dict[tuple[str, int], dict[str, Any]]:
    """{(method, seed): record} at each method's chosen rate; the random control at RAFT's rate and RAFT's kept
    counts of the same seed (RAFT runs first)."""
    records = {}
    order = [m for m in ("RAFT", "RAFT++", "GRPO", "random") if m in methods]
    for seed in seeds:
        for method in order:
            rate = chosen["RAFT" if method == "random" else method]
            counts = ()
            if method == "random":
                raft = records.get(("RAFT", seed)) or method_run(root, settings, files, MethodRun("RAFT", rate, seed))
                counts = [row["kept"] for row in raft["iterations"] if row["iteration"] > 0]
            record = records[(method, seed)] = method_run(root, settings, files, MethodRun(method, rate, seed), counts)
            ends = [
                curve_point([r for r in record["problems"] if r["iteration"] == t])["pass_at_1"]
                for t in (0, settings.iterations)
            ]
            logger.info(
                "%s seed %d: held-out pass@1 %.3f -> %.3f (%.0f s)", method, seed, *ends, record["process_seconds"]
            )
    return records


def frames(records: Mapping[tuple[str, int], Mapping[str, Any]], settings: ReasoningSettings):
    """(per-iteration frame, per-problem frame) of every run: method, seed, iteration, samples drawn so far, the
    curve point (`curve_point`), kept count and training numbers; per problem: its measures."""
    import pandas as pd

    curve, problems = [], []
    for (method, seed), record in records.items():
        by_iteration: dict[int, list[dict[str, Any]]] = {}
        for row in record["problems"]:
            by_iteration.setdefault(int(row["iteration"]), []).append(row)
            problems.append({"method": method, "seed": seed} | row)
        for row in record["iterations"]:
            t = int(row["iteration"])
            if t not in by_iteration:  # not evaluated (eval_every)
                continue
            curve.append(
                {"method": method, "seed": seed, "iteration": t, "samples": t * settings.samples_per_iteration}
                | curve_point(by_iteration[t])
                | {k: v for k, v in row.items() if k != "iteration"}
            )
    return pd.DataFrame(curve), pd.DataFrame(problems)
