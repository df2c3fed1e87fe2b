"""The efficiency experiment: RAFT against TRL's GRPOTrainer on the tiny HH-RLHF setting, and generation speed.

Each method runs in a fresh Python process (`run_in_child`), so its peak resident memory is its own
(VmHWM, read by the child at its end) and neither inherits the other's allocator state. Both report held-out proxy reward (the trained reward model on the same held-out
prompts, drawn the same way: raftlib's evaluation generator) against the completions drawn so far and
against training wall time; evaluation time is left out of the training time of both.

    python -m raftsuite.efficiency MODULE:FUNCTION '{"json": "kwargs"}' OUT.json     # what run_in_child runs
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

# ----------------------------------------------------------------------------------------------
# A function in its own process
# ----------------------------------------------------------------------------------------------


def run_in_child(function: str, kwargs: dict[str, Any], output: Path, log: Path) -> dict[str, Any]:
    """`module:function(**kwargs)` in a fresh process: its JSON result, peak RSS (MiB) and wall time (s)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.unlink(missing_ok=True)
    root = Path(__file__).resolve().parents[1]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(
            [sys.executable, "-m", "raftsuite.efficiency", function, json.dumps(kwargs), str(output)],
            stdout=handle, stderr=subprocess.STDOUT, env=env, check=False,
        )  # fmt: skip
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{function} failed in its process (exit {done.returncode}); end of {log}:\n{tail}")
    record = json.loads(output.read_text())
    record["process_seconds"] = time.perf_counter() - started
    return record


def _child(function: str, kwargs_json: str, output: str) -> None:
    module, name = function.split(":")
    result = getattr(importlib.import_module(module), name)(**json.loads(kwargs_json))
    Path(output).write_text(json.dumps({"result": result, "peak_rss_mib": peak_rss_mib()}))


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
    model, tokenizer, prompts, reward, *, samples_per_prompt, temperature, max_new_tokens, seed, max_prompt_tokens=None
):
    """Mean proxy reward on held-out prompts, drawn exactly as raftlib's loop draws its evaluation."""
    from raftlib.config import GenerationSection
    from raftlib.generate import generate_samples
    from raftlib.loop import EVAL_STREAM
    from raftlib.rewards import score_samples

    settings = GenerationSection(
        samples_per_prompt=samples_per_prompt, temperature=temperature, max_new_tokens=max_new_tokens,
        prompts_per_batch=16,
    )  # fmt: skip
    samples = generate_samples(model, tokenizer, prompts, settings, seed=seed, stream=EVAL_STREAM, progress=False,
                               max_prompt_tokens=max_prompt_tokens)  # fmt: skip
    scores = score_samples(reward, samples, {}, batch_size=64, progress=False)
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
) -> list[dict[str, Any]]:
    """TRL GRPO with a callback measuring held-out reward every `eval_every_steps` steps (time excluded)."""
    from transformers import AutoTokenizer, TrainerCallback

    from raftlib.config import DataSection, RewardSection
    from raftlib.data import load_prompts
    from raftlib.rewards import build_reward
    from raftsuite.hh import run_grpo

    split = load_prompts(DataSection(prompts=prompts, eval_prompts=eval_prompts), seed)
    reward = build_reward(RewardSection(fn="reward_model", args={"path": reward_model, "batch_size": 64}))
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
            began = time.perf_counter()
            value = held_out_reward(
                model, tokenizer, split.eval, reward, samples_per_prompt=eval_samples_per_prompt,
                temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, max_prompt_tokens=max_prompt_tokens,
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
    reward.setup()  # loaded once for all evaluations
    try:
        run_grpo(
            sft_model, split.train, reward_model, output_dir, samples_budget=samples_budget,
            num_generations=num_generations, prompts_per_step=prompts_per_step, learning_rate=learning_rate,
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, callbacks=[callback],
        )  # fmt: skip
    finally:
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
# Generation speed on this machine: Hugging Face generate against raftlib's two backends
# ----------------------------------------------------------------------------------------------


def generation_speed(model_dir: str, prompts, *, prompt_counts, samples_per_prompt, max_new_tokens: int, seed: int = 0):
    """Completion tokens per second of HF `generate(num_return_sequences=K)`, raftlib's eager loop and its
    static backend (uncompiled on a CPU), on the same model, prompts, K and sampling settings.

    Completion tokens are counted up to and including each row's EOS, for all three alike.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raftlib.config import GenerationSection
    from raftlib.fastgen import StaticDecoder
    from raftlib.generate import encode_prompts, generate_samples

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rows = []
    for count in prompt_counts:
        chosen = prompts[:count]
        for k in samples_per_prompt:
            settings = GenerationSection(samples_per_prompt=k, temperature=1.0, max_new_tokens=max_new_tokens,
                                         prompts_per_batch=count, chat_template="never")  # fmt: skip
            timings = {}
            for backend in ("raftlib eager", "raftlib static"):
                decoder = StaticDecoder(model) if backend == "raftlib static" else None
                generate_samples(model, tokenizer, chosen[:1], settings, seed=seed, progress=False, decoder=decoder)
                began = time.perf_counter()
                samples = generate_samples(
                    model, tokenizer, chosen, settings, seed=seed, progress=False, decoder=decoder
                )
                timings[backend] = (sum(s.completion_token_count for s in samples), time.perf_counter() - began)
            ids = encode_prompts(tokenizer, chosen, chat_template="never")
            width = max(map(len, ids))
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(i)) + i for i in ids])
            attention = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
            torch.manual_seed(seed)
            began = time.perf_counter()
            with torch.no_grad():
                out = model.generate(
                    input_ids=input_ids, attention_mask=attention, do_sample=True, temperature=1.0, top_k=0,
                    max_new_tokens=max_new_tokens, num_return_sequences=k, pad_token_id=tokenizer.pad_token_id,
                )  # fmt: skip
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
    _child(*sys.argv[1:4])
