"""Every GPU stage of every notebook of a profile, planned before anything loads (`runner check --profile P`).

raftlib's planner (`raftlib.plan`) estimates the stages of a RAFT config: generate, score, fine-tune, evaluate.
The notebooks run more than RAFT, so each of their other GPU stages is planned through the same estimates as the
RAFT stage it resembles, with what differs added term by term:

- the HH SFT setup: a full fine-tune of the policy (float32 master weights, `sft_accelerate_config`'s sharding);
- TRL's GRPO: its generation batch at once per device (HF generate: the eager decoder's KV cache), then its
  fine-tune with the reward model resident on the device (an added term);
- best-of-K at inference: the evaluation stage with K samples per held-out prompt;
- the reasoning notebook's RAFT / RAFT++ / random runs and its GRPO baseline; the two SD notebooks' runs.

A stage fits when its estimate is within the GPU's usable memory; `runner check` refuses a profile with a stage
over `raftlib.estimates.CLEARLY` times the memory, naming the notebook parameter to change. Hardware: the gpu
profile is one H100-80GB; the paper profile eight A100-80GB for the text notebooks and one A40-48GB for SD (the
paper's own); `num_processes` GPUs are used. These are estimates (docs/profiles.md has the arithmetic).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from raftlib.estimates import CLEARLY, GiB, Hardware, StageEstimate, Term

HARDWARE = {"gpu": {"text": "H100-80GB", "image": "H100-80GB"}, "paper": {"text": "A100-80GB", "image": "A40-48GB"}}

PARAMETER_OF = {
    "generation.prompts_per_batch": "prompts_per_batch",
    "model.lora": "lora_rank",
    "model.dtype": "policy_dtype",
    "training.micro_batch_size": "micro_batch_size",
    "training.gradient_checkpointing": "gradient_checkpointing",
    "reward.batch_size": "reward_batch_size",
    "generation.decode_batch_size": "decode_batch_size",
    "loop.prompts_per_iteration": "prompts_per_iteration",
}
"""raftlib config keys -> the notebook parameter that sets them (what a refusal names)."""


@dataclass(frozen=True)
class PlannedStage:
    notebook: str
    stage: str
    memory_gib: float
    gpu_gib: float
    minutes: float
    change: str
    note: str = ""

    @property
    def fits(self) -> bool:
        return self.memory_gib <= 0.95 * self.gpu_gib

    @property
    def clearly_too_big(self) -> bool:
        return self.memory_gib > CLEARLY * self.gpu_gib


def _row(
    notebook: str, label: str, stage: StageEstimate, hardware: Hardware, change: str | None = None, note: str = ""
):
    largest = max(stage.memory_terms, key=lambda t: t.value).name
    key = change or (
        "loss_chunk_tokens" if largest == "loss logits" else PARAMETER_OF.get(stage.key or "", stage.key or "")
    )
    return PlannedStage(
        notebook, label, stage.memory_bytes / GiB, hardware.gpu_memory_gib, stage.seconds / 60, key, note
    )


def _sharding(accelerate_config: str) -> str:
    from raftsuite.launch import fsdp_version

    return "ddp" if fsdp_version(accelerate_config) is None else "fsdp"


def _plan(config: dict[str, Any], hardware: Hardware, sharding: str):
    from raftlib import RAFTConfig
    from raftlib.plan import plan

    return plan(RAFTConfig.from_dict(config), hardware, sharding=sharding)


def _stage(plan_, name: str) -> StageEstimate:
    return next(s for s in plan_.chosen if s.stage.startswith(name))


def _with_resident_model(stage: StageEstimate, path: str, dtype: str, name: str, head: str) -> StageEstimate:
    """`stage` with one more whole model resident beside it (`head`: "score" for a reward model, "lm" a policy)."""
    from raftlib.estimates import BYTES_PER_ELEMENT, model_shape, read_model_config

    raw, source = read_model_config(path)
    shape = model_shape(raw, source, head=head)
    bytes_ = BYTES_PER_ELEMENT.get(dtype, 4)
    term = Term(name, shape.params * bytes_, f"{shape.params / 1e9:.2f} B x {bytes_} B")
    return replace(stage, memory_terms=(*stage.memory_terms, term))


def _hh_settings(values: Mapping[str, Any]):
    from dataclasses import fields

    from raftsuite import hh, hh_methods

    names = {f.name for f in fields(hh_methods.MethodSettings)}
    s = {k: v for k, v in values.items() if k in names}
    s |= {
        "sft_model": values["sft_model"] or values["policy_model"],
        "reward_model": values["reward_model"],
        "reward_formatter": values["reward_formatter"],
        "gold": False,
        "policy_dtype": hh.resolve_dtype(values["policy_dtype"]),
        "reward_dtype": hh.resolve_dtype(values["reward_dtype"]),
    }
    return hh_methods.MethodSettings(**s)


def _grpo(
    notebook: str,
    raw: dict[str, Any],
    generation_rows_per_device: int,
    micro_batch: int,
    values,
    hardware,
    sharding: str,
    reward: tuple[str, str] | None,
) -> list[PlannedStage]:
    """TRL's GRPO as raftlib's stages of the same shapes: its generation batch per device at once (HF generate, or
    TRL's colocated vLLM at 30 % of the GPU with `grpo_use_vllm`), then its fine-tune (fp32 masters under bf16
    autocast), with the reward model resident when there is one and, under FSDP, the reasoning callback's gathered
    evaluation copy on rank 0. TRL's colocated engine sleeps through the fine-tune (`vllm_enable_sleep_mode`), so
    its 30 % is counted in the generate row only."""
    K = raw["generation"]["samples_per_prompt"]
    engine = (
        {"backend": "vllm", "vllm_options": {"gpu_memory_utilization": 0.3}}
        if values.get("grpo_use_vllm")
        else {"backend": "eager"}
    )
    raw = raw | {
        "generation": raw["generation"] | {"prompts_per_batch": max(1, generation_rows_per_device // K)} | engine,
        "training": raw["training"] | {"micro_batch_size": micro_batch, "loss": "sft"},
    }
    plan_ = _plan(raw, hardware, sharding)
    # TRL's colocated engine sleeps through the fine-tune: planned as raftlib's stages without a resident engine
    asleep = raw | {"generation": raw["generation"] | {"backend": "eager", "vllm_options": {}}}
    finetune = _stage(_plan(asleep, hardware, sharding), "fine-tune")
    if reward is not None:
        finetune = _with_resident_model(finetune, *reward, "reward model resident (TRL)", "score")
    if notebook == "reasoning" and sharding == "fsdp":  # reasoning.evaluation_copy: the gathered policy, rank 0
        copy = "GRPO evaluation copy on rank 0 (FSDP gather)"
        finetune = _with_resident_model(finetune, raw["model"]["path"], raw["model"]["dtype"], copy, "lm")
    label = (
        "GRPO: generate (TRL, vLLM colocated)" if values.get("grpo_use_vllm") else "GRPO: generate (TRL, HF generate)"
    )
    change = "grpo_use_vllm" if notebook == "reasoning" else "grpo_prompts_per_step"
    return [
        _row(
            notebook,
            label,
            _stage(plan_, "generate"),
            hardware,
            change,
            f"{generation_rows_per_device} rows at once per device",
        ),
        _row(notebook, "GRPO: fine-tune (TRL)", finetune, hardware, "grpo_gradient_accumulation_steps"),
    ]


def plan_hh(notebook: str, values: Mapping[str, Any], hardware: Hardware) -> list[PlannedStage]:
    from raftsuite import hh_methods

    settings = _hh_settings(values)
    run = hh_methods.MethodRun("raft", float(values.get("learning_rates", [2e-5])[0]), 0)
    raw = hh_methods.raft_config(settings, "unused.jsonl", min(values["eval_prompts"], 64), run, "unused")
    sharding = _sharding(values["accelerate_config"])
    plan_ = _plan(raw, hardware, sharding)
    rows = [_row(notebook, f"RAFT: {s.stage}", s, hardware) for s in plan_.chosen]
    if not values["sft_model"]:  # the SFT setup: a full fine-tune of the policy, fp32 masters
        sft = raw | {
            "model": {"path": values["policy_model"], "dtype": "float32"},
            "training": raw["training"] | {"micro_batch_size": 8, "epochs": 1},
        }
        stage = _stage(_plan(sft, hardware, _sharding(values["sft_accelerate_config"])), "fine-tune")
        rows.append(_row(notebook, "SFT setup: fine-tune (fp32 masters)", stage, hardware, "sft_accelerate_config"))
    if notebook in ("hh_rlhf", "efficiency") and values.get("run_grpo_baseline", True):
        grpo_raw = raw | {"model": raw["model"] | {"dtype": hh_methods.grpo_weights_dtype(settings)}}
        processes = values["num_processes"]
        per_step = values["samples_per_prompt"] * values["grpo_prompts_per_step"]
        micro = max(1, per_step // (processes * values["grpo_gradient_accumulation_steps"]))
        rows += _grpo(
            notebook,
            grpo_raw,
            math.ceil(per_step / processes),
            micro,
            values,
            hardware,
            sharding,
            (settings.reward_model, settings.reward_dtype),
        )
    if notebook == "hh_rlhf":
        best = raw | {"loop": raw["loop"] | {"eval_samples_per_prompt": values["best_of_k_at_inference"]}}
        stage = _stage(_plan(best, hardware, sharding), "evaluate")
        rows.append(_row(notebook, f"best-of-{values['best_of_k_at_inference']} evaluation", stage, hardware))
    return rows


def plan_reasoning(values: Mapping[str, Any], hardware: Hardware) -> list[PlannedStage]:
    from raftsuite import reasoning

    settings = reasoning.ReasoningSettings.from_parameters(values)
    files = reasoning.ProblemFiles("unused.jsonl", "unused.jsonl", "unused.jsonl", {})
    raw = reasoning.raft_config(settings, files, reasoning.MethodRun("RAFT++", 1e-6, 0), "unused")
    raw["data"] = {"prompts": "unused.jsonl", "eval_prompts": 64}  # the planner sizes one evaluation batch
    sharding = _sharding(settings.accelerate_config)
    plan_ = _plan(raw, hardware, sharding)
    rows = [_row("reasoning", f"RAFT / RAFT++: {s.stage}", s, hardware) for s in plan_.chosen]
    per_device = settings.samples_per_iteration // settings.num_processes
    rows += _grpo("reasoning", raw, per_device, settings.micro_batch_size, values, hardware, sharding, None)
    return rows


def plan_diffusion(notebook: str, values: Mapping[str, Any], hardware: Hardware) -> list[PlannedStage]:
    from raftlib.diffusion import DiffusionConfig
    from raftlib.plan import plan
    from raftsuite import sd

    task = sd.TASKS[notebook.removeprefix("sd_")]
    raw = sd.config_dict(task, values, 0, "random selection", "unused")  # planning reads no reward weights
    clip = {"clip": values["clip_model"], "batch_size": values["reward_batch_size"], "dtype": values["reward_dtype"]}
    raw["reward"] = {"fn": "clip_score", "args": clip}  # CLIP sizes the score stage (the aesthetic head is 3 KB)
    config = DiffusionConfig.from_dict(raw)
    plan_ = plan(config, hardware, sharding="ddp")
    return [_row(notebook, f"RAFT: {s.stage}", s, hardware) for s in plan_.chosen]


def plan_profile(profile: str) -> list[PlannedStage]:
    """Every planned stage of every notebook of a GPU profile (gpu, paper)."""
    from raftsuite import runner

    kinds = HARDWARE[profile]
    rows = []
    for name, entry in runner.load_profile(profile).items():
        values = runner.notebook_parameters(name) | dict(entry) | {"show_progress": False}
        # planned for the profile's CUDA machine, where a dtype "auto" is bf16 (resolve_dtype here would say fp32)
        values = {k: "bfloat16" if k.endswith("_dtype") and v == "auto" else v for k, v in values.items()}
        kind = "image" if name.startswith("sd_") else "text"
        hardware = Hardware.preset(kinds[kind], max(1, int(values.get("num_processes", 1))))
        if name in ("hh_rlhf", "efficiency", "ablations"):
            rows += plan_hh(name, values, hardware)
        elif name == "reasoning":
            rows += plan_reasoning(values, hardware)
        elif name.startswith("sd_"):
            rows += plan_diffusion(name, values, hardware)
    return rows


def refusals(profile: str) -> list[str]:
    """What the notebooks of a GPU profile would refuse before a worker starts, besides memory: a GRPO baseline
    launched so that its held-out evaluation could not run (`hh_methods.refuse_sharded_grpo`,
    `reasoning.check_grpo_sharding`) or whose samples do not split into its micro-batches
    (`reasoning.grpo_accumulation_steps`), each as "notebook: message"."""
    from raftsuite import hh_methods, reasoning, runner

    found = []
    for name, entry in runner.load_profile(profile).items():
        values = runner.notebook_parameters(name) | dict(entry)
        try:
            if name in ("hh_rlhf", "efficiency") and values.get("run_grpo_baseline", True):
                hh_methods.refuse_sharded_grpo(_hh_settings(values))
            elif name == "reasoning":
                settings = reasoning.ReasoningSettings.from_parameters(values)
                reasoning.check_grpo_sharding(settings)
                reasoning.grpo_accumulation_steps(settings, settings.num_processes)
        except ValueError as refusal:
            found.append(f"{name}: {refusal}")
    return found


def table(rows: list[PlannedStage]) -> str:
    lines = [
        "| notebook | stage | peak GiB per GPU | of GPU | min per iteration | fits | change |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        fits = "yes" if r.fits else ("**no**" if r.clearly_too_big else "tight")
        lines.append(
            f"| {r.notebook} | {r.stage} | {r.memory_gib:.1f} | {r.memory_gib / r.gpu_gib:.0%} | "
            f"{r.minutes:.1f} | {fits} | {'' if r.fits else r.change} |"
        )
    return "\n".join(lines)
