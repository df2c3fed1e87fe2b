"""Diffusion: tiny SD / SDXL / class-conditional pipelines built in code, image rewards, LoRA and full
fine-tuning, the shared loop (reward rises, resume after SIGKILL is exact). No network."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import write_config
from raftlib import resume, run
from raftlib.config import LoraSection, RewardSection, TrainingSection, load_config
from raftlib.diffusion import DiffusionConfig
from raftlib.diffusion import testing as T
from raftlib.diffusion.config import ImageGenerationSection, PipelineSection
from raftlib.diffusion.pipelines import ImageSample, PipelineError, generate_images, load_pipeline
from raftlib.diffusion.train import LORA_WEIGHTS, finetune_images, load_policy, save_policy
from raftlib.records import Prompt
from raftlib.rewards import RewardError, build_reward

TESTS = Path(__file__).parent
ENV_PATH = str(TESTS.parent / "examples" / "toy")


@pytest.fixture(scope="module")
def class_conditional(tmp_path_factory) -> Path:
    return T.build_class_conditional(tmp_path_factory.mktemp("cc") / "model")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return T.build_stable_diffusion(tmp_path_factory.mktemp("sd") / "model")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    return T.build_sdxl(tmp_path_factory.mktemp("sdxl") / "model")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return T.build_clip(tmp_path_factory.mktemp("clip") / "model")


def digit_prompts(count: int) -> list[Prompt]:
    return [Prompt(i, f"digit {i % 10}", {"label": i % 10}) for i in range(count)]


# ----------------------------------------------------------------------------------------------
# Generation: shapes, seeds
# ----------------------------------------------------------------------------------------------


def test_each_image_comes_from_its_recorded_seed_whatever_the_batch(class_conditional):
    loaded = load_pipeline(PipelineSection(path=str(class_conditional)))
    prompts = digit_prompts(3)
    settings = ImageGenerationSection(samples_per_prompt=3, num_inference_steps=4, guidance_scale=2.0)
    one_at_a_time = generate_images(loaded, prompts, replace(settings, prompts_per_batch=1), seed=5, stream=1)
    batched = generate_images(loaded, prompts, replace(settings, prompts_per_batch=3), seed=5, stream=1)
    assert [s.seed for s in one_at_a_time] == [s.seed for s in batched]
    assert len({s.seed for s in batched}) == 9  # every image its own seed
    for a, b in zip(one_at_a_time, batched, strict=True):
        assert a.image.shape == (8, 8, 1) and a.image.dtype == np.uint8
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 1  # batching does not change an image
    # any kept image can be regenerated from its row: same prompt, same seed
    row = pq.read_table(_rows_to_parquet(batched[4:5])).to_pylist()[0]
    again = generate_images(loaded, [prompts[1]], settings, seed=5, stream=1)[1]
    assert again.seed == row["seed"] and np.array_equal(again.image, ImageSample.from_row(row).image)
    other_stream = generate_images(loaded, prompts[:1], settings, seed=5, stream=2)
    assert not np.array_equal(other_stream[0].image, batched[0].image)


def _rows_to_parquet(samples: list[ImageSample]):
    import io

    import pyarrow as pa

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([s.to_row() for s in samples]), buffer)
    buffer.seek(0)
    return buffer


def test_resolution_guidance_and_class_column(class_conditional):
    loaded = load_pipeline(PipelineSection(path=str(class_conditional)))
    assert loaded.kind == "class_conditional" and loaded.native_size == 8 and loaded.null_class == 10
    settings = ImageGenerationSection(samples_per_prompt=2, num_inference_steps=3, height=16, width=16)
    images = generate_images(loaded, digit_prompts(2), settings, seed=0, stream=1)
    assert {s.image.shape for s in images} == {(16, 16, 1)} and [s.class_label for s in images] == [0, 0, 1, 1]
    with pytest.raises(PipelineError, match=r"needs an integer class id in column 'label'"):
        generate_images(loaded, [Prompt(0, "digit", {})], settings, seed=0, stream=1)


@pytest.mark.parametrize("kind", ["stable_diffusion", "sdxl"])
def test_stable_diffusion_and_sdxl_draw_k_images_per_prompt(kind, sd_dir, sdxl_dir):
    path = sd_dir if kind == "stable_diffusion" else sdxl_dir
    loaded = load_pipeline(PipelineSection(path=str(path)))
    assert loaded.kind == kind and loaded.native_size == 32
    settings = ImageGenerationSection(samples_per_prompt=2, num_inference_steps=2, guidance_scale=3.0, scheduler="ddim")
    samples = generate_images(loaded, [Prompt(0, "a cat"), Prompt(1, "a dog")], settings, seed=0, stream=1)
    assert [(s.prompt_id, s.sample_index) for s in samples] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert {s.image.shape for s in samples} == {(32, 32, 3)}
    again = generate_images(loaded, [Prompt(1, "a dog")], settings, seed=0, stream=1)  # alone, not in a batch of 4
    assert again[1].seed == samples[3].seed
    assert np.abs(again[1].image.astype(int) - samples[3].image.astype(int)).max() <= 2  # float rounding only


def test_loading_errors_are_clear(tmp_path):
    with pytest.raises(PipelineError, match="no such directory"):
        load_pipeline(PipelineSection(path=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="neither a diffusers pipeline"):
        load_pipeline(PipelineSection(path=str(tmp_path / "empty")))


# ----------------------------------------------------------------------------------------------
# Image rewards
# ----------------------------------------------------------------------------------------------


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    flat = Image.fromarray(np.full((32, 32, 3), 128, dtype=np.uint8))
    noise = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    return [flat, noise]


def test_jpeg_compressibility_prefers_simple_images():
    reward = build_reward(RewardSection(fn="jpeg_compressibility"))
    flat, noise = reward.score(_images(), ["p", "p"]).reward
    assert flat > noise and noise < 0


def test_clip_score_under_a_tiny_clip(clip_dir):
    reward = build_reward(RewardSection(fn="clip_score", args={"clip": str(clip_dir)}))
    reward.setup()
    scores = reward.score(_images(), ["a grey square", "static noise"]).reward
    swapped = reward.score(_images(), ["static noise", "a grey square"]).reward
    reward.teardown()
    assert all(0.0 <= s <= 100.0 for s in scores + swapped) and scores != swapped


def test_aesthetic_linear_and_mlp_heads(clip_dir, tmp_path):
    from safetensors.torch import save_file

    from raftlib.diffusion.rewards import Aesthetic, load_aesthetic_head

    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 1)
    save_file(linear.state_dict(), tmp_path / "linear.safetensors")
    mlp = {
        "layers.0.weight": torch.randn(16, 32),
        "layers.0.bias": torch.randn(16),
        "layers.2.weight": torch.randn(1, 16),
        "layers.2.bias": torch.randn(1),
    }
    torch.save(mlp, tmp_path / "mlp.pth")  # LAION publishes .pth state dicts: read with weights_only
    for head in ("linear.safetensors", "mlp.pth"):
        scorer = Aesthetic(str(clip_dir), str(tmp_path / head))
        scorer.setup()
        values = scorer(_images(), ["", ""])
        expected = load_aesthetic_head(tmp_path / head)(scorer.image_embeddings(_images())).squeeze(-1).tolist()
        scorer.teardown()
        assert values == pytest.approx(expected) and values[0] != values[1]
    save_file(torch.nn.Linear(768, 1).state_dict(), tmp_path / "vit_l.safetensors")
    with pytest.raises(RewardError, match="expects 768-dim CLIP embeddings"):
        Aesthetic(str(clip_dir), str(tmp_path / "vit_l.safetensors")).setup()


def prompted_probabilities(rows: int = 10):
    """A stand-in classifier (images -> probabilities) whose top class is always 0."""

    def predict(images):
        probabilities = np.full((len(images), rows), 0.05)
        probabilities[:, 0] = 0.55
        return probabilities

    return predict


def test_classifier_probability_is_the_prompted_class_not_the_top_class(tmp_path):
    sys.modules[__name__].prompted_probabilities = prompted_probabilities
    reward = build_reward(
        RewardSection(fn="classifier_probability", args={"classifier": f"{__name__}:prompted_probabilities"})
    )
    values = reward.score(_images(), ["digit 0", "digit 3"], label=[0, 3]).reward
    assert values == pytest.approx([0.55, 0.05])
    assert reward.score(_images(), ["", ""], label=[None, 42]).reward == [None, None]  # unusable label: never kept
    with pytest.raises(RewardError, match="no column 'label'"):
        reward.score(_images(), ["", ""])
    with pytest.raises(RewardError, match="exactly one of"):
        build_reward(RewardSection(fn="classifier_probability", args={}))


def test_classifier_probability_from_a_hugging_face_image_classifier(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=37,
        num_labels=10,
    )
    model = ViTForImageClassification(config)
    model.save_pretrained(tmp_path / "vit", safe_serialization=True)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    reward = build_reward(RewardSection(fn="classifier_probability", args={"path": str(tmp_path / "vit")}))
    values = reward.score(_images(), ["", ""], label=[1, 7]).reward
    processor = ViTImageProcessor.from_pretrained(tmp_path / "vit")
    with torch.no_grad():
        expected = model(**processor(images=_images(), return_tensors="pt")).logits.softmax(-1)
    assert values == pytest.approx([float(expected[0, 1]), float(expected[1, 7])], rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Fine-tuning and checkpoints
# ----------------------------------------------------------------------------------------------


def _kept(loaded, prompts, settings) -> list[ImageSample]:
    return generate_images(loaded, prompts, settings, seed=0, stream=1)


@pytest.mark.parametrize("kind", ["stable_diffusion", "sdxl"])
def test_one_lora_step_changes_only_lora_weights_and_diffusers_loads_the_checkpoint(kind, sd_dir, sdxl_dir, tmp_path):
    from diffusers import DiffusionPipeline

    path = str(sd_dir if kind == "stable_diffusion" else sdxl_dir)
    section = PipelineSection(path=path, lora=LoraSection(r=4, alpha=4))
    loaded = load_policy(section, None, "cpu")
    settings = ImageGenerationSection(samples_per_prompt=2, num_inference_steps=2, guidance_scale=1.0)
    kept = _kept(loaded, [Prompt(0, "a cat")], settings)
    before = {k: v.clone() for k, v in loaded.unet.state_dict().items()}
    training = TrainingSection(learning_rate=1e-2, epochs=1, micro_batch_size=2)
    loaded, stats = finetune_images(loaded, kept, training, seed=0, iteration=1, progress=False)
    after = loaded.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed) and stats.optimizer_steps == 1
    save_policy(loaded, section.lora, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / LORA_WEIGHTS).is_file()
    pipeline = DiffusionPipeline.from_pretrained(path)
    pipeline.load_lora_weights(tmp_path / "ckpt")  # what a user does with a RAFT checkpoint
    resumed = load_policy(section, tmp_path / "ckpt", "cpu")  # and what resume does
    for key, value in resumed.unet.state_dict().items():
        if "lora_" in key:
            torch.testing.assert_close(value, after[key])


def test_full_fine_tune_of_a_class_conditional_unet_saves_a_loadable_dir(class_conditional, tmp_path):
    from diffusers import UNet2DModel

    section = PipelineSection(path=str(class_conditional))
    loaded = load_policy(section, None, "cpu")
    kept = _kept(loaded, digit_prompts(2), ImageGenerationSection(samples_per_prompt=2, num_inference_steps=2))
    before = {k: v.clone() for k, v in loaded.unet.state_dict().items()}
    loaded, _ = finetune_images(
        loaded,
        kept,
        TrainingSection(learning_rate=1e-3, epochs=1, micro_batch_size=4),
        seed=0,
        iteration=1,
        progress=False,
    )
    assert any(not torch.equal(before[k], v) for k, v in loaded.unet.state_dict().items())
    save_policy(loaded, None, tmp_path / "ckpt")
    reloaded = UNet2DModel.from_pretrained(tmp_path / "ckpt" / "unet")
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, loaded.unet.state_dict()[key])


# ----------------------------------------------------------------------------------------------
# The shared loop
# ----------------------------------------------------------------------------------------------


def diffusion_config(model: Path, prompts: Path, output: Path, **overrides) -> dict:
    raw = {
        "modality": "image",
        "model": {"path": str(model), "lora": {"r": 4, "alpha": 8}},
        "data": {"prompts": str(prompts), "eval_prompts": 10},
        "generation": {
            "samples_per_prompt": 4,
            "num_inference_steps": 4,
            "guidance_scale": 1.0,
            "prompts_per_batch": 5,
        },
        "reward": {"fn": "toy_rewards:brightness", "batch_size": 20},
        "training": {"learning_rate": 2e-2, "epochs": 2, "micro_batch_size": 5},
        "loop": {"iterations": 3, "prompts_per_iteration": 10, "eval_samples_per_prompt": 2},
        "logging": {"tensorboard": False, "progress_bars": False},
        "seed": 0,
        "output_dir": str(output),
    }
    return raw | overrides


@pytest.fixture(scope="module")
def digit_prompt_file(tmp_path_factory) -> Path:
    from raftsuite.digits import write_prompts

    return write_prompts(tmp_path_factory.mktemp("data") / "digits.jsonl", per_digit=4)


def test_raft_raises_an_image_reward_with_the_shared_loop(class_conditional, digit_prompt_file, tmp_path):
    config = DiffusionConfig.from_dict(diffusion_config(class_conditional, digit_prompt_file, tmp_path / "run"))
    result = run(config)
    rewards = [row["eval_reward_mean"] for row in result.metrics]
    assert rewards[-1] > rewards[0] + 0.05, rewards
    samples = pq.read_table(result.run_dir / "iter_0001" / "samples.parquet").to_pylist()
    assert len(samples) == 40 and sum(r["kept"] for r in samples) == 10
    assert {"seed", "image_png", "reward", "kept", "num_inference_steps"} <= set(samples[0])
    assert (result.final_dir / "adapter_model.safetensors").is_file()
    assert result.metrics[1]["eval_diversity"] > 0
    documented = set((TESTS.parent / "docs" / "metrics.md").read_text().split("`")[1::2])
    missing = {k for row in result.metrics for k in row if k not in documented and not k.startswith("reward/")}
    assert not missing, f"metrics without documentation in docs/metrics.md: {missing}"


def test_a_killed_diffusion_run_resumes_exactly(class_conditional, digit_prompt_file, tmp_path):
    import os

    from safetensors.torch import load_file

    raw = diffusion_config(
        class_conditional,
        digit_prompt_file,
        tmp_path / "reference",
        loop={"iterations": 2, "prompts_per_iteration": 10, "eval_samples_per_prompt": 1},
    )
    reference = run(load_config(write_config(tmp_path / "reference.yaml", raw)))
    raw["output_dir"] = str(tmp_path / "killed")
    config = write_config(tmp_path / "killed.yaml", raw)
    env = {**os.environ, "PYTHONPATH": f"{ENV_PATH}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for point in ("generate-batch", "optimizer-step"):
        argv = ["run", str(config)] if point == "generate-batch" else ["resume", str(tmp_path / "killed")]
        killed = subprocess.run(
            [sys.executable, str(TESTS / "kill_harness.py"), point, "3", "--", *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = resume(tmp_path / "killed")
    for iteration in (1, 2):
        a = pq.read_table(reference.run_dir / f"iter_{iteration:04d}" / "samples.parquet").to_pylist()
        b = pq.read_table(resumed.run_dir / f"iter_{iteration:04d}" / "samples.parquet").to_pylist()
        assert [(r["prompt_id"], r["sample_index"], r["seed"], r["kept"]) for r in a] == [
            (r["prompt_id"], r["sample_index"], r["seed"], r["kept"]) for r in b
        ]
        assert [r["image_png"] for r in a] == [r["image_png"] for r in b]
    assert [m["eval_reward_mean"] for m in resumed.metrics] == [m["eval_reward_mean"] for m in reference.metrics]
    final_a = load_file(reference.final_dir / "adapter_model.safetensors")
    final_b = load_file(resumed.final_dir / "adapter_model.safetensors")
    for key, value in final_a.items():
        torch.testing.assert_close(final_b[key], value, rtol=0, atol=1e-6)


def test_diffusion_config_rules():
    base = {
        "model": {"path": "stable-diffusion-v1-5/stable-diffusion-v1-5", "kind": "stable_diffusion"},
        "data": {"prompts": "p.jsonl"},
        "reward": {"fn": "clip_score", "args": {"clip": "openai/clip-vit-large-patch14"}},
    }
    config = DiffusionConfig.from_dict(base)  # a hub id: validated, nothing downloaded
    assert config.generation.samples_per_prompt == 10 and config.modality == "image"
    from raftlib.config import ConfigError

    with pytest.raises(ConfigError, match=r"selection\.kl_coef = 0\.1: must be 0 for diffusion runs"):
        DiffusionConfig.from_dict(base, ["selection.kl_coef=0.1"])
    with pytest.raises(ConfigError, match=r"training\.packing = True: is a language-model option"):
        DiffusionConfig.from_dict(base, ["training.packing=true"])
    with pytest.raises(ConfigError, match=r"training\.loss = 'raftpp': image runs train with the denoising loss"):
        DiffusionConfig.from_dict(base, ["training.loss=raftpp"])
    with pytest.raises(ConfigError, match=r"generation\.height = 20: must be a multiple of 8"):
        DiffusionConfig.from_dict(base, ["generation.height=20"])
    with pytest.raises(ConfigError, match=r"model\.kind = 'dalle'"):
        DiffusionConfig.from_dict(base, ["model.kind=dalle"])
