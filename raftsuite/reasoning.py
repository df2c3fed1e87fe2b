"""The reasoning notebook's pieces: verifiers, prompt sources, the four methods, evaluation and statistics.

RAFT for verifiable rewards (rejection-sampling fine-tuning) against RAFT++ (Xiong et al. 2025, arXiv
2504.11343: the same selection with a clipped per-token importance ratio), TRL's GRPO, and a matched
random-selection control, at equal sample budgets, over several seeds:

- RAFT: keep every verified-correct sample (`selection.strategy: threshold`, threshold 1), cross-entropy.
- RAFT++: the same kept set, `training.loss: raftpp` (ratio to the sampling policy, PPO clip).
- random: the same number of samples kept per prompt as RAFT would keep (c correct of K -> c kept), but
  chosen at random among the K, correct or not: what fine-tuning on the policy's own samples does without
  the verifier's choice.
- GRPO: TRL's GRPOTrainer with the same prompts, K, batch of prompts per generation and learning rate.

Every model is scored by the same function (`evaluate_policy`): n samples per held-out problem at the
evaluation temperature, pass@1 (the paper's avg@n) and pass@n, and the token-level entropy of those
samples under the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raftlib.batches import Batches
from raftlib.records import Prompt

logger = logging.getLogger(__name__)

METHODS = ("RAFT", "RAFT++", "GRPO", "random")

PAPER = {
    "source": "Xiong et al. 2025, arXiv 2504.11343 v2 (Qwen2.5-Math-7B), as quoted in /work/shared/PAPER.md",
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


def matched_random(verifier: str = "arithmetic", seed: int = 0):
    """Reward factory of the random-selection control: per prompt, c of its K samples get 1.0 at random.

    c is how many of them the verifier accepts, so `threshold` selection at 1.0 keeps as many samples per
    prompt as RAFT would, chosen without looking at correctness. The choice is seeded by the prompt text,
    the completions and `seed`, so a resumed run keeps the same ones. Needs a prompt's K samples in one
    reward batch (reward.batch_size a multiple of K; samples arrive grouped by prompt).
    """
    verify = VERIFIERS[verifier]

    def random_matched(prompts: list[str], completions: list[str], answer: list[str], **columns: Any):
        truth = verify(prompts, completions, answer)
        out: list[float | None] = [0.0] * len(completions)
        groups: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(prompt, []).append(i)
        for prompt, members in groups.items():
            correct = sum(truth[i] == 1.0 for i in members)
            digest = hashlib.sha256(json.dumps([seed, prompt, [completions[i] for i in members]]).encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            for i in rng.permutation(members)[:correct]:
                out[int(i)] = 1.0
        return out

    return random_matched


# ----------------------------------------------------------------------------------------------
# Prompt sources
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


def arithmetic_prompts(directory: Path, eval_problems: int, seed: int = 0) -> tuple[Path, dict[str, list[Prompt]]]:
    """The tiny task: train-split problems as the RAFT prompt file, `eval_problems` held-out ones to score."""
    from raftsuite import tinymath

    train, heldout = tinymath.split()
    train_path = tinymath.write_prompts(directory / "train.jsonl", train)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.permutation(len(heldout))[:eval_problems].tolist())
    eval_set = [Prompt(i, heldout[i][0], {"answer": str(heldout[i][1])}) for i in chosen]
    return train_path, {"held-out arithmetic": eval_set}


def prompts_from_rows(rows: Sequence[dict[str, str]]) -> list[Prompt]:
    return [Prompt(i, r["prompt"], {"answer": r["answer"]}) for i, r in enumerate(rows)]


# ----------------------------------------------------------------------------------------------
# Evaluation: the same function for every method
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    samples_per_prompt: int = 8
    """n: completions per held-out problem (the paper: 16, avg@16)."""
    temperature: float = 1.0
    max_new_tokens: int = 6
    prompts_per_batch: int = 64
    seed: int = 0


def evaluate_policy(model, tokenizer, prompts: Sequence[Prompt], verifier: str, settings: EvalSettings) -> dict:
    """pass@1 (avg@n), pass@n, unparsable share and token entropy of n samples per held-out problem."""
    from raftlib import metrics as M
    from raftlib.config import GenerationSection
    from raftlib.loop import EVAL_STREAM
    from raftlib.text.generate import generate_samples

    generation = GenerationSection(
        samples_per_prompt=settings.samples_per_prompt, temperature=settings.temperature,
        max_new_tokens=settings.max_new_tokens, prompts_per_batch=settings.prompts_per_batch, chat_template="auto",
    )  # fmt: skip
    samples = generate_samples(model, tokenizer, list(prompts), generation, seed=settings.seed, stream=EVAL_STREAM, batches=Batches(progress=False))  # fmt: skip
    answers = {p.prompt_id: p.columns["answer"] for p in prompts}
    rewards = VERIFIERS[verifier]([s.prompt for s in samples], [s.completion for s in samples],
                                  [answers[s.prompt_id] for s in samples])  # fmt: skip
    n = settings.samples_per_prompt
    passes = M.pass_at_k_metrics([s.prompt_id for s in samples], rewards, 1.0, n, prefix="eval")
    return {
        "pass_at_1": passes["eval_pass_at_1"],
        f"pass_at_{n}": passes["eval_pass_at_k"],
        "unparsable": float(np.mean([r is None for r in rewards])),
        "entropy": M.token_entropy_mean([s.entropy for s in samples], [s.completion_token_count for s in samples]),
    }


def evaluate_sets(model, tokenizer, eval_sets: dict[str, list[Prompt]], verifier: str, settings: EvalSettings) -> dict:
    """`evaluate_policy` on each held-out set; the headline numbers are the mean over sets (the paper's average)."""
    per_set = {name: evaluate_policy(model, tokenizer, ps, verifier, settings) for name, ps in eval_sets.items()}
    row = {key: float(np.mean([r[key] for r in per_set.values()])) for key in next(iter(per_set.values()))}
    if len(per_set) > 1:
        row |= {f"{name}/pass_at_1": r["pass_at_1"] for name, r in per_set.items()}
    return row


# ----------------------------------------------------------------------------------------------
# The four methods
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    iterations: int
    prompts_per_iteration: int
    samples_per_prompt: int
    learning_rate: float
    micro_batch_size: int
    epochs: int = 1
    max_new_tokens: int = 6
    temperature: float = 1.0
    clip_range: float = 0.2
    clip_range_high: float = 0.2
    grpo_updates_per_generation: int = 4
    """GRPO's optimizer steps per generated batch (TRL steps_per_generation): its mini-batches."""
    model_dtype: str = "float32"
    """Weights dtype of every method's policy (bfloat16 for the paper's 7B)."""

    @property
    def samples_per_iteration(self) -> int:
        return self.prompts_per_iteration * self.samples_per_prompt


def raft_config(method: str, model: str, train_prompts: Path, budget: Budget, verifier: str, seed: int, run_dir: Path,
                *, progress: bool = False) -> dict[str, Any]:  # fmt: skip
    """The raftlib config of RAFT, RAFT++ or the random control (they differ only in reward and loss)."""
    if method not in ("RAFT", "RAFT++", "random"):
        raise ValueError(f"{method!r} is not a raftlib method")
    reward: dict[str, Any] = {"fn": verifier_path(verifier)}
    if method == "random":
        reward = {"fn": "raftsuite.reasoning:matched_random", "args": {"verifier": verifier, "seed": seed}}
    k = budget.samples_per_prompt
    return {
        "model": {"path": model, "dtype": budget.model_dtype},
        "data": {"prompts": str(train_prompts), "eval_prompts": 0},  # scored by evaluate_sets on held-out sets
        "generation": {"samples_per_prompt": k, "temperature": budget.temperature,
                       "max_new_tokens": budget.max_new_tokens, "prompts_per_batch": 16, "chat_template": "auto"},
        "reward": reward | {"batch_size": 16 * k},  # whole prompts per batch: the random control needs them
        "selection": {"strategy": "threshold", "threshold": 1.0},
        "training": {"learning_rate": budget.learning_rate, "epochs": budget.epochs,
                     "micro_batch_size": budget.micro_batch_size, "lr_scheduler": "constant",
                     "loss": "raftpp" if method == "RAFT++" else "sft", "clip_range": budget.clip_range,
                     "clip_range_high": budget.clip_range_high},
        "loop": {"iterations": budget.iterations, "prompts_per_iteration": budget.prompts_per_iteration},
        "logging": {"progress_bars": progress, "tensorboard": False, "level": "WARNING"},
        "seed": seed,
        "output_dir": str(run_dir),
    }  # fmt: skip


def run_raftlib_method(method: str, model: str, train_prompts: Path, eval_sets, budget: Budget, verifier: str,
                       seed: int, run_dir: Path, eval_settings: EvalSettings, base_row: dict) -> list[dict]:  # fmt: skip
    """One raftlib run, then every iteration's checkpoint scored on the held-out sets: one row per iteration."""
    from transformers import AutoModelForCausalLM

    from raftlib import RAFTConfig, run
    from raftlib.store import RunStore
    from raftlib.text.models import load_tokenizer

    started = time.perf_counter()
    config = RAFTConfig.from_dict(raft_config(method, model, train_prompts, budget, verifier, seed, run_dir))
    result = run(config)
    seconds = time.perf_counter() - started
    tokenizer = load_tokenizer(config.model)
    store = RunStore(run_dir)
    rows = [base_row | {"method": method, "seed": seed, "iteration": 0, "samples": 0}]
    for metrics in result.metrics:
        t = metrics["iteration"]
        if t == 0:
            continue
        policy = AutoModelForCausalLM.from_pretrained(store.checkpoint_dir(t))
        row = evaluate_sets(policy, tokenizer, eval_sets, verifier, eval_settings)
        row |= {
            "method": method, "seed": seed, "iteration": t, "samples": t * budget.samples_per_iteration,
            "kept": metrics["kept_count"], "train_correct": metrics["reward_mean"],
            "train_entropy": metrics["sample_token_entropy"], "run_seconds": seconds,
        }  # fmt: skip
        rows.append(row)
    return rows


def run_grpo_method(model: str, train_prompts: Path, eval_sets, budget: Budget, verifier: str, seed: int,
                    output_dir: Path, eval_settings: EvalSettings, base_row: dict) -> list[dict]:  # fmt: skip
    """TRL's GRPO at RAFT's sample budget, scored by `evaluate_sets` after each generated batch's updates.

    One "iteration" = one generation of prompts_per_iteration x K completions, then
    `grpo_updates_per_generation` optimizer steps on mini-batches of it (as RAFT++ replays its batch).
    """
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOTrainer

    from raftsuite.hh import grpo_config

    tokenizer = AutoTokenizer.from_pretrained(model)
    k, updates = budget.samples_per_prompt, budget.grpo_updates_per_generation
    if budget.samples_per_iteration % updates:
        raise ValueError(f"{budget.samples_per_iteration} samples per iteration do not split into {updates} updates")
    verify = VERIFIERS[verifier]

    def correct(prompts, completions, answer, **kwargs):  # TRL logs reward functions by __name__
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]  # conversational: messages
        return [0.0 if r is None else r for r in verify(prompts, texts, answer)]  # TRL needs a number

    rows = [base_row | {"method": "GRPO", "seed": seed, "iteration": 0, "samples": 0}]
    started = time.perf_counter()

    class Evaluate(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % updates == 0:
                t = state.global_step // updates
                logged = [h for h in state.log_history if "reward" in h][-updates:]
                row = evaluate_sets(model, tokenizer, eval_sets, verifier, eval_settings)
                row |= {
                    "method": "GRPO", "seed": seed, "iteration": t, "samples": t * budget.samples_per_iteration,
                    "train_correct": float(np.mean([h["reward"] for h in logged])) if logged else math.nan,
                    "train_entropy": float(np.mean([h["entropy"] for h in logged if "entropy" in h]))
                    if any("entropy" in h for h in logged) else math.nan,
                    "run_seconds": time.perf_counter() - started,
                }  # fmt: skip
                rows.append(row)

    use_cpu = not torch.cuda.is_available()
    args = grpo_config(
        output_dir, seed=seed, use_cpu=use_cpu,
        per_device_train_batch_size=budget.samples_per_iteration // updates,
        steps_per_generation=updates,
        num_generations=k,
        max_completion_length=budget.max_new_tokens,
        temperature=budget.temperature,
        learning_rate=budget.learning_rate,
        lr_scheduler_type="constant",
        epsilon=budget.clip_range,
        epsilon_high=budget.clip_range_high,
        beta=0.0,
        max_steps=budget.iterations * updates,
        gradient_checkpointing=False,
        bf16=not use_cpu,  # fp32 on a CPU, as RAFT's tiny runs
        model_init_kwargs={"dtype": budget.model_dtype},
    )  # fmt: skip
    records = [json.loads(line) for line in Path(train_prompts).read_text().splitlines()]
    if getattr(tokenizer, "chat_template", None):  # as raftlib's chat_template "auto": a user turn in the template
        records = [r | {"prompt": [{"role": "user", "content": r["prompt"]}]} for r in records]
    dataset = Dataset.from_list(records)
    trainer = GRPOTrainer(model=model, reward_funcs=[correct], args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Evaluate()])  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    for row in rows[1:]:
        row["run_seconds"] = time.perf_counter() - started
    return rows


# ----------------------------------------------------------------------------------------------
# Statistics: intervals over seeds, and the verdict
# ----------------------------------------------------------------------------------------------


def bootstrap_ci(values: Sequence[float], confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over seeds (scipy.stats.bootstrap); a point when all are equal."""
    from scipy.stats import bootstrap

    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(data) == 0:
        return (math.nan, math.nan)
    if len(data) == 1 or np.all(data == data[0]):
        return (float(data.mean()), float(data.mean()))
    result = bootstrap((data,), np.mean, confidence_level=confidence, n_resamples=9999, method="percentile",
                       random_state=np.random.default_rng(seed))  # fmt: skip
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def summarize(frame: pd.DataFrame, value: str, by: Sequence[str] = ("method", "iteration")) -> pd.DataFrame:
    """Mean over seeds with its 95 % bootstrap interval, per group."""
    rows = []
    for keys, group in frame.groupby(list(by), sort=True):
        low, high = bootstrap_ci(group[value].tolist())
        rows.append(dict(zip(by, keys if isinstance(keys, tuple) else (keys,), strict=True))
                    | {"seeds": len(group), "mean": group[value].mean(), "ci95_low": low, "ci95_high": high})  # fmt: skip
    return pd.DataFrame(rows)


def paired_difference(
    frame: pd.DataFrame, value: str, a: str, b: str, iteration: int, first: int | None = None
) -> dict[str, float]:
    """Mean over seeds of value(a) - value(b) (paired by seed: same base, same prompts order).

    At one `iteration`, or averaged over iterations `first`..`iteration` when `first` is given (each seed's
    mean over those iterations first, then the interval over seeds).
    """
    lo = iteration if first is None else first
    window = frame[(frame["iteration"] >= lo) & (frame["iteration"] <= iteration)]
    at = window.pivot_table(index="seed", columns="method", values=value, aggfunc="mean")
    diffs = (at[a] - at[b]).dropna().tolist()
    low, high = bootstrap_ci(diffs)
    return {"mean": float(np.mean(diffs)) if diffs else math.nan, "ci95_low": low, "ci95_high": high,
            "seeds": len(diffs)}  # fmt: skip


def sign_of(interval: dict[str, float]) -> str:
    """'yes' when the interval is above 0, 'no' when below, 'not resolved' when it holds 0."""
    if not math.isfinite(interval["ci95_low"]):
        return "not resolved"
    if interval["ci95_low"] > 0:
        return "yes"
    if interval["ci95_high"] < 0:
        return "no"
    return "not resolved"


def entropy_verdict(frame: pd.DataFrame, method: str = "RAFT++", early: int = 1) -> dict[str, Any]:
    """Does the paper's pattern appear: `method` ahead of GRPO early (mean pass@1 over iterations 1..`early`),
    its entropy below GRPO's at the end, and GRPO level with or ahead of it at the end? Each part read from a
    paired 95 % interval over seeds."""
    last = int(frame["iteration"].max())
    parts = {
        f"{method} ahead of GRPO over iterations 1-{early} (mean pass@1)": paired_difference(
            frame, "pass_at_1", method, "GRPO", early, first=1
        ),
        f"{method} entropy below GRPO's at iteration {last}": paired_difference(frame, "entropy", "GRPO", method, last),
        f"GRPO catches up by iteration {last} (GRPO - {method} pass@1 >= 0)": paired_difference(
            frame, "pass_at_1", "GRPO", method, last
        ),
    }  # fmt: skip
    answers = {name: sign_of(d) for name, d in parts.items()}
    lead, collapse, catch_up = answers.values()
    catch_up_ok = catch_up in ("yes", "not resolved")  # level (interval holds 0) counts as caught up
    if lead == "yes" and collapse == "yes" and catch_up_ok:
        verdict = "appears"
    elif "no" in (lead, collapse) or catch_up == "no":
        verdict = "does not appear"
    else:
        verdict = "not resolved"
    return {"verdict": verdict, "parts": answers, "intervals": parts}


# ----------------------------------------------------------------------------------------------
# Tables and figures
# ----------------------------------------------------------------------------------------------


def paper_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The paper's Table (v2, percent) beside ours (final-iteration pass@1 in percent, mean and 95 % interval)."""
    last = int(frame["iteration"].max())
    rows = []
    for name, value in PAPER["rows"].items():
        rows.append({"row": f"paper v2: {name}", "accuracy_pct": value, "ci95_low": None, "ci95_high": None,
                     "seeds": None, "setting": "Qwen2.5-Math-7B, MATH500/Minerva/OlympiadBench avg@16"})  # fmt: skip
    base = frame[frame["iteration"] == 0].drop_duplicates("seed")
    low, high = bootstrap_ci(base["pass_at_1"].tolist())
    rows.append({"row": "ours: base", "accuracy_pct": 100 * base["pass_at_1"].mean(), "ci95_low": 100 * low,
                 "ci95_high": 100 * high, "seeds": len(base), "setting": "iteration 0"})  # fmt: skip
    final = frame[frame["iteration"] == last]
    for method in METHODS:
        values = final[final["method"] == method]["pass_at_1"]
        if values.empty:
            continue
        low, high = bootstrap_ci(values.tolist())
        rows.append({"row": f"ours: {method}", "accuracy_pct": 100 * values.mean(), "ci95_low": 100 * low,
                     "ci95_high": 100 * high, "seeds": len(values), "setting": f"iteration {last}"})  # fmt: skip
    return pd.DataFrame(rows).set_index("row")


def plot_curves(frame: pd.DataFrame, panels: Sequence[tuple[str, str]]):
    """One panel per (column, title) over iterations: thin per-seed lines, the mean with a 95 % bootstrap band."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    palette = dict(zip(METHODS, sns.color_palette("colorblind", len(METHODS)), strict=True))
    columns = 2 if len(panels) > 2 else len(panels)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4 * rows), squeeze=False)
    axes = axes.ravel()[: len(panels)]
    for ax, (column, title) in zip(axes, panels, strict=True):
        data = frame.dropna(subset=[column])
        if data.empty:
            ax.set_visible(False)
            continue
        sns.lineplot(data=data, x="iteration", y=column, hue="method", units="seed", estimator=None, lw=0.7,
                     alpha=0.35, palette=palette, ax=ax, legend=False)  # fmt: skip
        sns.lineplot(data=data, x="iteration", y=column, hue="method", errorbar=("ci", 95), n_boot=2000, seed=0,
                     lw=2, palette=palette, ax=ax, marker="o")  # fmt: skip
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def save_with_seeds(summary: pd.DataFrame, per_seed: pd.DataFrame, output_dir: Path, name: str) -> None:
    """`name.csv` (mean and interval per group) and `name_seeds.csv` (every seed's value) side by side."""
    summary.to_csv(Path(output_dir) / f"{name}.csv", index=False, float_format="%.4f")
    per_seed.to_csv(Path(output_dir) / f"{name}_seeds.csv", index=False, float_format="%.4f")
