"""Memory and time planner: the peak memory per process and the time per iteration of each RAFT stage, estimated.

    python -m raftlib plan CONFIG.yaml [--gpus N] [--gpu-memory GiB] [--gpu-tflops T] [--gpu-bandwidth GBps]

Reads the model's config.json only (no weights): a local model dir, `--model-config PATH`, or a small table
of known shapes for the hub ids of the `paper` profile (`KNOWN_SHAPES`). Parameter counts are exact (the
model is built on PyTorch's meta device, which allocates nothing); everything else is arithmetic on the
config, written out term by term so a reader can check it (docs/scale.md has the formulas). These are
ESTIMATES: activations, efficiency and overheads are modelled, not measured, and each assumption is named
in `ASSUMPTIONS`. `check_fits` refuses only what clearly cannot fit (estimate > CLEARLY x the memory).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from raftlib.config import ConfigError

logger = logging.getLogger(__name__)

GiB = 1024**3
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# -- assumptions (each one shown with the plan) --------------------------------------------------------------
RUNTIME_OVERHEAD_BYTES = 1 * GiB
"""CUDA context, kernels and allocator slack per process (assumed; typically 0.5-1.5 GiB)."""
USABLE_FRACTION = 0.95
"""A stage fits when its estimate is within this share of the GPU's memory (the rest: fragmentation)."""
CLEARLY = 1.15
"""check_fits refuses a config only when an estimate exceeds the memory by this factor (estimate error)."""
TRAIN_MFU = 0.157
"""Fine-tune model-FLOPs utilisation: measured through raftlib.finetune on one H100 (docs/performance.md)."""
FORWARD_MFU = 0.30
"""Utilisation of batched forward passes (prefill, reward scoring, reference log-probs): assumed."""
BANDWIDTH_EFFICIENCY = 0.7
"""Share of the memory bandwidth a decode step reaches reading weights and KV cache: assumed."""
STEP_OVERHEAD_S_PER_LAYER = {"eager": 2.7e-3, "static": 0.17e-3, "vllm": 0.17e-3}
"""Host/launch time per decode step and layer. eager: HF generate on one H100 took 64 ms a step for the
24-layer Qwen2.5-0.5B shape at 64 rows (2.7 ms a layer); static: the compiled step took 4.1 ms (0.17 ms a layer,
an upper bound: it includes that model's own memory traffic); vllm: assumed equal to static."""
DISK_BYTES_PER_S = 1.0e9
"""Checkpoint write and read speed (assumed local NVMe-class storage, 1 GB/s)."""
PROMPT_TOKENS_DEFAULT = 256
"""Prompt length when data.max_prompt_tokens is unset (the paper cut HH-RLHF prompts to 256)."""

ASSUMPTIONS = (
    f"runtime overhead {RUNTIME_OVERHEAD_BYTES / GiB:.1f} GiB per process; fits = estimate <= "
    f"{USABLE_FRACTION:.0%} of GPU memory",
    f"fine-tune MFU {TRAIN_MFU:.1%} (measured through raftlib on an H100); forward MFU {FORWARD_MFU:.0%} (assumed)",
    f"decode: max(bytes / (bandwidth x {BANDWIDTH_EFFICIENCY}), FLOPs / (peak x {FORWARD_MFU})) + host overhead "
    "per layer (eager 2.7 ms, static/vllm 0.17 ms; from the H100 measurements)",
    "completions assumed max_new_tokens long (no early EOS); prompts max_prompt_tokens long",
    f"checkpoint write/read {DISK_BYTES_PER_S / 1e9:.0f} GB/s; float32 matmuls at the GPU's fp32 (non-tensor) rate",
)


# ----------------------------------------------------------------------------------------------
# Hardware
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    gpus: int = 1
    """Processes (one per GPU)."""
    gpu_memory_gib: float = 80.0
    """Memory per GPU in GiB, as nvidia-smi reports it (MiB / 1024)."""
    gpu_tflops: float = 989.0
    """Dense bf16/fp16 tensor-core peak per GPU, TFLOP/s."""
    gpu_bandwidth_gbps: float = 3350.0
    """Memory bandwidth per GPU, GB/s."""
    fp32_tflops: float = 0.0
    """Dense float32 (non-tensor-core) peak, TFLOP/s; 0 = gpu_tflops / 15 (the H100/A100 ratio, roughly)."""
    name: str = "custom"

    @property
    def fp32_peak(self) -> float:
        return self.fp32_tflops or self.gpu_tflops / 15

    @classmethod
    def preset(cls, name: str, gpus: int = 1) -> Hardware:
        """A named GPU from `PRESETS` (A40-48GB, A100-80GB, H100-80GB, H200-141GB) times `gpus`."""
        if name not in PRESETS:
            raise ConfigError(f"unknown hardware preset {name!r} (known: {', '.join(PRESETS)})")
        return replace(PRESETS[name], gpus=gpus)

    @classmethod
    def detect(cls, gpus: int) -> Hardware:
        """This machine's GPU (memory from CUDA; the speeds of the closest preset by name, else H100's)."""
        import torch

        properties = torch.cuda.get_device_properties(torch.cuda.current_device())
        memory = properties.total_memory / GiB
        base = next((p for n, p in PRESETS.items() if n.split("-")[0] in properties.name), PRESETS["H100-80GB"])
        return replace(base, gpus=gpus, gpu_memory_gib=memory, name=properties.name)


PRESETS = {
    # datasheet dense bf16 / fp32 peaks and bandwidth; memory as reported by nvidia-smi
    "A40-48GB": Hardware(1, 44.99, 149.7, 696.0, 37.4, "A40-48GB"),
    "A100-80GB": Hardware(1, 79.6, 312.0, 2039.0, 19.5, "A100-80GB"),
    "H100-80GB": Hardware(1, 79.6, 989.0, 3350.0, 67.0, "H100-80GB"),
    "H200-141GB": Hardware(1, 139.8, 989.0, 4800.0, 67.0, "H200-141GB"),
}


# ----------------------------------------------------------------------------------------------
# Model shapes from config.json (no weights)
# ----------------------------------------------------------------------------------------------

KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    # LLaMA-7B (huggyllama/llama-7b = the paper's policy; its config.json)
    "huggyllama/llama-7b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
        "num_hidden_layers": 32, "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 2048,
        "tie_word_embeddings": False, "architectures": ["LlamaForCausalLM"],
    },
    # Open-LLaMA-3B: the RAFT authors' HH reward model is a sequence-classification head on it
    "weqweasdas/hh_rlhf_rm_open_llama_3b": {
        "model_type": "llama", "hidden_size": 3200, "intermediate_size": 8640, "num_attention_heads": 32,
        "num_hidden_layers": 26, "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 2048,
        "tie_word_embeddings": False, "architectures": ["LlamaForSequenceClassification"], "num_labels": 1,
    },
}  # fmt: skip
KNOWN_SHAPES["openlm-research/open_llama_3b"] = KNOWN_SHAPES["weqweasdas/hh_rlhf_rm_open_llama_3b"] | {
    "architectures": ["LlamaForCausalLM"]
}


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need of a transformer, read from its config.json."""

    source: str
    params: int
    """Exact parameter count (the model built on the meta device)."""
    layers: int
    hidden: int
    kv_dim: int
    """Width of the keys (= of the values) per layer: key-value heads x head dim."""
    intermediate: int
    vocab: int
    gated_mlp: bool
    """SwiGLU-style MLP (gate and up projections) as in Llama; else one up projection (GPT-2)."""
    lora_params_per_rank: int = 0
    """Trainable LoRA parameters at rank 1 on peft's default target modules (x r for rank r)."""

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (FSDP gathers one or two of these at a time)."""
        return (self.params - self.vocab * self.hidden * 2) // max(1, self.layers)


def read_model_config(path: str, override: str | None = None) -> tuple[dict[str, Any], str]:
    """config.json as a dict: `override` (a file or dir), else a local dir, else the known-shapes table."""
    if override:
        file = Path(override)
        file = file / "config.json" if file.is_dir() else file
        return _read_json(file), str(file)
    local = Path(path).expanduser()
    if (local / "config.json").is_file():
        return _read_json(local / "config.json"), str(local / "config.json")
    if path in KNOWN_SHAPES:
        return dict(KNOWN_SHAPES[path]), f"{path} (known shape)"
    raise ConfigError(
        f"model.path = {path!r}: no config.json there and not a known shape ({', '.join(KNOWN_SHAPES)}); "
        "give the model's config.json with --model-config PATH"
    )


def _read_json(file: Path) -> dict[str, Any]:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def model_shape(raw: dict[str, Any], source: str, *, head: Literal["lm", "score"] = "lm") -> ModelShape:
    """Count parameters exactly by building the model on the meta device; read the widths from the config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    values = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version", "architectures")}
    if "model_type" not in raw:
        raise ConfigError(f"{source}: config.json has no model_type")
    config = AutoConfig.for_model(raw["model_type"], **values)
    if head == "score":
        config.num_labels = 1
    auto = AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    return ModelShape(
        source=source, params=params, layers=_first(config, "num_hidden_layers", "n_layer"), hidden=hidden,
        kv_dim=kv_heads * head_dim, intermediate=intermediate, vocab=config.vocab_size,
        gated_mlp=hasattr(model.get_submodule(_first_layer_mlp(model)), "gate_proj"),
        lora_params_per_rank=_lora_params_per_rank(model, config.model_type),
    )  # fmt: skip


def _first(config, *names: str) -> int:
    for name in names:
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ConfigError(f"config.json has none of {names}")


def _first_layer_mlp(model) -> str:
    return next(name for name, _ in model.named_modules() if name.endswith(".mlp"))


def _lora_params_per_rank(model, model_type: str, targets: list[str] | None = None) -> int:
    import torch
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    targets = targets or DEFAULTS.get(model_type, [])
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            total += module.in_features + module.out_features
    return total


# ----------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Term:
    """One addend of an estimate: its name, its value (bytes or seconds) and the arithmetic that gave it."""

    name: str
    value: float
    formula: str


@dataclass(frozen=True)
class StageEstimate:
    stage: str
    memory_terms: tuple[Term, ...]
    """Peak memory per process, in bytes, as a sum of these."""
    time_terms: tuple[Term, ...]
    """Seconds per iteration, as a sum of these."""
    fits: bool
    key: str | None = None
    """The setting to change if it does not fit (shown, and used by check_fits, only when `fits` is False)."""
    alternative: bool = False
    """True for a row shown for comparison (e.g. the fine-tune under the strategy not chosen)."""

    @property
    def memory_bytes(self) -> float:
        return sum(t.value for t in self.memory_terms)

    @property
    def seconds(self) -> float:
        return sum(t.value for t in self.time_terms)


@dataclass(frozen=True)
class Plan:
    hardware: Hardware
    sharding: Literal["ddp", "fsdp"]
    iterations: int
    stages: tuple[StageEstimate, ...]
    warnings: tuple[str, ...] = ()
    assumptions: tuple[str, ...] = ASSUMPTIONS
    models: dict[str, str] = field(default_factory=dict)
    """Where each model's shape came from, and its parameter count."""

    @property
    def chosen(self) -> tuple[StageEstimate, ...]:
        return tuple(s for s in self.stages if not s.alternative)

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.chosen)

    @property
    def key(self) -> str | None:
        """The setting to change first (the first stage that does not fit); None when all fit."""
        return next((s.key for s in self.chosen if not s.fits), None)

    @property
    def seconds_per_iteration(self) -> float:
        return sum(s.seconds for s in self.chosen)

    @property
    def total_seconds(self) -> float:
        return self.seconds_per_iteration * self.iterations

    @property
    def limiting_stage(self) -> str:
        return max(self.chosen, key=lambda s: s.seconds).stage

    def table(self, terms: bool = True) -> str:
        """The per-stage table as Markdown, then (optionally) every term's arithmetic."""
        hw = self.hardware
        lines = [
            f"{hw.gpus} x {hw.name} ({hw.gpu_memory_gib:.1f} GiB, {hw.gpu_tflops:g} TFLOP/s bf16, "
            f"{hw.gpu_bandwidth_gbps:g} GB/s); fine-tune under {self.sharding.upper()}; ESTIMATES",
            "",
            "| stage | peak memory per process (GiB) | of GPU | time per iteration (min) | fits | change |",
            "|---|---:|---:|---:|---|---|",
        ]
        for s in self.stages:
            name = f"{s.stage} (alternative)" if s.alternative else s.stage
            share = s.memory_bytes / (hw.gpu_memory_gib * GiB)
            lines.append(
                f"| {name} | {s.memory_bytes / GiB:.1f} | {share:.0%} | {s.seconds / 60:.1f} | "
                f"{'yes' if s.fits else '**no**'} | {'' if s.fits else s.key} |"
            )
        lines += [
            "",
            f"per iteration {self.seconds_per_iteration / 60:.1f} min; {self.iterations} iterations "
            f"{self.total_seconds / 3600:.2f} h; slowest stage: {self.limiting_stage}; "
            + ("fits" if self.fits else f"does NOT fit: change {self.key}"),
        ]
        lines += [f"warning: {w}" for w in self.warnings]
        if terms:
            lines += ["", "models: " + "; ".join(f"{k}: {v}" for k, v in self.models.items()), ""]
            for s in self.stages:
                lines.append(f"{s.stage}:")
                lines += [f"  mem  {t.name}: {t.value / GiB:.2f} GiB = {t.formula}" for t in s.memory_terms]
                lines += [f"  time {t.name}: {t.value:.0f} s = {t.formula}" for t in s.time_terms]
            lines += ["", "assumptions: " + "; ".join(self.assumptions)]
        return "\n".join(lines)


def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB"


def _sharding_from_environment() -> Literal["ddp", "fsdp"]:
    return "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" else "ddp"


def plan(
    config,
    hardware: Hardware,
    *,
    sharding: Literal["auto", "ddp", "fsdp"] = "auto",
    model_config: str | None = None,
    reward_config: str | None = None,
    prompt_tokens: int | None = None,
) -> Plan:
    """Estimate every stage of one iteration of `config` (a RAFTConfig or a DiffusionConfig) on `hardware`.

    `sharding`: the fine-tune's strategy (auto: FSDP when launched with accelerate's FSDP plugin, else DDP);
    the other one is shown as an alternative row. `model_config` / `reward_config` override where the
    policy's / reward model's config.json is read; `prompt_tokens` overrides the assumed prompt length.
    """
    chosen = _sharding_from_environment() if sharding == "auto" else sharding
    if getattr(config, "modality", "text") == "image":
        from raftlib.diffusion.plan import plan_diffusion

        return plan_diffusion(config, hardware, chosen, model_config=model_config)
    return _plan_text(config, hardware, chosen, model_config, reward_config, prompt_tokens)


def check_fits(config, hardware: Hardware, **kwargs) -> None:
    """Raise ConfigError naming the setting to change when a stage clearly cannot fit (estimate > CLEARLY x memory).

    A config the planner cannot read (a model type transformers does not know, a hub id without a known shape)
    is not refused: the check is skipped with a warning, since only a clear estimate may stop a run.
    """
    try:
        estimate = plan(config, hardware, **kwargs)
    except Exception as exc:  # the planner's limits must not stop a run that may well fit
        logger.warning("memory planner skipped: %s", exc)
        return
    memory = hardware.gpu_memory_gib * GiB
    for stage in estimate.chosen:
        if stage.memory_bytes > CLEARLY * memory:
            raise ConfigError(
                f"{stage.key}: the {stage.stage} stage needs about {stage.memory_bytes / GiB:.1f} GiB per process "
                f"(estimate), more than the {hardware.gpu_memory_gib:.1f} GiB of each GPU "
                f"({hardware.gpus} x {hardware.name}); change {stage.key}. "
                "See `python -m raftlib plan CONFIG` for the terms."
            )


# ----------------------------------------------------------------------------------------------
# Language models
# ----------------------------------------------------------------------------------------------


def _reward_model_path(config) -> tuple[str | None, str]:
    """The first reward component that is a Hugging Face reward model: (path, dtype).

    The built-in `reward_model`, or any reward factory whose `path` argument names a model (a dir with a
    config.json, or a hub id of KNOWN_SHAPES), e.g. the suite's `raftsuite.hh_paper:formatted_reward_model`.
    """
    for component in config.reward.components:
        path = component.args.get("path")
        if path is None:
            continue
        is_model = Path(str(path), "config.json").is_file() or str(path) in KNOWN_SHAPES
        if component.fn == "reward_model" or is_model:
            return str(path), str(component.args.get("dtype", "float32"))
    return None, "float32"


def activation_elements_per_token(shape: ModelShape) -> int:
    """Tensors one decoder layer saves for the backward pass, per token (see docs/scale.md):
    2 norms x (input + output) = 4d; q and attention output 2d; k and v 2 kv; MLP: gated 4f
    (gate, silu(gate), up, their product), plain 2f (up, activation)."""
    mlp = 4 if shape.gated_mlp else 2
    return 6 * shape.hidden + 2 * shape.kv_dim + mlp * shape.intermediate


def _plan_text(config, hw: Hardware, sharding: str, model_config, reward_config, prompt_tokens) -> Plan:
    raw, source = read_model_config(config.model.path, model_config)
    policy = model_shape(raw, source)
    models = {"policy": f"{policy.params / 1e9:.3f} B parameters from {source}"}
    rm_path, rm_dtype = _reward_model_path(config)
    reward = None
    if rm_path:
        raw_rm, rm_source = read_model_config(rm_path, reward_config)
        reward = model_shape(raw_rm, rm_source, head="score")
        models["reward"] = f"{reward.params / 1e9:.3f} B parameters from {rm_source}"

    g, t, d, lp = config.generation, config.training, config.data, config.loop
    P = hw.gpus
    Lp = prompt_tokens or d.max_prompt_tokens or PROMPT_TOKENS_DEFAULT
    G = g.max_new_tokens
    S = Lp + G  # tokens per sample
    wb = _BYTES[config.model.dtype]
    N, L = policy.params, policy.layers
    bf16_compute = t.mixed_precision != "no" or wb == 2
    peak = (hw.gpu_tflops if bf16_compute else hw.fp32_peak) * 1e12  # FLOP/s per GPU for the policy
    gen_peak = (hw.gpu_tflops if wb == 2 else hw.fp32_peak) * 1e12  # generation and log-probs: the weights dtype
    bw = hw.gpu_bandwidth_gbps * 1e9 * BANDWIDTH_EFFICIENCY
    overhead = Term("runtime", RUNTIME_OVERHEAD_BYTES, "CUDA context + allocator slack (assumed)")
    weights = Term("policy weights", N * wb, f"N x {wb} B = {N:,} x {wb}")
    memory_limit = hw.gpu_memory_gib * GiB * USABLE_FRACTION
    stages: list[StageEstimate] = []
    warnings: list[str] = []

    # -- generation: K samples for b prompts, sharded by batch over P processes ------------------------------
    K, ppb = g.samples_per_prompt, g.prompts_per_batch
    R = ppb * K
    kv_per_token = 2 * L * policy.kv_dim * wb
    kv = Term(
        "KV cache", R * S * kv_per_token, f"R x S x 2 x L x kv x {wb} B = {R} x {S} x 2 x {L} x {policy.kv_dim} x {wb}"
    )
    logits = Term(
        "prefill logits",
        ppb * Lp * policy.vocab * wb + 2 * R * policy.vocab * 4,
        f"prompts x Lp x V x {wb} B + 2 x R x V x 4 B (sampling) = {ppb} x {Lp} x {policy.vocab} x {wb} + 2 x {R} x {policy.vocab} x 4",
    )  # fmt: skip

    def decode_seconds(prompts: int, samples_per_prompt: int, prefix: str) -> list[Term]:
        """Time to draw `samples_per_prompt` completions for `prompts` prompts, sharded over P processes."""
        rows_per_batch = ppb * samples_per_prompt
        batches = math.ceil(math.ceil(prompts / ppb) / P)
        per_step_bytes = N * wb + rows_per_batch * S * kv_per_token / 2  # the cache is half full on average
        per_step = max(per_step_bytes / bw, 2 * N * rows_per_batch / (gen_peak * FORWARD_MFU))
        host = STEP_OVERHEAD_S_PER_LAYER[g.backend] * L
        prefill = 2 * N * ppb * Lp / (gen_peak * FORWARD_MFU)
        return [
            Term(f"{prefix}decode", batches * G * (per_step + host),
                 f"batches x G x (max(bytes/bw, FLOPs/peak) + host) = {batches} x {G} x ({per_step * 1e3:.1f} + {host * 1e3:.1f} ms)"),
            Term(f"{prefix}prefill", batches * prefill, f"batches x 2N x prompts x Lp / (peak x MFU) = {batches} x {prefill:.3f} s"),
        ]  # fmt: skip

    if g.backend == "vllm":
        share = float(g.vllm_options.get("gpu_memory_utilization", 0.9))
        kv = Term(
            "vLLM pool", hw.gpu_memory_gib * GiB * share - N * wb, f"gpu_memory_utilization {share} x GPU - weights"
        )
        logits = Term("prefill logits", 0, "inside vLLM's pool")
    gen_memory = (weights, kv, logits, overhead)
    stages.append(
        StageEstimate(
            "generate", gen_memory, tuple(decode_seconds(lp.prompts_per_iteration, K, "")),
            fits=sum(x.value for x in gen_memory) <= memory_limit,
            key="generation.prompts_per_batch" if N * wb + RUNTIME_OVERHEAD_BYTES < memory_limit else "model.dtype",
        )
    )  # fmt: skip

    # -- reward scoring: b x K samples, sharded by batch; the policy stays resident ------------------------------
    if reward is not None:
        rb = _BYTES.get(rm_dtype, 4)
        batch = config.reward.batch_size
        rm_peak = (hw.gpu_tflops if rb == 2 else hw.fp32_peak) * 1e12
        rm_memory = (
            weights,
            Term("reward weights", reward.params * rb, f"N_rm x {rb} B = {reward.params:,} x {rb}"),
            Term("reward forward", batch * S * (reward.hidden + reward.intermediate) * rb * 2,
                 f"batch x S x (d + f) x {rb} B x 2 = {batch} x {S} x ({reward.hidden} + {reward.intermediate}) x {rb} x 2"),
            overhead,
        )  # fmt: skip
        samples = lp.prompts_per_iteration * K
        flops = 2 * reward.params * S * samples / P
        stages.append(
            StageEstimate(
                "score (reward model)", rm_memory,
                (Term("forward", flops / (rm_peak * FORWARD_MFU), f"2 N_rm x S x bK / P / (peak x MFU) = 2 x {reward.params:.3g} x {S} x {samples} / {P}"),),
                fits=sum(x.value for x in rm_memory) <= memory_limit, key="reward.args.dtype",
            )
        )  # fmt: skip

    # -- KL reference (selection.kl_coef > 0: log pi_0 of every sample, main process alone) ----------------------
    lora = config.model.lora
    reference_weights = Term(
        "reference weights", 0 if lora else N * wb, "LoRA: adapter disabled, 0" if lora else f"N x {wb} B"
    )
    lp_batch = 16  # completion_logprobs' batch
    lp_memory = Term(
        "log-prob logits", lp_batch * S * policy.vocab * 4 * 2, f"16 x S x V x 4 B x 2 = 16 x {S} x {policy.vocab} x 8"
    )
    ref_memory = (weights, reference_weights, lp_memory, overhead)
    ref_fits = sum(x.value for x in ref_memory) <= memory_limit
    if config.selection.kl_coef > 0:
        samples = lp.prompts_per_iteration * K
        seconds = 2 * N * S * samples / (gen_peak * FORWARD_MFU)  # no autocast: the weights dtype
        stages.append(
            StageEstimate("select (KL reference, main process only)", ref_memory,
                          (Term("forward", seconds, f"2N x S x bK / (peak x MFU) = 2 x {N:.3g} x {S} x {samples}"),),
                          fits=ref_fits, key="model.lora")
        )  # fmt: skip
        if seconds > lp.process_group_timeout_minutes * 60:
            warnings.append(
                f"the main process alone computes reference log-probs for {seconds / 60:.0f} min, past "
                f"loop.process_group_timeout_minutes = {lp.process_group_timeout_minutes:g}: raise it"
            )

    # -- fine-tune: DDP and FSDP (the one not chosen shown for comparison) ----------------------------------------
    kept = config.kept_per_iteration or lp.prompts_per_iteration
    trainable = policy.lora_params_per_rank * lora.r if lora else N
    tokens = kept * S * t.epochs  # every position is computed (prompt included), padded to S
    flops_per_token = (4 if lora else 6) * N + 12 * L * policy.hidden * S  # LoRA: no weight gradients of the base
    if t.gradient_checkpointing:
        flops_per_token += 2 * N  # one more forward
    train_seconds = flops_per_token * tokens / (P * peak * TRAIN_MFU)
    mb_tokens = t.micro_batch_size * S
    ab = 2 if bf16_compute else 4
    per_token = activation_elements_per_token(policy)
    if t.gradient_checkpointing:
        act = Term(
            "activations (checkpointed)",
            mb_tokens * (L * policy.hidden + per_token) * ab,
            f"B x S x (L x d + one layer's {per_token}) x {ab} B = {mb_tokens} x ({L} x {policy.hidden} + {per_token}) x {ab}",
        )
    else:
        act = Term(
            "activations",
            mb_tokens * L * per_token * ab,
            f"B x S x L x (6d + 2kv + {4 if policy.gated_mlp else 2}f) x {ab} B = {mb_tokens} x {L} x {per_token} x {ab}",
        )
    loss_rows = min(mb_tokens, t.loss_chunk_tokens) if t.loss_chunk_tokens else mb_tokens
    # logits and log-softmax (float32), and in the backward their two float32 gradients; autocast adds bf16 logits
    loss_bytes = 20 if t.mixed_precision != "no" else 16
    loss = Term("loss logits", loss_rows * policy.vocab * loss_bytes,
                f"tokens x V x {loss_bytes} B (logits, log-softmax and their gradients) = {loss_rows} x {policy.vocab} x {loss_bytes}")  # fmt: skip
    write = Term(
        "checkpoint", 2 * N * wb / DISK_BYTES_PER_S, f"write + reload N x {wb} B at {DISK_BYTES_PER_S / 1e9:g} GB/s"
    )
    time_terms = (Term("train", train_seconds, f"({4 if lora else 6}N + 12 L d S) x tokens / (P x peak x MFU) = "
                       f"{flops_per_token:.3g} x {tokens:,} / ({P} x {peak / 1e12:g}T x {TRAIN_MFU})"), write)  # fmt: skip
    for strategy in ("ddp", "fsdp"):
        if strategy == "ddp":
            shard, name = 1, "fine-tune (DDP)"
            extra = [Term("DDP gradient buckets", trainable * wb, f"trainable x {wb} B")] if P > 1 else []
            if t.mixed_precision != "no" and wb == 4:
                extra.append(
                    Term("autocast weight copies", trainable * 2, "trainable x 2 B (bf16 casts cached in the forward)")
                )
            master = wb
        else:
            shard, name = P, "fine-tune (FSDP)"
            master = (
                4 if t.mixed_precision != "no" else wb
            )  # accelerate keeps float32 master weights under mixed precision
            extra = [
                Term(
                    "gathered layers",
                    2 * policy.layer_params * (2 if bf16_compute else wb),
                    "2 layers' full weights (current + prefetch) in the compute dtype",
                )
            ]
        frozen = N - trainable
        memory = (
            Term("weights", (trainable * master + frozen * wb) / shard,
                 f"(trainable x {master} B + frozen x {wb} B) / {shard} = ({trainable:,} x {master} + {frozen:,} x {wb}) / {shard}"),
            Term("gradients", trainable * master / shard, f"trainable x {master} B / {shard}"),
            Term("AdamW moments", 2 * trainable * master / shard, f"2 x trainable x {master} B / {shard}"),
            *extra, act, loss, overhead,
        )  # fmt: skip
        total = sum(x.value for x in memory)
        if total <= memory_limit:
            key = None
        elif strategy == "ddp" and P > 1:
            key = "sharding: accelerate launch --config_file examples/accelerate/fsdp.yaml"
        elif act.value > total / 3:
            key = "training.micro_batch_size" if t.gradient_checkpointing else "training.gradient_checkpointing"
        else:
            key = "model.lora"
        stages.append(StageEstimate(name, memory, time_terms, fits=total <= memory_limit, key=key,
                                    alternative=strategy != sharding))  # fmt: skip

    # -- evaluation: generate for the held-out prompts (sharded), then the main process scores and measures ------
    E, k_eval = d.eval_prompts, lp.eval_samples_per_prompt
    if E:
        eval_samples = E * k_eval
        main_only = 2 * N * S * eval_samples / (gen_peak * FORWARD_MFU)  # reference log-probs for the eval KL
        if reward is not None:
            rb = _BYTES.get(rm_dtype, 4)
            rm_peak = (hw.gpu_tflops if rb == 2 else hw.fp32_peak) * 1e12
            main_only += 2 * reward.params * S * eval_samples / (rm_peak * FORWARD_MFU)
        load = (N * wb + (0 if lora else N * wb)) / DISK_BYTES_PER_S
        eval_memory = (weights, reference_weights, lp_memory, overhead)
        stages.append(
            StageEstimate(
                "evaluate", eval_memory,
                (*decode_seconds(E, k_eval, "generate: "),
                 Term("score + KL (main process only)", main_only + load,
                      f"(2N + 2N_rm) x S x {eval_samples} / (peak x MFU) + loading the reference")),
                fits=sum(x.value for x in eval_memory) <= memory_limit, key="model.lora",
            )
        )  # fmt: skip
        if main_only > lp.process_group_timeout_minutes * 60:
            warnings.append(
                f"the main process alone scores the evaluation for {main_only / 60:.0f} min, past "
                f"loop.process_group_timeout_minutes = {lp.process_group_timeout_minutes:g}: raise it"
            )
    return Plan(hw, sharding, lp.iterations, tuple(stages), tuple(warnings), ASSUMPTIONS, models)
