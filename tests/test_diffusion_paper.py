"""The Stable Diffusion notebooks' paper path on CPU: stand-ins, pipeline kind and dtype, VAE decode batching,
the LAION head's format and checksum, gradient checkpointing, and the dryrun profile end to end."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from raftlib.diffusion.config import ImageGenerationSection, PipelineSection
from raftlib.diffusion.fetch_laion import FETCH_COMMAND, PUBLISHED_HEADS, fetch
from raftlib.diffusion.pipelines import PipelineError, load_pipeline, sample_pipeline
from raftlib.diffusion.rewards import Aesthetic, check_aesthetic_head, load_aesthetic_head
from raftlib.rewards import RewardError
from raftsuite import runner, standins_diffusion

PAPER = runner.load_profile("paper")


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> Path:
    return standins_diffusion.build(tmp_path_factory.mktemp("standins") / "diffusion")


def _generators(count: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1000 + i) for i in range(count)]


def test_standin_sd_dir_loads_with_the_paper_profiles_kind_and_dtype(standins):
    """The paper profile names SD 1.5 by hub id, so it must set model.kind; the stand-in, laid out like the hub
    repo (safety checker, feature extractor, PNDM, 8x VAE), loads with that kind. bf16 frozen parts, fp32 UNet
    read from the file (not rounded through bf16)."""
    from diffusers import PNDMScheduler
    from safetensors.torch import load_file

    kinds = {PAPER[name]["model_kind"] for name in ("sd_resolution", "sd_alignment")}
    assert kinds == {"stable_diffusion"}
    with pytest.raises(PipelineError, match=r"set model\.kind"):  # what a hub id with kind auto did before
        load_pipeline(PipelineSection(path=PAPER["sd_resolution"]["model"], kind="auto"))

    sd = standins / standins_diffusion.SD_DIR
    index = json.loads((sd / "model_index.json").read_text())
    assert index["safety_checker"] == ["stable_diffusion", "StableDiffusionSafetyChecker"]
    assert (sd / "safety_checker" / "model.safetensors").is_file() and (sd / "feature_extractor").is_dir()
    loaded = load_pipeline(PipelineSection(path=str(sd), kind="stable_diffusion", dtype="bfloat16"))
    assert loaded.kind == "stable_diffusion" and loaded.pipeline.safety_checker is None
    assert isinstance(loaded.scheduler, PNDMScheduler) and loaded.scheduler.config.skip_prk_steps
    assert loaded.pipeline.vae_scale_factor == 8 and loaded.native_size == 64
    assert loaded.pipeline.vae.dtype == loaded.pipeline.text_encoder.dtype == torch.bfloat16
    on_disk = load_file(sd / "unet" / "diffusion_pytorch_model.safetensors")
    for name, tensor in loaded.unet.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, on_disk[name]), name

    images = sample_pipeline(
        loaded,
        ["cat", "ship"],
        _generators(2),
        ImageGenerationSection(num_inference_steps=2, height=32, width=32, scheduler="dpm"),
    )  # fmt: skip  (bf16 VAE and text encoder meet the fp32 UNet under autocast)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8


def test_vae_decode_in_chunks_equals_one_decode(standins):
    """Tolerance: at most 1 of 255 on a pixel (float32 decodes differ in the last bits between batch shapes,
    which can move a value across a rounding boundary); and equal to the diffusers pipeline's own output."""
    loaded = load_pipeline(PipelineSection(path=str(standins / standins_diffusion.SD_DIR), kind="stable_diffusion"))
    settings = dict(num_inference_steps=2, height=32, width=32, scheduler="ddim")
    texts = ["airplane", "bird", "cat", "dog", "frog"]
    whole = sample_pipeline(loaded, texts, _generators(5), ImageGenerationSection(decode_batch_size=5, **settings))
    chunked = sample_pipeline(loaded, texts, _generators(5), ImageGenerationSection(decode_batch_size=2, **settings))
    assert np.abs(whole.astype(int) - chunked.astype(int)).max() <= 1
    from diffusers import DDIMScheduler

    pipeline = loaded.pipeline
    pipeline.scheduler = DDIMScheduler.from_config(loaded.scheduler.config)  # the sampler sample_pipeline built
    reference = pipeline(
        prompt=texts, num_inference_steps=2, height=32, width=32, generator=_generators(5), output_type="np", eta=0.0
    ).images
    pipeline.scheduler = loaded.scheduler
    reference = (np.clip(reference, 0, 1) * 255).round().astype(np.uint8)
    assert np.abs(reference.astype(int) - chunked.astype(int)).max() <= 1


def _laion_format_head(path: Path, dim: int = 768, seed: int = 0) -> Path:
    """What LAION's sa_0_4_vit_l_14_linear.pth unpickles to (read from the file at the pinned commit): an
    OrderedDict {'weight': float32 (1, 768), 'bias': float32 (1,)}, i.e. nn.Linear(768, 1).state_dict()."""
    torch.manual_seed(seed)
    torch.save(OrderedDict(torch.nn.Linear(dim, 1).state_dict()), path)
    return path


def test_laion_head_in_the_published_format_loads_and_its_checksum_is_checked(tmp_path):
    head = _laion_format_head(tmp_path / "head.pth")
    digest = hashlib.sha256(head.read_bytes()).hexdigest()
    module = load_aesthetic_head(head, sha256=digest)
    assert isinstance(module, torch.nn.Linear) and (module.in_features, module.out_features) == (768, 1)
    embedding = torch.nn.functional.normalize(torch.randn(3, 768), dim=-1)
    state = torch.load(head, weights_only=True)
    expected = embedding @ state["weight"].T + state["bias"]
    assert torch.allclose(module(embedding), expected)

    with pytest.raises(RewardError, match=r"SHA-256 \w+ is not the expected"):
        load_aesthetic_head(head, sha256="0" * 64)
    (tmp_path / "head.pth.sha256").write_text("f" * 64 + "  head.pth\n")  # a sidecar is checked too
    with pytest.raises(RewardError, match=r"is not the expected f{64}"):
        check_aesthetic_head(head)
    published = tmp_path / "sa_0_4_vit_l_14_linear.pth"  # LAION's name with other bytes: its checksum applies
    published.write_bytes(head.read_bytes())
    with pytest.raises(RewardError, match=PUBLISHED_HEADS[published.name]):
        check_aesthetic_head(published)


def test_a_missing_head_names_the_command_that_fetches_it(tmp_path, standins):
    missing = tmp_path / "assets" / "laion" / "sa_0_4_vit_l_14_linear.pth"
    message = f"no such file.*`{FETCH_COMMAND} {missing.parent}`"
    with pytest.raises(RewardError, match=message):
        check_aesthetic_head(missing)
    with pytest.raises(RewardError, match=message):  # the reward refuses at construction, before CLIP loads
        Aesthetic(str(standins / standins_diffusion.CLIP_DIR), str(missing))


def test_fetch_writes_only_the_published_bytes(tmp_path):
    wrong = _laion_format_head(tmp_path / "served.pth")  # right format, not LAION's bytes
    with pytest.raises(ValueError, match="SHA-256 .* expected " + PUBLISHED_HEADS["sa_0_4_vit_l_14_linear.pth"]):
        fetch(tmp_path / "assets", url=wrong.as_uri())
    assert not any((tmp_path / "assets").iterdir())  # nothing half-written left behind


def test_aesthetic_on_the_standin_clip_and_head(standins):
    """The stand-in CLIP has ViT-L/14's 768-dim projection, so the head in LAION's format fits it."""
    from PIL import Image

    scorer = Aesthetic(str(standins / standins_diffusion.CLIP_DIR), str(standins / standins_diffusion.HEAD))
    images = [Image.fromarray(np.full((32, 32, 3), v, np.uint8)) for v in (0, 255)]
    scorer.setup()
    try:
        values = scorer(images, ["", ""])
        head = load_aesthetic_head(standins / standins_diffusion.HEAD)
        expected = head(scorer.image_embeddings(images)).squeeze(-1).tolist()
    finally:
        scorer.teardown()
    assert values == pytest.approx(expected) and values[0] != values[1]


def test_gradient_checkpointing_gives_the_same_lora_step(standins):
    from raftlib.config import LoraSection, TrainingSection
    from raftlib.diffusion.train import finetune_images, load_policy, lora_state_dict

    section = PipelineSection(
        path=str(standins / standins_diffusion.SD_DIR), kind="stable_diffusion", lora=LoraSection(r=4, alpha=4)
    )
    generated = None
    results = []
    for checkpointing in (False, True):
        loaded = load_policy(section, None, "cpu", seed=0)
        if generated is None:
            from raftlib.diffusion.pipelines import ImageSample

            pixels = sample_pipeline(
                loaded,
                ["cat", "ship"],
                _generators(2),
                ImageGenerationSection(num_inference_steps=2, height=32, width=32),
            )
            generated = [ImageSample(i, 0, t, 0, image) for i, (t, image) in enumerate(zip(["cat", "ship"], pixels))]
        training = TrainingSection(
            learning_rate=1e-3, epochs=1, micro_batch_size=2, gradient_checkpointing=checkpointing
        )
        loaded, stats = finetune_images(loaded, generated, training, seed=0, iteration=1, progress=False)
        assert not loaded.unet.is_gradient_checkpointing  # switched off again for sampling
        results.append((stats.first_epoch_loss, lora_state_dict(loaded.unet)))
    (loss_a, weights_a), (loss_b, weights_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in weights_a:
        assert torch.allclose(weights_a[name], weights_b[name], atol=1e-6), name


def test_standins_build_once(tmp_path):
    first = standins_diffusion.build(tmp_path / "diffusion")
    stamp = (first / "STANDINS.json").stat().st_mtime_ns
    assert standins_diffusion.build(tmp_path / "diffusion") == first
    assert (first / "STANDINS.json").stat().st_mtime_ns == stamp  # the finished build is reused
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".diffusion.") and p.is_dir()]


@pytest.mark.parametrize("name", ["sd_resolution", "sd_alignment"])
def test_dryrun_profile_runs_under_papermill_on_two_processes(name, standins, tmp_path):
    """The dryrun profile as `make reproduce-all PROFILE=dryrun` runs it (2 `accelerate launch` CPU processes,
    bf16 autocast, LoRA, DPM-Solver, CLIP / aesthetic head), with the stand-ins from this test's dir."""
    dryrun = runner.load_profile("dryrun")[name]
    assert dryrun["num_processes"] == 2 and dryrun["model_kind"] == PAPER[name]["model_kind"]
    assert set(dryrun) - {"standins"} <= set(PAPER[name]) | {"eval_samples_per_prompt"}  # every paper key, no other
    local = {
        "standins": str(standins),
        "model": str(standins / standins_diffusion.SD_DIR),
        "clip_model": str(standins / standins_diffusion.CLIP_DIR),
    }
    if name == "sd_resolution":
        local["aesthetic_head"] = str(standins / standins_diffusion.HEAD)
    outcome = runner.run_notebook(name, "dryrun", local, results=tmp_path / "results", runs=tmp_path / "runs")
    assert outcome.ok, outcome.error
    run_dir = tmp_path / "runs" / "dryrun" / name / "raft"
    assert (run_dir / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert "2 processes" in (run_dir / "launch" / "launch.log").read_text()
    # best of K for each prompt, then the paper's top-N cap (max_kept; the paper keeps 8 of 10)
    import pyarrow.parquet as pq

    assert pq.read_table(run_dir / "iter_0001" / "kept.parquet").num_rows == dryrun["max_kept"]
