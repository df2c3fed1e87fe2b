import sys
from pathlib import Path

import pytest

# toy_rewards (examples/toy) is the "module you wrote" that configs name as toy_rewards:letter_a
sys.path.insert(0, str(Path(__file__).parent.parent / "examples" / "toy"))

from raftlib import testing


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return testing.build_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return testing.build_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    return testing.write_prompts(tmp_path_factory.mktemp("data") / "prompts.jsonl")


def base_config(model_dir: Path, prompts: Path, output_dir: Path, **sections) -> dict:
    """A small, fast run: 8 prompts x K=4, 12 new tokens, lr high enough to move a random model."""
    config = {
        "model": {"path": str(model_dir)},
        "data": {"prompts": str(prompts), "eval_prompts": 8},
        "generation": {"samples_per_prompt": 4, "max_new_tokens": 12, "prompts_per_batch": 4},
        "reward": {"fn": "toy_rewards:letter_a"},
        "training": {"learning_rate": 3.0e-3, "epochs": 2, "micro_batch_size": 4},
        "loop": {"iterations": 2, "prompts_per_iteration": 8},
        "logging": {"tensorboard": False, "progress_bars": False},
        "seed": 0,
        "output_dir": str(output_dir),
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(name), dict):
            config[name] = config[name] | values
        else:
            config[name] = values
    return config
