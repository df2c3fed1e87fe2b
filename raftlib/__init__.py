"""raftlib: RAFT (Reward rAnked FineTuning, Dong et al. 2023) for causal language models and diffusion models.

    from raftlib import RAFTConfig, run
    result = run(RAFTConfig.from_yaml("cfg.yaml", overrides=["generation.temperature=0.8"]))
    result = run(DiffusionConfig.from_yaml("sd.yaml"))    # or raftlib.config.load_config(path): either kind

Each stage is importable on its own: `generate_samples`, `build_reward` / `score_samples`,
`select` / `kl_ranking_key`, `finetune`, and the metrics in `raftlib.metrics`.

Where things are: `loop` (the RAFT loop, top to bottom), `modality` (what the loop needs from a kind of model),
`batches` (the resumable batch driver under generation and scoring), `scoring` and `rewards`, `select`,
`finetune` (the shared stage loop), `store` (the run directory), `sections` / `config` (the YAML config);
`text/` and `diffusion/` are the two modalities, each with its config, decoding, training and rewards.
"""

from raftlib.batches import Batches
from raftlib.config import ConfigError, RAFTConfig, load_config
from raftlib.data import load_prompts, prompts_for_iteration
from raftlib.diffusion import DiffusionConfig
from raftlib.loop import RunResult, resume, run
from raftlib.records import Prompt, Sample, Scores, Selection
from raftlib.rewards import REGISTRY, build_reward, register
from raftlib.scoring import score_samples
from raftlib.select import kl_ranking_key, select
from raftlib.text.finetune import completion_logprobs, finetune
from raftlib.text.generate import generate_samples

__version__ = "0.1.0"

__all__ = [
    "REGISTRY",
    "Batches",
    "ConfigError",
    "DiffusionConfig",
    "Prompt",
    "RAFTConfig",
    "RunResult",
    "Sample",
    "Scores",
    "Selection",
    "build_reward",
    "completion_logprobs",
    "finetune",
    "generate_samples",
    "kl_ranking_key",
    "load_config",
    "load_prompts",
    "prompts_for_iteration",
    "register",
    "resume",
    "run",
    "score_samples",
    "select",
]
