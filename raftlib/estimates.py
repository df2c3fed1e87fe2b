"""The planner's shared primitives: hardware, model shapes, the assumptions, and the estimate records.

`Hardware` (a GPU and how many; `PRESETS`), `ModelShape` read from a model's config.json with `read_model_config`
and `model_shape` (parameters counted exactly on PyTorch's meta device, which allocates nothing; `KNOWN_SHAPES`
holds the paper profile's hub ids, so planning them needs no download), the modelled constants, each named in
`ASSUMPTIONS`, and the records a plan is made of: `Term` (one addend with its arithmetic), `StageEstimate`, `Plan`.
The modality planners (raftlib.text.plan, raftlib.diffusion.plan) build on these; raftlib.plan dispatches to them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from raftlib.sections import ConfigError

GiB = 1024**3
BYTES_PER_ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2}

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

VLLM_KV_MARGIN = 1.25
"""The KV pool raftlib gives a vLLM engine: every row of one batch at its longest, times this (block rounding)."""
VLLM_KV_FLOOR_BYTES = 64 * 1024**2
"""...and never less than 64 MiB (vLLM's scheduler needs room for at least one row at max_model_len)."""
VLLM_KV_MAX_SHARE = 0.25
"""...and on a GPU never more than this share of its memory. raftlib's engine stays resident through scoring and
the fine-tune (no sleep mode), so its pool must leave the policy, its optimizer state and the engine's own weights
room; rows that do not fit at once are scheduled in turn by vLLM (slower, not an error). Without the cap, a
reasoning batch of 512 rows x 4,096 tokens on a 7B model asked for a 141 GiB pool."""

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
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "architectures": ["LlamaForCausalLM"],
    },
    # Open-LLaMA-3B: the RAFT authors' HH reward model is a sequence-classification head on it
    "weqweasdas/hh_rlhf_rm_open_llama_3b": {
        "model_type": "llama",
        "hidden_size": 3200,
        "intermediate_size": 8640,
        "num_attention_heads": 32,
        "num_hidden_layers": 26,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "architectures": ["LlamaForSequenceClassification"],
        "num_labels": 1,
    },
}
# Qwen2.5 (the gpu profiles' policies; config.json of each repo, as published: grouped-query attention, tied
# embeddings below 7B). Qwen2.5-Math's context is 4,096 positions, the base Qwen2.5's 32,768.
_QWEN2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936, "rope_theta": 10000.0}
KNOWN_SHAPES["Qwen/Qwen2.5-0.5B"] = _QWEN2 | {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "num_hidden_layers": 24,
    "max_position_embeddings": 32768,
    "tie_word_embeddings": True,
    "rope_theta": 1000000.0,
}
KNOWN_SHAPES["Qwen/Qwen2.5-Math-1.5B"] = _QWEN2 | {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "num_hidden_layers": 28,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
KNOWN_SHAPES["Qwen/Qwen2.5-Math-7B"] = _QWEN2 | {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "num_hidden_layers": 28,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "vocab_size": 152064,
}
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


def model_shape(
    raw: dict[str, Any], source: str, *, head: Literal["lm", "score"] = "lm", lora_targets: list[str] | None = None
) -> ModelShape:
    """Count parameters exactly by building the model on the meta device; read the widths from the config.
    `lora_targets`: the config's `model.lora.target_modules` (None: peft's default for the architecture)."""
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
        source=source,
        params=params,
        layers=_first(config, "num_hidden_layers", "n_layer"),
        hidden=hidden,
        kv_dim=kv_heads * head_dim,
        intermediate=intermediate,
        vocab=config.vocab_size,
        gated_mlp=hasattr(model.get_submodule(_first_layer_mlp(model)), "gate_proj"),
        lora_params_per_rank=_lora_params_per_rank(model, config.model_type, lora_targets),
    )


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """Keys and values of one token over every layer: 2 x layers x kv heads x head dim x bytes (a transformers
    config object: `model.config`)."""
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    heads = _first(config, "num_attention_heads", "n_head")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return 2 * _first(config, "num_hidden_layers", "n_layer") * kv_heads * head_dim * dtype_bytes


def vllm_kv_cache_bytes(rows: int, tokens_per_row: int, per_token: int, device_bytes: float | None = None) -> int:
    """The KV pool (`kv_cache_memory_bytes`) raftlib gives a vLLM engine, instead of vLLM's default share of the
    whole device: one batch's rows at their longest (`VLLM_KV_MARGIN`, `VLLM_KV_FLOOR_BYTES`), at most
    `VLLM_KV_MAX_SHARE` of a GPU's `device_bytes` (None: a CPU engine, no cap) but never less than one row at its
    longest, which vLLM needs to start at all."""
    one_row = int(tokens_per_row * per_token * VLLM_KV_MARGIN)
    need = max(VLLM_KV_FLOOR_BYTES, int(rows * tokens_per_row * per_token * VLLM_KV_MARGIN))
    if device_bytes:
        need = min(need, max(VLLM_KV_FLOOR_BYTES, one_row, int(device_bytes * VLLM_KV_MAX_SHARE)))
    return need


def _first(config, *names: str) -> int:
    for name in names:
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ConfigError(f"config.json has none of {names}")


def _first_layer_mlp(model) -> str:
    return next(name for name, _ in model.named_modules() if name.endswith(".mlp"))


LORA_DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
}
"""peft's default LoRA targets for the architectures the suite plans (peft.utils.constants
TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), so a plan needs no peft; peft's own table wins when installed."""


def lora_default_targets(model_type: str) -> list[str]:
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS
    except ImportError:  # the library installed alone: a full fine-tune never needs peft, a plan neither
        return LORA_DEFAULT_TARGETS.get(model_type, [])
    return list(DEFAULTS.get(model_type, LORA_DEFAULT_TARGETS.get(model_type, [])))


def _lora_params_per_rank(model, model_type: str, targets: list[str] | None = None) -> int:
    """A + B of every adapted module at rank 1: (in + out) features of each target Linear, or of each target
    transformers Conv1D (GPT-2's fused projections, whose weight is (in, out))."""
    import torch
    from transformers.pytorch_utils import Conv1D

    targets = targets or lora_default_targets(model_type)
    total = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        if isinstance(module, torch.nn.Linear):
            total += module.in_features + module.out_features
        elif isinstance(module, Conv1D):
            total += sum(module.weight.shape)
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
