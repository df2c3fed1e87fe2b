"""Config: paper defaults, YAML + dotted overrides, errors that name the key, file and line."""

import textwrap

import pytest

from raftlib.config import ConfigError, RAFTConfig

MINIMAL = {"model": {"path": "m"}, "data": {"prompts": "p.jsonl"}, "reward": {"fn": "length"}}


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_follow_the_paper():
    config = RAFTConfig.from_dict(MINIMAL)
    assert config.selection.strategy == "local"
    assert config.selection.kl_coef == 0.0
    assert config.generation.temperature == 1.0
    assert config.generation.max_new_tokens == 128
    assert config.training.epochs == 2
    assert config.training.learning_rate == 2e-5
    assert config.training.lr_scheduler == "linear"
    assert config.loop.prompts_per_iteration == 2048
    assert config.model.trust_remote_code is False


def test_required_keys():
    with pytest.raises(ConfigError, match=r"model\.path"):
        RAFTConfig.from_dict({"data": {"prompts": "p"}, "reward": {"fn": "length"}})
    with pytest.raises(ConfigError, match=r"reward\.fn"):
        RAFTConfig.from_dict({"model": {"path": "m"}, "data": {"prompts": "p"}})


def test_yaml_and_overrides(tmp_path):
    path = write(
        tmp_path,
        """
        model: {path: ./my-model, lora: {r: 8, alpha: 16}}
        data: {prompts: prompts.jsonl, eval_prompts: 4}
        generation: {samples_per_prompt: 8}
        reward: {fn: my_rewards:positivity}
        """,
    )
    config = RAFTConfig.from_yaml(path, overrides=["generation.temperature=0.8", "loop.iterations=3", "model.lora.r=4"])
    assert config.generation.temperature == 0.8
    assert config.loop.iterations == 3
    assert config.model.lora.r == 4 and config.model.lora.alpha == 16
    assert config.generation.samples_per_prompt == 8


def test_exponent_without_a_dot_is_a_number_on_the_command_line_and_in_yaml(tmp_path):
    # YAML 1.1 (PyYAML) reads `2e-4` as a string; users type learning rates that way.
    for text in ("2e-4", "2E-4", "2.0e-4", "2.e-4"):
        assert RAFTConfig.from_dict(MINIMAL, [f"training.learning_rate={text}"]).training.learning_rate == 2e-4
    path = write(
        tmp_path, "model: {path: m}\ndata: {prompts: p}\nreward: {fn: length}\ntraining:\n  learning_rate: 5e-6\n"
    )
    assert RAFTConfig.from_yaml(path).training.learning_rate == 5e-6
    # Integers stay integers, and what is not a number stays text.
    assert RAFTConfig.from_dict(MINIMAL, ["loop.iterations=3"]).loop.iterations == 3
    with pytest.raises(ConfigError, match=r"training\.learning_rate = '2e': expected a number"):
        RAFTConfig.from_dict(MINIMAL, ["training.learning_rate=2e"])
    # A dot with no digit after it is text, refused by name (it once reached float() and raised a bare ValueError).
    with pytest.raises(ConfigError, match=r"training\.learning_rate = '\._e5': expected a number"):
        RAFTConfig.from_dict(MINIMAL, ["training.learning_rate=._e5"])


def test_notebook_parameters_and_profiles_read_2e_4_as_a_number():
    from raftsuite.runner import parse_cli_parameters

    assert parse_cli_parameters(["learning_rate=2e-4", "seeds=[0, 1]", "name=e5"]) == {
        "learning_rate": 2e-4,
        "seeds": [0, 1],
        "name": "e5",
    }


def test_int_widens_to_float_but_not_the_reverse():
    assert RAFTConfig.from_dict(MINIMAL, ["generation.temperature=1"]).generation.temperature == 1.0
    with pytest.raises(ConfigError, match=r"generation\.samples_per_prompt = 2\.5: expected an integer"):
        RAFTConfig.from_dict(MINIMAL, ["generation.samples_per_prompt=2.5"])


def test_unknown_key_in_yaml_names_file_line_and_key(tmp_path):
    path = write(
        tmp_path,
        """\
        model: {path: m}
        data: {prompts: p.jsonl}
        reward: {fn: length}
        generation:
          samples_per_prompt: 4
          temprature: 0.7
        """,
    )
    with pytest.raises(ConfigError) as info:
        RAFTConfig.from_yaml(path)
    message = str(info.value)
    assert f"{path}:6" in message and "generation.temprature" in message and "temperature" in message


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("generation.samples_per_prompt=0", "generation.samples_per_prompt"),
        ("generation.temperature=-0.1", "generation.temperature"),
        ("generation.top_p=0", "generation.top_p"),
        ("generation.top_p=1.5", "generation.top_p"),
        ("generation.max_new_tokens=0", "generation.max_new_tokens"),
        ("selection.strategy=best", "selection.strategy"),
        ("selection.kl_coef=-1", "selection.kl_coef"),
        ("selection.strategy=threshold", "selection.threshold"),
        ("training.epochs=0", "training.epochs"),
        ("training.learning_rate=0", "training.learning_rate"),
        ("training.warmup_ratio=1.0", "training.warmup_ratio"),
        ("loop.iterations=0", "loop.iterations"),
        ("model.trust_remote_code=yes please", "model.trust_remote_code"),
        ("generation.stop_strings=stop", "generation.stop_strings"),
        ("data.eval_prompts=-1", "data.eval_prompts"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        RAFTConfig.from_dict(MINIMAL, [override])


def test_bad_value_in_yaml_names_line(tmp_path):
    path = write(tmp_path, "model: {path: m}\ndata: {prompts: p}\nreward: {fn: length}\ngeneration:\n  top_p: 2\n")
    with pytest.raises(ConfigError, match=rf"{path}:5: generation\.top_p = 2"):
        RAFTConfig.from_yaml(path)


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"unknown key 'generation\.temp'"):
        RAFTConfig.from_dict(MINIMAL, ["generation.temp=0.5"])
    with pytest.raises(ConfigError, match=r"unknown key 'sampling'"):
        RAFTConfig.from_dict(MINIMAL, ["sampling.k=3"])
    with pytest.raises(ConfigError, match=r"expected dotted\.key=value"):
        RAFTConfig.from_dict(MINIMAL, ["loop.iterations"])


def test_yaml_syntax_error_names_line(tmp_path):
    path = write(tmp_path, "model: {path: m}\ndata: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+:\d+: invalid YAML"):
        RAFTConfig.from_yaml(path)


def test_reward_mix_list_form(tmp_path):
    path = write(
        tmp_path,
        """
        model: {path: m}
        data: {prompts: p.jsonl}
        reward:
          fn:
            - {fn: length, weight: 0.1, args: {unit: chars}}
            - {fn: toy_rewards:letter_a, weight: 2.0}
        """,
    )
    components = RAFTConfig.from_yaml(path).reward.components
    assert [(c.fn, c.weight) for c in components] == [("length", 0.1), ("toy_rewards:letter_a", 2.0)]
    assert components[0].args == {"unit": "chars"}
    bad = write(tmp_path, "model: {path: m}\ndata: {prompts: p}\nreward:\n  fn:\n    - {fn: length, wieght: 1}\n")
    with pytest.raises(ConfigError, match=r"reward\.fn\[0\]\.wieght: unknown key"):
        RAFTConfig.from_yaml(bad)


def test_derived_quantities():
    config = RAFTConfig.from_dict(
        MINIMAL,
        [
            "loop.prompts_per_iteration=100",
            "generation.samples_per_prompt=8",
            "training.micro_batch_size=8",
            "training.gradient_accumulation_steps=2",
            "training.epochs=2",
        ],
    )
    # 800 samples, 100 kept, ceil(100/8)=13 micro-batches -> ceil(13/2)=7 steps per epoch -> 14
    assert config.derived() == {
        "samples_per_iteration": 800,
        "kept_per_iteration": 100,
        "optimizer_steps_per_iteration": 14,
    }
    assert (
        RAFTConfig.from_dict(MINIMAL, ["selection.strategy=threshold", "selection.threshold=1"]).kept_per_iteration
        is None
    )


def test_yaml_round_trip(tmp_path):
    config = RAFTConfig.from_dict(MINIMAL, ["model.lora={r: 4}", "generation.stop_strings=['\\n\\n']"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config.to_yaml())
    assert RAFTConfig.from_yaml(path) == config
    # A string the loader would read as a number (`2e-4` is one) is written quoted, so it comes back a string.
    config = RAFTConfig.from_dict(MINIMAL, ["model.path='1234e56'", "output_dir='2E-4'"])
    assert config.model.path == "1234e56"
    path.write_text(config.to_yaml())
    assert RAFTConfig.from_yaml(path) == config


def test_a_missing_optional_package_is_named_with_its_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    raw = {"model": {"path": "m"}, "data": {"prompts": "p.jsonl"}, "reward": {"fn": "length"}, "output_dir": "o"}
    with pytest.raises(ConfigError, match=r"logging\.tensorboard = True needs the tensorboard package.*pip install"):
        RAFTConfig.from_dict(raw | {"logging": {"tensorboard": True}})
    RAFTConfig.from_dict(raw | {"logging": {"tensorboard": False}})  # off: nothing asked, nothing needed
