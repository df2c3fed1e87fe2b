"""The efficiency experiment: RAFT against TRL's GRPOTrainer on the same HH-RLHF setting, and generation speed.

Each method runs in fresh Python processes (`run_in_child`): one plain `python` child by default, or
`accelerate launch` workers when the notebook asks for several processes or an accelerate config. So its peak
resident memory is its own (VmHWM, read by every process at its end; CUDA's peak allocation too) and neither
inherits the other's allocator state. Both report held-out proxy reward (the reward model on the same held-out
prompts, drawn the same way: raftlib's evaluation generator) against the completions drawn so far and against
training wall time; evaluation time is left out of the training time of both.

    python -m raftsuite.efficiency MODULE:FUNCTION '{"json": "kwargs"}' OUT.json     # what run_in_child runs
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from raftlib.batches import Batches
from raftsuite import hh, launch

# ----------------------------------------------------------------------------------------------
# A function in its own process(es)
# ----------------------------------------------------------------------------------------------


def _rank() -> int:
    """This process's rank under `accelerate launch` (torchrun sets RANK), 0 in a plain child."""
    return int(os.environ.get("RANK", "0"))


def _memory_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.rank{rank}")


def run_in_child(
    function: str,
    kwargs: dict[str, Any],
    output: Path,
    log: Path,
    *,
    num_processes: int = 1,
    accelerate_config: str = "",
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """`module:function(**kwargs)` in fresh process(es): its JSON result (the main process's), peak RSS (MiB, the
    largest of any process, and `peak_rss_mib_per_process`), peak CUDA allocation (MiB, or None) and wall time (s).

    One process and no accelerate config: a plain `python` child whose output goes to `log`. Otherwise
    `accelerate launch` runs `function` in every worker (it must be accelerate-aware, as raftlib's loop and TRL's
    trainer are) and its output is streamed through `echo` (default: this process's stdout) and into `log`.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    output.unlink(missing_ok=True)
    for stale in output.parent.glob(f"{output.name}.rank*"):
        stale.unlink()
    log.unlink(missing_ok=True)
    module_args = ["raftsuite.efficiency", function, json.dumps(kwargs), str(output)]
    started = time.perf_counter()
    if num_processes == 1 and not accelerate_config:
        root = Path(__file__).resolve().parents[1]
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        env.pop("RANK", None)  # a plain child is rank 0 whatever launched the kernel
        with open(log, "w") as handle:
            done = subprocess.run(
                [sys.executable, "-m", *module_args], stdout=handle, stderr=subprocess.STDOUT, env=env, check=False,
                preexec_fn=launch.die_with_parent,
            )  # fmt: skip
        if done.returncode != 0:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{function} failed in its process (exit {done.returncode}); end of {log}:\n{tail}")
    else:
        command, env = launch.launch_command(module_args, num_processes, accelerate_config)
        launch.stream(command, env, log, **({"echo": echo} if echo else {}))
    record = json.loads(output.read_text())
    memory = [json.loads(path.read_text()) for path in sorted(output.parent.glob(f"{output.name}.rank*"))]
    record["peak_rss_mib_per_process"] = [m["peak_rss_mib"] for m in memory]
    record["peak_rss_mib"] = max(record["peak_rss_mib_per_process"])
    cuda = [m["peak_cuda_mib"] for m in memory if m["peak_cuda_mib"] is not None]
    record["peak_cuda_mib"] = max(cuda) if cuda else None
    record["processes"] = len(memory)
    record["process_seconds"] = time.perf_counter() - started
    return record


def _child(function: str, kwargs_json: str, output: str) -> None:
    module, name = function.split(":")
    result = getattr(importlib.import_module(module), name)(**json.loads(kwargs_json))
    rank, path = _rank(), Path(output)
    memory = {"peak_rss_mib": peak_rss_mib(), "peak_cuda_mib": peak_cuda_mib()}
    _memory_path(path, rank).write_text(json.dumps(memory))
    if rank == 0:  # every worker returns the same curve (or none); the main process's is the result
        path.write_text(json.dumps({"result": result}))


def peak_cuda_mib() -> float | None:
    """This process's peak CUDA allocation by torch (MiB), or None without CUDA."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def peak_rss_mib() -> float:
    """This process's peak resident memory since it started (VmHWM).

    Not `getrusage(...).ru_maxrss`: Linux carries the parent's high-water mark across fork and exec into
    it, so a child of a 700 MiB notebook kernel reports at least 700 MiB whatever it used.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no /proc: the best there is


# ----------------------------------------------------------------------------------------------
# The two methods, as curves of held-out reward
# ----------------------------------------------------------------------------------------------


def raft_curve(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Run RAFT; one point per iteration: completions drawn, training seconds (no eval), held-out reward."""
    from raftlib import RAFTConfig, run

    result = run(RAFTConfig.from_dict(config))
    per_iteration = config["loop"]["prompts_per_iteration"] * config["generation"]["samples_per_prompt"]
    points, seconds = [], 0.0
    for row in result.metrics:
        stages = ("time_generate_s", "time_score_s", "time_select_s", "time_finetune_s")
        seconds += sum(row.get(key) or 0.0 for key in stages)
        points.append(
            {"step": row["iteration"], "samples": row["iteration"] * per_iteration, "train_seconds": seconds,
             "eval_reward": row["eval_reward_mean"]}
        )  # fmt: skip
    return points


def held_out_reward(
    model,
    tokenizer,
    prompts,
    reward,
    *,
    samples_per_prompt,
    temperature,
    max_new_tokens,
    seed,
    max_prompt_tokens=None,
    prompts_per_batch: int = 16,
    reward_batch_size: int = 64,
):
    """Mean proxy reward on held-out prompts, drawn exactly as raftlib's loop draws its evaluation."""
    from raftlib.config import GenerationSection
    from raftlib.loop import EVAL_STREAM
    from raftlib.scoring import score_samples
    from raftlib.text.generate import generate_samples

    settings = GenerationSection(
        samples_per_prompt=samples_per_prompt, temperature=temperature, max_new_tokens=max_new_tokens,
        prompts_per_batch=prompts_per_batch,
    )  # fmt: skip
    samples = generate_samples(model, tokenizer, prompts, settings, seed=seed, stream=EVAL_STREAM,
                               max_prompt_tokens=max_prompt_tokens, batches=Batches(progress=False))  # fmt: skip
    scores = score_samples(reward, samples, {}, batch_size=reward_batch_size, batches=Batches(progress=False))
    return sum(scores.reward) / len(scores.reward)


def grpo_curve(
    sft_model: str,
    reward_model: str,
    prompts: str,
    *,
    eval_prompts: int,
    eval_samples_per_prompt: int,
    samples_budget: int,
    eval_every_steps: int,
    num_generations: int,
    prompts_per_step: int,
    learning_rate: float,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    output_dir: str,
    max_prompt_tokens: int | None = None,
    gradient_accumulation_steps: int = 1,
    gradient_checkpointing: bool = False,
    reward_formatter: str = "raw",
    reward_dtype: str = "float32",
    reward_batch_size: int = 64,
    prompts_per_batch: int = 16,
) -> list[dict[str, Any]]:
    """TRL GRPO with a callback measuring held-out reward every `eval_every_steps` steps (time excluded).

    Under `accelerate launch` every worker trains and only the main process measures (the others wait for it at
    the next gradient all-reduce); the returned curve is the main process's.
    """
    from transformers import AutoTokenizer, TrainerCallback

    from raftlib.config import DataSection, RewardSection
    from raftlib.data import load_prompts
    from raftlib.rewards import build_reward
    from raftsuite.hh import reward_section, run_grpo

    split = load_prompts(DataSection(prompts=prompts, eval_prompts=eval_prompts), seed)
    main_process = _rank() == 0
    reward = build_reward(
        RewardSection(**reward_section(reward_model, reward_formatter, reward_dtype, reward_batch_size))
    )
    tokenizer = AutoTokenizer.from_pretrained(sft_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    per_step = num_generations * prompts_per_step

    class HeldOutReward(TrainerCallback):
        def __init__(self) -> None:
            self.points: list[dict[str, Any]] = []
            self.started = 0.0
            self.eval_seconds = 0.0

        def measure(self, step: int, model) -> None:
            if not main_process:
                return
            began = time.perf_counter()
            value = held_out_reward(
                model, tokenizer, split.eval, reward, samples_per_prompt=eval_samples_per_prompt,
                temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, max_prompt_tokens=max_prompt_tokens,
                prompts_per_batch=prompts_per_batch, reward_batch_size=reward_batch_size,
            )  # fmt: skip
            training = began - self.started - self.eval_seconds
            self.eval_seconds += time.perf_counter() - began
            self.points.append(
                {"step": step, "samples": step * per_step, "train_seconds": training, "eval_reward": value}
            )

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.started = time.perf_counter()
            self.measure(0, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % eval_every_steps == 0 or state.global_step == state.max_steps:
                self.measure(state.global_step, model)

    callback = HeldOutReward()
    if main_process:
        reward.setup()  # loaded once for all evaluations
    try:
        run_grpo(
            sft_model, split.train, reward_model, output_dir, samples_budget=samples_budget,
            num_generations=num_generations, prompts_per_step=prompts_per_step, learning_rate=learning_rate,
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, callbacks=[callback],
            gradient_accumulation_steps=gradient_accumulation_steps, gradient_checkpointing=gradient_checkpointing,
            reward_formatter=reward_formatter, reward_dtype=reward_dtype,
        )  # fmt: skip
    finally:
        if main_process:
            reward.teardown()
    return callback.points


# ----------------------------------------------------------------------------------------------
# Reading the curves (pure)
# ----------------------------------------------------------------------------------------------


def first_reaching(curve: pd.DataFrame, target: float) -> pd.Series | None:
    """The first point of a curve whose held-out reward is at least `target` (None if it never is)."""
    reached = curve[curve["eval_reward"] >= target]
    return None if reached.empty else reached.iloc[0]


def comparison(curves: dict[str, pd.DataFrame], peaks: dict[str, float]) -> tuple[float, pd.DataFrame]:
    """The common target (the lower of the two best held-out rewards, so both reach it) and, per method,
    the training time and completions it took to reach it, its best reward and its peak memory."""
    target = min(curve["eval_reward"].max() for curve in curves.values())
    rows = {}
    for name, curve in curves.items():
        hit = first_reaching(curve, target)
        rows[name] = {
            "start_reward": curve["eval_reward"].iloc[0],
            "best_reward": curve["eval_reward"].max(),
            "seconds_to_target": None if hit is None else hit["train_seconds"],
            "samples_to_target": None if hit is None else int(hit["samples"]),
            "total_train_seconds": curve["train_seconds"].iloc[-1],
            "total_samples": int(curve["samples"].iloc[-1]),
            "peak_rss_mib": peaks[name],
        }
    return target, pd.DataFrame.from_dict(rows, orient="index")


# ----------------------------------------------------------------------------------------------
# Method runs shared by hh_rlhf and efficiency: one cache per setting, a learning-rate sweep on validation
# ----------------------------------------------------------------------------------------------

METHODS = ("raft", "grpo", "random")
"""raft: RAFT on the proxy reward; grpo: TRL's GRPO on it; random: RAFT whose reward ranks at random (the matched
random-selection control: the same loop, the same number of kept samples)."""


@dataclass(frozen=True)
class MethodSettings:
    """Everything a RAFT, GRPO or random-control run depends on besides the method, learning rate and seed.

    hh_rlhf and efficiency build this from their parameters; equal settings give the same cache directory, so
    a run (and its timing and peak memory, measured in its own process when it was made) is made once and read
    by both notebooks.
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
    grpo_prompts_per_step: int = 6
    grpo_eval_every_steps: int = 4
    grpo_gradient_accumulation_steps: int = 1
    num_processes: int = 1
    accelerate_config: str = ""

    @property
    def budget(self) -> int:
        """Completions each method draws: RAFT's iterations x b x K; GRPO stops at the same count."""
        return self.iterations * self.prompts_per_iteration * self.samples_per_prompt


def runs_root(parent: str | Path, settings: MethodSettings, plan: hh.PromptPlan) -> Path:
    """runs/PROFILE/method_runs/<hash of settings and prompt plan>: the cache both notebooks share."""
    key = json.dumps({"settings": asdict(settings), "plan": asdict(plan)}, sort_keys=True)
    root = Path(parent) / "method_runs" / hashlib.sha256(key.encode()).hexdigest()[:12]
    root.mkdir(parents=True, exist_ok=True)
    (root / "settings.json").write_text(json.dumps(json.loads(key), indent=1) + "\n")
    return root


def run_name(method: str, learning_rate: float, seed: int) -> str:
    if method not in METHODS:
        raise ValueError(f"method {method!r}: use one of {', '.join(METHODS)}")
    return f"{method}_lr{learning_rate:g}_seed{seed}"


def raft_run_config(
    settings: MethodSettings, prompts_file: str | Path, curve_prompts: int, learning_rate: float, seed: int,
    output_dir: str | Path, reward: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The RAFT config (as a dict) of one run; `reward` replaces the proxy reward section (the random control)."""
    s = settings
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
        },
        "reward": reward or hh.reward_section(s.reward_model, s.reward_formatter, s.reward_dtype, s.reward_batch_size),
        "selection": {"strategy": "local", "kl_coef": 0.0},
        "training": {
            "learning_rate": learning_rate,
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
        "seed": seed,
        "output_dir": str(output_dir),
    }


def method_run(
    root: str | Path,
    settings: MethodSettings,
    plan: hh.PromptPlan,
    method: str,
    learning_rate: float,
    seed: int,
    *,
    echo: Callable[[str], None] | None = None,
    link: str | Path | None = None,
) -> dict[str, Any]:
    """One run of `method` at `learning_rate` with `seed`, in its own process(es) (`run_in_child`), cached.

    Returns (and stores as ROOT/NAME.json, written atomically once the run has finished) its held-out curve
    (completions, training seconds without evaluation, proxy reward on the plan's curve prompts), peak memory,
    wall time and where its final model is. A second call reads the record back; a run killed before its record
    was written is started again: RAFT (and the random control) resumes its run directory as raftlib does, GRPO
    starts from scratch. `link`: a symlink made to point at this run's directory (e.g. WORK_DIR/raft).
    Every run trains on the plan's fit prompts only (never on validation or curve prompts).
    """
    root = Path(root)
    name = run_name(method, learning_rate, seed)
    record_path, run_dir = root / f"{name}.json", root / name
    params = {"method": method, "learning_rate": learning_rate, "seed": seed}
    if link is not None:  # a stable name in the notebook's work dir for the run most recently started
        link = Path(link)
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp_link = link.with_name(f".{link.name}.tmp")
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(run_dir.resolve(), target_is_directory=True)
        os.replace(tmp_link, link)
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["params"] != params:
            raise ValueError(f"{record_path} holds {record['params']}, not {params}: delete it to recompute")
        return record
    if method == "grpo":  # TRL keeps no resumable state here: an unfinished GRPO run starts again
        shutil.rmtree(run_dir, ignore_errors=True)
    elif (run_dir / "config.yaml").is_file():  # raftlib resumes its own run: no sample lost or drawn twice
        (echo or launch._echo)(f"{run_dir} already holds this run: resuming it\n")
    prompts_file = hh.seed_prompts_file(plan, seed, root)
    launch_settings = {"num_processes": settings.num_processes, "accelerate_config": settings.accelerate_config}
    if echo is not None:
        launch_settings["echo"] = echo
    child_out, log = root / f"{name}.child.json", root / f"{name}.log"
    if method == "grpo":
        kwargs = {
            "sft_model": settings.sft_model,
            "reward_model": settings.reward_model,
            "prompts": str(prompts_file),
            "eval_prompts": len(plan.curve),
            "eval_samples_per_prompt": settings.eval_samples_per_prompt,
            "samples_budget": settings.budget,
            "eval_every_steps": settings.grpo_eval_every_steps,
            "num_generations": settings.samples_per_prompt,
            "prompts_per_step": settings.grpo_prompts_per_step,
            "learning_rate": learning_rate,
            "max_new_tokens": settings.max_new_tokens,
            "temperature": settings.temperature,
            "seed": seed,
            "output_dir": str(run_dir),
            "max_prompt_tokens": settings.max_prompt_tokens,
            "gradient_accumulation_steps": settings.grpo_gradient_accumulation_steps,
            "gradient_checkpointing": settings.gradient_checkpointing,
            "reward_formatter": settings.reward_formatter,
            "reward_dtype": settings.reward_dtype,
            "reward_batch_size": settings.reward_batch_size,
            "prompts_per_batch": settings.prompts_per_batch,
        }
        child = run_in_child("raftsuite.efficiency:grpo_curve", kwargs, child_out, log, **launch_settings)
        model_dir = run_dir
    else:
        reward = {"fn": "raftsuite.hh:random_reward", "args": {}} if method == "random" else None
        config = raft_run_config(settings, prompts_file, len(plan.curve), learning_rate, seed, run_dir, reward)
        child = run_in_child("raftsuite.efficiency:raft_curve", {"config": config}, child_out, log, **launch_settings)
        model_dir = run_dir / "final"
    record = {
        "params": params,
        "curve": child["result"],
        "peak_rss_mib": child["peak_rss_mib"],
        "peak_cuda_mib": child["peak_cuda_mib"],
        "processes": child["processes"],
        "process_seconds": child["process_seconds"],
        "run_dir": str(run_dir),
        "model_dir": str(model_dir),
        "made": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    tmp = record_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, record_path)  # the record is the commit point: no record, no run
    return record


def validation_reward(root: str | Path, settings: MethodSettings, plan: hh.PromptPlan, record: dict[str, Any]) -> float:
    """Mean proxy reward of a run's final model on the plan's validation prompts (sampling seed 0, drawn as
    raftlib's evaluation draws), cached beside the run's record. This, never a held-out score, picks the rates."""
    from raftlib.config import RewardSection
    from raftlib.rewards import build_reward

    params = record["params"]
    path = Path(root) / f"{run_name(params['method'], params['learning_rate'], params['seed'])}.validation.json"
    if path.is_file():
        return json.loads(path.read_text())["validation_reward"]
    reward = build_reward(
        RewardSection(
            **hh.reward_section(
                settings.reward_model, settings.reward_formatter, settings.reward_dtype, settings.reward_batch_size
            )
        )
    )
    reward.setup()
    try:
        model, tokenizer = hh.load_causal_lm(record["model_dir"], settings.policy_dtype)
        value = held_out_reward(
            model, tokenizer, hh.plan_prompts(plan, "validation"), reward,
            samples_per_prompt=settings.eval_samples_per_prompt, temperature=settings.temperature,
            max_new_tokens=settings.max_new_tokens, seed=0, max_prompt_tokens=settings.max_prompt_tokens,
            prompts_per_batch=settings.prompts_per_batch, reward_batch_size=settings.reward_batch_size,
        )  # fmt: skip
    finally:
        reward.teardown()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"validation_reward": value}))
    os.replace(tmp, path)
    return value


def learning_rate_sweep(
    root: str | Path,
    settings: MethodSettings,
    plan: hh.PromptPlan,
    learning_rates: dict[str, Sequence[float]],
    seed: int,
    *,
    echo: Callable[[str], None] | None = None,
    links: dict[str, str | Path] | None = None,
) -> pd.DataFrame:
    """Each method at each of its learning rates, one seed, scored on the validation prompts.

    Returns one row per (method, learning_rate): seed, validation_reward, final curve reward, wall seconds and
    `chosen` (the highest validation reward of its method). Cheap by design: one seed per value; the chosen
    rate then runs with every seed (the sweep's own run is that seed's run, the same process, not a rerun).
    """
    rows = []
    for method, rates in learning_rates.items():
        if not rates:
            raise ValueError(f"learning_rate_sweep: no learning rates for {method}")
        for rate in rates:
            link = (links or {}).get(method)
            record = method_run(root, settings, plan, method, float(rate), seed, echo=echo, link=link)
            rows.append(
                {
                    "method": method,
                    "learning_rate": float(rate),
                    "seed": seed,
                    "validation_reward": validation_reward(root, settings, plan, record),
                    "process_seconds": record["process_seconds"],
                }
            )
    return mark_chosen(pd.DataFrame(rows))


def mark_chosen(sweep: pd.DataFrame) -> pd.DataFrame:
    """Add `chosen`: per method, the row with the highest validation reward (a tie keeps the first listed rate)."""
    sweep = sweep.reset_index(drop=True)
    best = sweep.groupby("method", sort=False)["validation_reward"].idxmax()
    return sweep.assign(chosen=sweep.index.isin(best.tolist()))


def chosen_rates(sweep: pd.DataFrame) -> dict[str, float]:
    """{method: the learning rate the sweep chose on validation}."""
    return {row.method: float(row.learning_rate) for row in sweep[sweep["chosen"]].itertuples()}


# ----------------------------------------------------------------------------------------------
# Generation speed on this machine: Hugging Face generate against raftlib's two backends
# ----------------------------------------------------------------------------------------------


def generation_speed(
    model_dir: str,
    prompts,
    *,
    prompt_counts,
    samples_per_prompt,
    max_new_tokens: int,
    seed: int = 0,
    dtype: str = "float32",
):
    """Completion tokens per second of HF `generate(num_return_sequences=K)`, raftlib's eager loop and its
    static backend (uncompiled on a CPU), on the same model (on the accelerator, in `dtype`), prompts, K and
    sampling settings.

    Completion tokens are counted up to and including each row's EOS, for all three alike.
    """
    import torch

    from raftlib.config import GenerationSection
    from raftlib.text.fastgen import StaticDecoder
    from raftlib.text.generate import generate_samples
    from raftlib.text.prompts import encode_prompts
    from raftsuite.hh import load_causal_lm

    model, tokenizer = load_causal_lm(model_dir, dtype)
    rows = []
    for count in prompt_counts:
        chosen = prompts[:count]
        for k in samples_per_prompt:
            settings = GenerationSection(samples_per_prompt=k, temperature=1.0, max_new_tokens=max_new_tokens,
                                         prompts_per_batch=count, chat_template="never")  # fmt: skip
            timings = {}
            for backend in ("raftlib eager", "raftlib static"):
                decoder = StaticDecoder(model) if backend == "raftlib static" else None
                generate_samples(
                    model, tokenizer, chosen[:1], settings, seed=seed, decoder=decoder, batches=Batches(progress=False)
                )
                began = time.perf_counter()
                samples = generate_samples(
                    model,
                    tokenizer,
                    chosen,
                    settings,
                    seed=seed,
                    decoder=decoder,
                    batches=Batches(progress=False),
                )
                timings[backend] = (sum(s.completion_token_count for s in samples), time.perf_counter() - began)
            ids = encode_prompts(tokenizer, chosen, chat_template="never")
            width = max(map(len, ids))
            input_ids = torch.tensor(
                [[tokenizer.pad_token_id] * (width - len(i)) + i for i in ids], device=model.device
            )
            attention = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=model.device)
            torch.manual_seed(seed)
            if model.device.type == "cuda":
                torch.cuda.synchronize()  # time the generation, not what was queued before it
            began = time.perf_counter()
            with torch.no_grad():
                out = model.generate(
                    input_ids=input_ids, attention_mask=attention, do_sample=True, temperature=1.0, top_k=0,
                    max_new_tokens=max_new_tokens, num_return_sequences=k, pad_token_id=tokenizer.pad_token_id,
                )  # fmt: skip
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - began
            completions = out[:, width:]
            is_eos = completions == tokenizer.eos_token_id
            first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, completions.shape[1])
            timings["HF generate"] = (int(first_eos.sum()), seconds)
            for backend, (tokens, seconds) in timings.items():
                rows.append({"prompts": count, "K": k, "rows": count * k, "backend": backend,
                             "tokens_per_s": tokens / seconds, "completion_tokens": tokens, "seconds": seconds})  # fmt: skip
    return pd.DataFrame(rows)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    _child(*sys.argv[1:4])
