"""The HH method runs: RAFT, its matched random-selection control, and TRL's GRPO, on the same prompts and budget.

hh_rlhf.ipynb and efficiency.ipynb run these (one cache, shared); ablations.ipynb builds on `MethodSettings`.

    settings = MethodSettings.from_parameters(parameters, setup)        # everything a run depends on
    root = runs_root(work.parent, settings, plan)                        # runs/PROFILE/method_runs/<hash>
    record = method_run(root, settings, plan, MethodRun("raft", 2e-4, seed=0))
    sweep = sweep_until_interior(root, settings, plan, {"raft": [1e-4, 2e-4, 4e-4]}, seed=0)

Every run goes into its own process(es) (`raftsuite.children`), so its time and peak memory are its own; it
trains on the plan's fit prompts only and is evaluated on the plan's curve prompts by raftlib's one evaluation
path (`raftlib.evaluation`): the same decoder, random stream and metrics for RAFT's loop, for GRPO's callback,
for the validation score that chooses the learning rates, and for the final models. Both methods keep fp32
master weights (bf16 only as autocast on a GPU) and, with `lora_rank`, train the same LoRA adapter.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd

from raftlib.records import Prompt
from raftlib.sections import require_package
from raftsuite import children, hh, sweeps
from raftsuite.cache import as_json, cached, keyed_directory

logger = logging.getLogger(__name__)

METHODS = ("raft", "grpo", "random")
"""raft: RAFT on the proxy reward; grpo: TRL's GRPO on it; random: RAFT whose reward ranks at random (the matched
random-selection control: the same loop, the same number of kept samples, best of K by a random key)."""


@dataclass(frozen=True)
class MethodSettings:
    """Everything a RAFT, GRPO or random-control run depends on besides the method, learning rate and seed.

    Built from a notebook's parameters (`from_parameters`); equal settings give the same cache directory, so a
    run (with its timing and peak memory, measured in its own process when it was made) is made once and read by
    every notebook that asks for it.
    """

    sft_model: str
    reward_model: str
    reward_formatter: str = "raw"
    reward_dtype: str = "float32"
    reward_batch_size: int = 64
    policy_dtype: str = "float32"
    lora_rank: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    generation_backend: str = "eager"
    prompts_per_batch: int = 16
    samples_per_prompt: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 32
    max_prompt_tokens: int | None = None
    reference_column: str | None = "reference"
    prompts_per_iteration: int = 32
    iterations: int = 6
    epochs: int = 2
    micro_batch_size: int = 16
    eval_samples_per_prompt: int = 2
    gold: bool = True
    """The tiny setting's hidden gold preference is scored beside the proxy (weight 0: it never steers)."""
    grpo_prompts_per_step: int = 6
    grpo_eval_every_steps: int = 4
    grpo_gradient_accumulation_steps: int = 1
    num_processes: int = 1
    accelerate_config: str = ""

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any], setup) -> MethodSettings:
        """The settings a notebook's parameters (a mapping: `globals()`, a profile entry) and its `HHSetup` give."""
        from_setup = {
            "sft_model": str(setup.sft_model),
            "reward_model": str(setup.reward_model),
            "reward_formatter": setup.formatter,
            "max_prompt_tokens": setup.max_prompt_tokens,
            "gold": not setup.hh_data,
        }
        names = {f.name for f in fields(cls)} - set(from_setup)
        values = {name: parameters[name] for name in names if name in parameters}
        values["policy_dtype"] = hh.resolve_dtype(values.get("policy_dtype", "float32"))
        values["reward_dtype"] = hh.resolve_dtype(values.get("reward_dtype", "float32"), "reward_dtype")
        return cls(**from_setup, **values)

    @property
    def budget(self) -> int:
        """Completions each method draws: RAFT's iterations x b x K; GRPO stops at the same count."""
        return self.iterations * self.prompts_per_iteration * self.samples_per_prompt


@dataclass(frozen=True)
class MethodRun:
    """One run: which method, at which learning rate, with which seed."""

    method: str
    learning_rate: float
    seed: int

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: use one of {', '.join(METHODS)}")

    @property
    def name(self) -> str:
        return f"{self.method}_lr{self.learning_rate:g}_seed{self.seed}"


def runs_root(parent: str | Path, settings: MethodSettings, plan: hh.PromptPlan) -> Path:
    """runs/PROFILE/method_runs/<hash of settings and prompt plan>: the cache every HH notebook shares."""
    return keyed_directory(parent, "method_runs", {"settings": asdict(settings), "plan": asdict(plan)})


# ----------------------------------------------------------------------------------------------
# Configs: a run's, and the evaluation every model gets
# ----------------------------------------------------------------------------------------------


def proxy_reward_section(settings: MethodSettings) -> dict[str, Any]:
    return hh.reward_section(
        settings.reward_model, settings.reward_formatter, settings.reward_dtype, settings.reward_batch_size
    )


def raft_config(
    settings: MethodSettings, prompts_file: str | Path, curve_prompts: int, run: MethodRun, output_dir: str | Path
) -> dict[str, Any]:
    """The RAFT config (as a dict) of one run; the random control ranks by `raftsuite.hh:random_reward`."""
    s = settings
    reward = {"fn": "raftsuite.hh:random_reward", "args": {}} if run.method == "random" else proxy_reward_section(s)
    return {
        "model": {"path": s.sft_model, "dtype": s.policy_dtype}
        | ({"lora": {"r": s.lora_rank, "alpha": 2 * s.lora_rank}} if s.lora_rank else {}),
        "data": {
            "prompts": str(prompts_file),
            "eval_prompts": curve_prompts,
            "reference_column": s.reference_column,
            "max_prompt_tokens": s.max_prompt_tokens,
        },
        "generation": {
            "samples_per_prompt": s.samples_per_prompt,
            "temperature": s.temperature,
            "max_new_tokens": s.max_new_tokens,
            "prompts_per_batch": s.prompts_per_batch,
            "backend": s.generation_backend,
            # HH text is its own format ("\n\nHuman: ... \n\nAssistant:"), read as plain text by the SFT, GRPO,
            # the evaluation and the perplexity alike: no chat template, even where the tokenizer has one (Qwen2.5)
            "chat_template": "never",
        },
        "reward": reward,
        "selection": {"strategy": "local", "kl_coef": 0.0},
        "training": {
            "learning_rate": run.learning_rate,
            "epochs": s.epochs,
            "micro_batch_size": s.micro_batch_size,
            "mixed_precision": s.mixed_precision,
            "gradient_checkpointing": s.gradient_checkpointing,
        },
        "loop": {
            "iterations": s.iterations,
            "prompts_per_iteration": s.prompts_per_iteration,
            "eval_samples_per_prompt": s.eval_samples_per_prompt,
        },
        "logging": {"progress_bars": False, "tensorboard": False},
        "seed": run.seed,
        "output_dir": str(output_dir),
    }


def evaluation_config(settings: MethodSettings, seed: int, samples_per_prompt: int | None = None):
    """How every model of the HH notebooks is evaluated (`raftlib.evaluation.evaluate_policy`): the runs'
    sampling settings and decoder, the proxy reward, seed `seed`'s stream, on whatever prompts are given. Its
    model is the SFT model, the pi_0 every method starts from: the evaluation's KL is to it."""
    from raftlib import RAFTConfig

    raw = raft_config(settings, "unused.jsonl", 1, MethodRun("raft", 1e-4, seed), "unused")
    raw["model"] = {"path": settings.sft_model, "dtype": settings.policy_dtype}  # pi_0, and the tokenizer
    raw["loop"]["eval_samples_per_prompt"] = samples_per_prompt or settings.eval_samples_per_prompt
    return RAFTConfig.from_dict(raw)


def evaluation_reward(settings: MethodSettings):
    """The proxy reward, and in the tiny setting the hidden gold preference beside it at weight 0 (recorded in
    every evaluation row as reward/gold, never part of the total)."""
    from raftlib.config import RewardSection
    from raftlib.rewards import build_reward

    proxy = build_reward(RewardSection(**proxy_reward_section(settings))).components[0][2]
    components = [("proxy", 1.0, proxy)] + ([("gold", 0.0, hh.gold_reward)] if settings.gold else [])
    from raftlib.rewards import WeightedReward

    return WeightedReward(components)


def held_out_evaluation(model, settings: MethodSettings, prompts: Sequence[Prompt], seed: int, reward=None):
    """raftlib's evaluation of `model` (loaded; on its device) on `prompts`, as every HH model is evaluated."""
    from raftlib.evaluation import evaluate_policy

    return evaluate_policy(
        model, evaluation_config(settings, seed), prompts, reward=reward or evaluation_reward(settings)
    )


# ----------------------------------------------------------------------------------------------
# The runs, each in its own process(es), cached by their parameters
# ----------------------------------------------------------------------------------------------


def raft_curve(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Run RAFT (in a child); one point per iteration: completions drawn, training seconds (no eval), held-out
    reward."""
    import pyarrow.parquet as pq

    from raftlib import RAFTConfig, run

    result = run(RAFTConfig.from_dict(config))
    per_iteration = config["loop"]["prompts_per_iteration"] * config["generation"]["samples_per_prompt"]
    points, seconds = [], 0.0
    for row in result.metrics:
        stages = ("time_generate_s", "time_score_s", "time_select_s", "time_finetune_s")
        seconds += sum(row.get(key) or 0.0 for key in stages)
        rows = pq.read_table(result.run_dir / f"iter_{row['iteration']:04d}" / "eval_samples.parquet").to_pylist()
        points.append(
            {
                "step": row["iteration"],
                "samples": row["iteration"] * per_iteration,
                "train_seconds": seconds,
                "eval_reward": row["eval_reward_mean"],
                "prompts": prompt_rewards(rows),
            }
        )
    return points


def prompt_rewards(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """{prompt id: mean reward of its held-out samples} of one evaluation's rows (None rewards left out)."""
    by_prompt: dict[str, list[float]] = {}
    for row in rows:
        if row["reward"] is not None:
            by_prompt.setdefault(str(row["prompt_id"]), []).append(float(row["reward"]))
    return {prompt: sum(values) / len(values) for prompt, values in by_prompt.items()}


def curve_prompts(records: Mapping[tuple[str, int], Mapping[str, Any]]) -> pd.DataFrame:
    """One row per (method, seed, step, held-out prompt) of the runs' curves: the per-prompt Parquet."""
    rows = [
        {
            "method": method,
            "seed": seed,
            "step": point["step"],
            "samples": point["samples"],
            "prompt": int(p),
            "eval_reward": reward,
        }
        for (method, seed), record in records.items()
        for point in record["curve"]
        for p, reward in point.get("prompts", {}).items()
    ]
    return pd.DataFrame(rows)


def method_run(
    root: str | Path, settings: MethodSettings, plan: hh.PromptPlan, run: MethodRun, link: str | Path | None = None
) -> dict[str, Any]:
    """One run in its own process(es), made once: its held-out curve (completions, training seconds without
    evaluation, proxy reward on the plan's curve prompts), peak memory, wall time and where its final model is.

    The record (ROOT/NAME.json, `raftsuite.cache`, keyed by the run and the settings) is the commit point: a
    run killed before it was written is started again; RAFT and the random control resume their run directory
    as raftlib does, GRPO starts from scratch. `link`: a symlink to this run's directory (WORK_DIR/raft).
    """
    root = Path(root)
    run_dir = root / run.name

    def make() -> dict[str, Any]:
        # The child would import peft minutes in (TRL's GRPO, or raftlib's config): say so before it starts.
        require_package(settings.lora_rank > 0, "peft", "lora_rank", settings.lora_rank, "lora")
        # A stable name in the notebook's work dir for the run most recently started; a run read from its
        # record is not started, so the link keeps pointing at the one in progress (or the last one made).
        if link is not None:
            link_path = Path(link)
            link_path.parent.mkdir(parents=True, exist_ok=True)
            tmp_link = link_path.with_name(f".{link_path.name}.tmp")
            tmp_link.unlink(missing_ok=True)
            tmp_link.symlink_to(run_dir.resolve(), target_is_directory=True)
            os.replace(tmp_link, link_path)
        return _make_run(root, settings, plan, run)

    params = {"run": asdict(run), "settings": asdict(settings), "plan": asdict(plan)}
    return cached(root / f"{run.name}.json", params, make)


def refuse_sharded_grpo(settings: MethodSettings) -> None:
    """GRPO's held-out curve is measured on the main process while the others wait (`grpo_curve`): under FSDP that
    forward of a sharded policy would wait forever for the other ranks' all-gathers. The HH profiles run GRPO
    under DDP (`examples/accelerate/ddp.yaml`); a sharded config is refused before any worker starts."""
    from raftsuite.launch import fsdp_version

    if fsdp_version(settings.accelerate_config) is not None:
        raise ValueError(
            f"accelerate_config {settings.accelerate_config} shards the model (FSDP), but the HH GRPO baseline "
            "measures its held-out reward on the main process alone: run it under DDP "
            "(examples/accelerate/ddp.yaml) or one process"
        )


def _make_run(root: Path, settings: MethodSettings, plan: hh.PromptPlan, run: MethodRun) -> dict[str, Any]:
    import shutil

    run_dir = root / run.name
    if run.method == "grpo":  # TRL keeps no resumable state here: an unfinished GRPO run starts again
        refuse_sharded_grpo(settings)
        shutil.rmtree(run_dir, ignore_errors=True)
    prompts_file = hh.seed_prompts_file(plan, run.seed, root)
    launch = {"num_processes": settings.num_processes, "accelerate_config": settings.accelerate_config}
    out, log = root / f"{run.name}.child.json", root / f"{run.name}.log"
    if run.method == "grpo":
        job = {
            "settings": asdict(settings),
            "run": asdict(run),
            "prompts": str(prompts_file),
            "curve_prompts": len(plan.curve),
            "output_dir": str(run_dir),
        }
        child = children.run_in_child("raftsuite.hh_methods:grpo_curve", {"job": job}, out, log, **launch)
        model_dir = run_dir
    else:
        config = raft_config(settings, prompts_file, len(plan.curve), run, run_dir)
        child = children.run_in_child("raftsuite.hh_methods:raft_curve", {"config": config}, out, log, **launch)
        model_dir = run_dir / "final"
    return {
        "curve": child["result"],
        "peak_rss_mib": child["peak_rss_mib"],
        "peak_cuda_mib": child["peak_cuda_mib"],
        "processes": child["processes"],
        "process_seconds": child["process_seconds"],
        "run_dir": str(run_dir),
        "model_dir": str(model_dir),
        "made": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


MAX_VALIDATION_PERPLEXITY_RATIO = 2.0
"""A learning rate is admissible only if its run's reference perplexity on the validation prompts is at most this
multiple of the SFT model's (docs/statistics.md, declared before the runs it selects). The proxy reward alone
picks rates whose text has collapsed (tiny: perplexity x 135 and distinct-2 0.18 at the proxy's choice, gold
reward below SFT's); the paper's RAFT ends at 1.07 x its SFT perplexity."""


def validation_scores(
    root: str | Path, settings: MethodSettings, plan: hh.PromptPlan, record: Mapping | None
) -> dict[str, float]:
    """Mean proxy reward and reference perplexity (of the preferred responses, under the model) of a run's final
    model on the plan's validation prompts, or of the SFT model with `record` None; sampling seed 0, raftlib's
    evaluation; cached beside the run's record (the SFT model's in `root`). These, never a reported score, pick
    the learning rates."""
    model_dir = settings.sft_model if record is None else record["model_dir"]
    made = None if record is None else record["made"]
    params = {"model": model_dir, "made": made, "settings": asdict(settings), "plan": asdict(plan)}
    params["measures"] = ["validation_reward", "validation_perplexity"]
    path = Path(root) / "sft.validation.json" if record is None else Path(f"{record['run_dir']}.validation.json")

    def score() -> dict[str, float]:
        model, _ = hh.load_causal_lm(model_dir, settings.policy_dtype)
        evaluation = held_out_evaluation(model, settings, hh.plan_prompts(plan, "validation"), seed=0)
        return {
            "validation_reward": evaluation.metrics["eval_reward_mean"],
            "validation_perplexity": evaluation.metrics.get("eval_reference_ppl", math.nan),
        }

    return cached(path, params, score)


def sweep_until_interior(
    root: str | Path,
    settings: MethodSettings,
    plan: hh.PromptPlan,
    grids: Mapping[str, Sequence[float]],
    seed: int,
    max_extensions: int = 10,
) -> pd.DataFrame:
    """Each method at each learning rate of its grid, one seed, scored on the validation prompts, each grid
    extended until its chosen rate is interior (`raftsuite.sweeps`): the best validation proxy reward among the
    rates whose validation perplexity is at most `MAX_VALIDATION_PERPLEXITY_RATIO` x the SFT model's. One row per
    (method, learning_rate): seed, validation_reward, validation_perplexity, perplexity_over_sft, admissible,
    process seconds, `chosen`, `interior`. The chosen rate then runs with every seed (the
    sweep's run is that seed's run, not a rerun)."""

    sft_perplexity = validation_scores(root, settings, plan, None)["validation_perplexity"]

    def score(method: str, rate: float) -> dict[str, Any]:
        record = method_run(root, settings, plan, MethodRun(method, rate, seed))
        scores = validation_scores(root, settings, plan, record)
        ratio = scores["validation_perplexity"] / sft_perplexity
        return (
            {"seed": seed}
            | scores
            | {
                "perplexity_over_sft": ratio,
                # without reference responses there is no perplexity to constrain: every rate is admissible
                "admissible": bool(math.isnan(ratio) or ratio <= MAX_VALIDATION_PERPLEXITY_RATIO),
                "process_seconds": record["process_seconds"],
            }
        )

    return sweeps.sweep_until_interior(grids, score, max_extensions)


# ----------------------------------------------------------------------------------------------
# The RL baseline: TRL's GRPO at the same number of completions, evaluated as RAFT is
# ----------------------------------------------------------------------------------------------


def grpo_curve(job: dict[str, Any]) -> list[dict[str, Any]]:
    """TRL GRPO (in a child) with a callback measuring held-out reward every `grpo_eval_every_steps` steps, by
    raftlib's evaluation on the curve prompts (evaluation time excluded from the training time).

    Under `accelerate launch` every worker trains and only the main process measures (the others wait for it at
    the next gradient all-reduce); the returned curve is the main process's.
    """
    from transformers import TrainerCallback

    from raftlib.config import DataSection
    from raftlib.data import load_prompts

    settings, run = MethodSettings(**job["settings"]), MethodRun(**job["run"])
    split = load_prompts(DataSection(prompts=job["prompts"], eval_prompts=job["curve_prompts"]), run.seed)
    main_process = children.rank() == 0  # the main process of `accelerate launch`, or the only one
    reward = evaluation_reward(settings)
    per_step = settings.samples_per_prompt * settings.grpo_prompts_per_step

    class HeldOutReward(TrainerCallback):
        def __init__(self) -> None:
            self.points: list[dict[str, Any]] = []
            self.started = 0.0
            self.eval_seconds = 0.0
            self.max_steps = 0

        def measure(self, step: int, model) -> None:
            if not main_process:
                return
            began = time.perf_counter()
            evaluation = held_out_evaluation(model, settings, split.eval, run.seed, reward)
            value = evaluation.metrics["eval_reward_mean"]
            training = began - self.started - self.eval_seconds
            self.eval_seconds += time.perf_counter() - began
            self.points.append(
                {
                    "step": step,
                    "samples": step * per_step,
                    "train_seconds": training,
                    "eval_reward": value,
                    "prompts": prompt_rewards(evaluation.rows),
                }
            )
            logger.info("GRPO step %d/%d | eval reward %.3f | %.1fs training", step, self.max_steps, value, training)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.started, self.max_steps = time.perf_counter(), state.max_steps
            self.measure(0, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % settings.grpo_eval_every_steps == 0 or state.global_step == state.max_steps:
                self.measure(state.global_step, model)

    callback = HeldOutReward()
    if main_process:
        reward.setup()  # loaded once for all evaluations
    try:
        run_grpo(settings, split.train, run, job["output_dir"], [callback])
    finally:
        if main_process:
            reward.teardown()
    return callback.points


def grpo_weights_dtype(settings: MethodSettings) -> str:
    """The dtype GRPO loads the policy in (and the planner plans it in): float32 master weights for a full
    fine-tune (TRL's own default; bf16 only as autocast), as RAFT's; with `lora_rank` the frozen base in
    `policy_dtype`, as RAFT's LoRA base (peft's adapters are float32 either way)."""
    return settings.policy_dtype if settings.lora_rank else "float32"


def run_grpo(
    settings: MethodSettings,
    prompts: Sequence[Prompt],
    run: MethodRun,
    output_dir: str | Path,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """TRL GRPOTrainer on the proxy reward, stopped when it has drawn the budget's completions.

    One optimizer step takes `samples_per_prompt x grpo_prompts_per_step` completions whatever the launch (each of
    WORLD_SIZE processes takes its share per micro-batch, split further by `grpo_gradient_accumulation_steps`).
    A full fine-tune keeps float32 weights (TRL's own default) with bf16 autocast on a GPU, as RAFT's fine-tune:
    pure-bf16 AdamW would not move most weights at these learning rates. With `lora_rank` GRPO trains the adapter
    RAFT trains, on the base in RAFT's dtype (`grpo_weights_dtype`).
    """
    import torch
    from datasets import Dataset
    from trl import GRPOTrainer

    scorer = hh.load_scorer(settings.reward_model, formatter=settings.reward_formatter, dtype=settings.reward_dtype)

    def proxy_reward(prompts, completions, **kwargs):  # TRL logs reward functions by __name__
        return scorer(list(prompts), list(completions))

    completions_per_step = settings.samples_per_prompt * settings.grpo_prompts_per_step
    steps = max(1, settings.budget // completions_per_step)
    use_cpu = not torch.cuda.is_available()
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = settings.grpo_gradient_accumulation_steps
    per_device, rest = divmod(completions_per_step, processes * accumulation)
    if rest or per_device < 1:
        raise ValueError(
            f"grpo: {completions_per_step} completions per step (samples_per_prompt x grpo_prompts_per_step) do not "
            f"split into {processes} processes x grpo_gradient_accumulation_steps {accumulation}"
        )
    peft_config = None
    if settings.lora_rank:
        from peft import LoraConfig

        peft_config = LoraConfig(r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, task_type="CAUSAL_LM")
    args = hh.grpo_config(
        output_dir,
        seed=run.seed,
        use_cpu=use_cpu,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        num_generations=settings.samples_per_prompt,
        max_completion_length=settings.max_new_tokens,
        temperature=settings.temperature,
        learning_rate=run.learning_rate,
        beta=0.0,
        max_steps=steps,
        gradient_checkpointing=settings.gradient_checkpointing,  # TRL turns it on by default; RAFT's setting rules
        bf16=not use_cpu,  # autocast on a GPU; on a CPU TRL's default bf16 would be slow autocast, RAFT's are fp32
        model_init_kwargs={"dtype": getattr(torch, grpo_weights_dtype(settings))},
    )
    dataset = Dataset.from_list([{"prompt": p.text} for p in prompts])
    started = time.perf_counter()
    trainer = GRPOTrainer(
        model=str(settings.sft_model),
        reward_funcs=[proxy_reward],
        args=args,
        train_dataset=dataset,
        callbacks=list(callbacks),
        peft_config=peft_config,
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout; the history keeps them
    try:
        trainer.train()
        seconds = time.perf_counter() - started
        trainer.save_model(str(output_dir))
    finally:
        scorer.teardown()
    history = [h for h in trainer.state.log_history if "reward" in h]
    return as_json(
        {
            "steps": steps,
            "samples": steps * completions_per_step,
            "seconds": seconds,
            "reward_per_step": [h["reward"] for h in history],
        }
    )
