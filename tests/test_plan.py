"""The memory and time planner (raftlib.plan): hand-computed figures for LLaMA-7B shapes, refusals naming the key,
the CLI on the paper profile's config (offline: known shapes), and the estimate against a peak measured here."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from raftlib import RAFTConfig, load_config
from raftlib.config import ConfigError
from raftlib.plan import RUNTIME_OVERHEAD_BYTES, GiB, Hardware, check_fits, plan

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "examples" / "paper" / "hh_rlhf_llama7b.yaml"
SHIPPED = ROOT / "examples" / "paper" / "hh_rlhf_llama7b_shipped.yaml"
N_7B = 6_738_415_616
"""LLaMA-7B's parameters: 2 x 32000 x 4096 (embeddings, untied head) + 32 x (4 x 4096^2 + 3 x 4096 x 11008
+ 2 x 4096 norms) + 4096 (final norm)."""


def llama7b(**sections) -> RAFTConfig:
    raw = {
        "model": {"path": "huggyllama/llama-7b"},
        "data": {"prompts": "p.jsonl", "max_prompt_tokens": 256, "eval_prompts": 0},
        "generation": {"samples_per_prompt": 32, "max_new_tokens": 128, "prompts_per_batch": 2},
        "reward": {"fn": "toy_rewards:letter_a"},
        "training": {"micro_batch_size": 8},
        "loop": {"iterations": 12, "prompts_per_iteration": 2048},
    }
    for name, values in sections.items():
        raw[name] = raw.get(name, {}) | values
    return RAFTConfig.from_dict(raw)


def stage(estimate, name):
    return next(s for s in estimate.stages if s.stage == name)


def term(row, name):
    return next(t.value for t in row.memory_terms if t.name == name)


def test_hand_computed_parameters_and_hardware_presets():
    assert 2 * 32000 * 4096 + 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 4096 == N_7B
    estimate = plan(llama7b(), Hardware.preset("A40-48GB", 8), sharding="ddp")
    assert estimate.models["policy"].startswith("6.738 B parameters")
    assert Hardware.preset("H200-141GB").gpu_memory_gib == pytest.approx(139.8)
    with pytest.raises(ConfigError, match="unknown hardware preset 'V100'"):
        Hardware.preset("V100")


def test_float32_full_fine_tune_under_ddp_on_8_x_48_gb_does_not_fit_and_names_fsdp():
    estimate = plan(llama7b(), Hardware.preset("A40-48GB", 8), sharding="ddp")
    ddp = stage(estimate, "fine-tune (DDP)")
    assert term(ddp, "weights") == N_7B * 4
    assert term(ddp, "gradients") == N_7B * 4
    assert term(ddp, "AdamW moments") == 2 * N_7B * 4
    assert term(ddp, "DDP gradient buckets") == N_7B * 4  # 8 processes: DDP's own copy of the gradients
    # activations: 8 samples x 384 tokens x 32 layers x (6 x 4096 + 2 x 4096 + 4 x 11008) elements x 4 B
    assert term(ddp, "activations") == 8 * 384 * 32 * (6 * 4096 + 2 * 4096 + 4 * 11008) * 4
    assert term(ddp, "loss logits") == 8 * 384 * 32000 * 16  # logits, log-softmax, their gradients
    assert not ddp.fits and "fsdp.yaml" in ddp.key
    with pytest.raises(ConfigError, match=r"fsdp\.yaml: the fine-tune \(DDP\) stage needs about 1[0-9]{2}\.\d GiB"):
        check_fits(llama7b(), Hardware.preset("A40-48GB", 8), sharding="ddp")


def test_bf16_full_fine_tune_under_fsdp_on_8_x_80_gb_fits():
    config = llama7b(model={"dtype": "bfloat16"}, training={"mixed_precision": "bf16"})
    estimate = plan(config, Hardware.preset("A100-80GB", 8), sharding="fsdp")
    fsdp = stage(estimate, "fine-tune (FSDP)")
    # accelerate keeps float32 master weights under mixed precision: 4 + 4 + 8 bytes a parameter, over 8 shards
    assert term(fsdp, "weights") == N_7B * 4 / 8
    assert term(fsdp, "gradients") == N_7B * 4 / 8
    assert term(fsdp, "AdamW moments") == 2 * N_7B * 4 / 8
    assert term(fsdp, "activations") == 8 * 384 * 32 * (6 * 4096 + 2 * 4096 + 4 * 11008) * 2  # bf16 autocast
    assert fsdp.fits and not fsdp.alternative and stage(estimate, "fine-tune (DDP)").alternative
    generate = stage(estimate, "generate")
    # KV cache: 2 prompts x K 32 = 64 rows x 384 tokens x 2 (k, v) x 32 layers x 4096 x 2 B
    assert term(generate, "KV cache") == 64 * 384 * 2 * 32 * 4096 * 2
    assert term(generate, "policy weights") == N_7B * 2
    assert estimate.fits and estimate.key is None
    check_fits(config, Hardware.preset("A100-80GB", 8), sharding="fsdp")


def test_lora_in_bf16_on_one_141_gb_gpu_fits_and_float32_generation_batches_do_not():
    config = llama7b(model={"dtype": "bfloat16", "lora": {"r": 16, "alpha": 32}})
    estimate = plan(config, Hardware.preset("H200-141GB", 1), sharding="ddp")
    ddp = stage(estimate, "fine-tune (DDP)")
    lora = 16 * 32 * 2 * (4096 + 4096)  # r x layers x (q_proj, v_proj: peft's Llama default) x (in + out)
    assert term(ddp, "gradients") == lora * 2 and term(ddp, "AdamW moments") == 2 * lora * 2
    assert term(ddp, "weights") == N_7B * 2  # frozen base, bf16
    assert "DDP gradient buckets" not in [t.name for t in ddp.memory_terms]  # one process: no DDP
    assert estimate.fits
    big = llama7b(generation={"prompts_per_batch": 16})  # 512 rows of float32 KV cache: 192 GiB
    estimate = plan(big, Hardware.preset("H200-141GB", 1))
    assert term(stage(estimate, "generate"), "KV cache") == 512 * 384 * 2 * 32 * 4096 * 4
    assert not estimate.fits and estimate.key == "generation.prompts_per_batch"
    with pytest.raises(ConfigError, match=r"^generation\.prompts_per_batch: the generate stage"):
        check_fits(big, Hardware.preset("H200-141GB", 1))


def test_time_terms_are_the_documented_arithmetic():
    from raftlib.plan import TRAIN_MFU

    config = llama7b(model={"dtype": "bfloat16"}, training={"mixed_precision": "bf16"})
    estimate = plan(config, Hardware.preset("A100-80GB", 8), sharding="fsdp")
    train = next(t for t in stage(estimate, "fine-tune (FSDP)").time_terms if t.name == "train")
    tokens = 2048 * 384 * 2  # kept (best of 32 for 2048 prompts) x 384 tokens x 2 epochs
    flops = (6 * N_7B + 12 * 32 * 4096 * 384) * tokens
    assert train.value == pytest.approx(flops / (8 * 312e12 * TRAIN_MFU))
    assert estimate.total_seconds == pytest.approx(12 * estimate.seconds_per_iteration)


def test_the_cli_plans_the_paper_profile_offline():
    done = subprocess.run(
        [sys.executable, "-m", "raftlib", "plan", str(PAPER), "--hardware", "A40-48GB", "--gpus", "8", "--brief"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 3, done.stderr[-2000:]  # the plain fp32 setting does not fit: exit 3
    assert "8 x A40-48GB" in done.stdout and "| generate |" in done.stdout and "| evaluate |" in done.stdout
    assert "does NOT fit: change generation.prompts_per_batch" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "raftlib", "plan", str(PAPER), "model.path=nowhere/unknown"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "--model-config" in bad.stderr


MEASURE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from raftlib.config import TrainingSection
    from raftlib.text.finetune import finetune

    def rss():  # resident bytes now
        return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

    torch.set_num_threads(1)
    baseline = rss()  # after imports: what the planner's stage estimate does not cover
    config = LlamaConfig.from_pretrained(sys.argv[1])
    model = LlamaForCausalLM(config)
    section = TrainingSection(learning_rate=1e-4, epochs=1, micro_batch_size=8)
    examples = [(list(range(1, 193)), list(range(193, 257)))] * 16  # 16 samples of 256 tokens, 2 micro-batches
    finetune(model, examples, section, pad_id=0, seed=0, iteration=1, progress=False)
    from raftsuite.children import peak_rss_mib  # VmHWM: ru_maxrss would carry the pytest worker's size over
    peak = int(peak_rss_mib() * 2**20)
    print(json.dumps({"baseline": baseline, "peak": peak}))
""")


def test_the_fine_tune_estimate_is_within_25_percent_of_the_peak_measured_here(tmp_path):
    """A 21 M-parameter Llama, float32, one process, one fine-tune stage on this CPU: peak resident memory
    minus the resident memory after imports, against the planner's fine-tune row without its runtime term."""
    from transformers import LlamaConfig

    model_dir = tmp_path / "model"
    LlamaConfig(
        vocab_size=8000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
    ).save_pretrained(model_dir)
    done = subprocess.run([sys.executable, "-c", MEASURE, str(model_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.splitlines()[-1])
    used = measured["peak"] - measured["baseline"]
    config = RAFTConfig.from_dict(
        {
            "model": {"path": str(model_dir)},
            "data": {"prompts": "p.jsonl", "max_prompt_tokens": 192, "eval_prompts": 0},
            "generation": {"max_new_tokens": 64},
            "reward": {"fn": "toy_rewards:letter_a"},
            "training": {"micro_batch_size": 8},
        }
    )
    estimate = stage(plan(config, Hardware(gpus=1, gpu_memory_gib=24), sharding="ddp"), "fine-tune (DDP)")
    predicted = estimate.memory_bytes - RUNTIME_OVERHEAD_BYTES
    print(f"fine-tune stage: measured {used / GiB:.3f} GiB, estimated {predicted / GiB:.3f} GiB")
    assert abs(predicted - used) <= 0.25 * used, (predicted / GiB, used / GiB)


def test_diffusion_configs_are_planned_from_their_component_configs(tmp_path):
    import diffusers

    from raftlib.diffusion import testing as T
    from raftlib.diffusion.config import DiffusionConfig

    def load_unet(directory):
        name = json.loads((directory / "config.json").read_text())["_class_name"]
        return getattr(diffusers, name).from_pretrained(directory)

    for path in (T.build_class_conditional(tmp_path / "cc"), T.build_stable_diffusion(tmp_path / "sd")):
        config = DiffusionConfig.from_dict(
            {"model": {"path": str(path)}, "data": {"prompts": "p.jsonl"}, "reward": {"fn": "toy_rewards:brightness"}}
        )
        estimate = plan(config, Hardware.preset("A40-48GB", 2), sharding="fsdp")
        fsdp = stage(estimate, "fine-tune (FSDP)")
        unet = sum(p.numel() for p in load_unet(path / "unet").parameters())  # the real weights, counted
        assert term(fsdp, "UNet weights") == unet * 4 / 2  # float32, 2 shards
        assert term(fsdp, "activations") > 0 and estimate.fits
    # SD 1.5 offline from the known table: 859.5 M UNet parameters (its published count)
    sd15 = DiffusionConfig.from_dict(
        {
            "model": {"path": "stable-diffusion-v1-5/stable-diffusion-v1-5"},
            "data": {"prompts": "p.jsonl"},
            "reward": {"fn": "toy_rewards:brightness"},
        }
    )
    assert plan(sd15, Hardware.preset("A40-48GB")).models["unet"] == "859.5 M parameters"


def test_check_fits_skips_what_it_cannot_read(caplog):
    config = llama7b(model={"path": "some-org/unknown-model"})
    check_fits(config, Hardware.preset("A40-48GB"))  # no config.json, no known shape: warned, not refused
    assert "memory planner skipped" in caplog.text


def test_run_refuses_at_start_on_a_gpu_what_clearly_cannot_fit(llama_dir, prompts_file, tmp_path, monkeypatch):
    """raftlib.run checks the plan before loading anything when its device is CUDA (faked here: no GPU)."""
    import accelerate
    import torch

    import raftlib.loop
    import raftlib.start
    from conftest import base_config

    monkeypatch.setattr(accelerate.Accelerator, "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(raftlib.start.Hardware, "detect", classmethod(lambda cls, gpus: Hardware(gpus, 0.001)))
    config = RAFTConfig.from_dict(base_config(llama_dir, prompts_file, tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"needs about .* GiB per process \(estimate\), more than the 0\.0 GiB"):
        raftlib.loop.run(config)
    assert not (tmp_path / "run" / "iter_0001").exists()


def test_the_shipped_paper_profile_fits_the_hardware_it_documents():
    """8 x 80 GB with LoRA on a bf16 base; its reward model goes through the suite's formatter and is still planned."""
    config = load_config(SHIPPED)
    estimate = plan(config, Hardware.preset("A100-80GB", 8), sharding="ddp")
    assert estimate.fits, estimate.table()
    score = stage(estimate, "score (reward model)")
    assert config.reward.components[0].fn == "raftsuite.hh_paper:formatted_reward_model"
    assert score.memory_bytes > 3_324_076_800 * 2  # the Open-LLaMA-3B RM's bf16 weights are counted


BLOCK_PEFT = textwrap.dedent("""
    import importlib.abc, sys

    class NoPeft(importlib.abc.MetaPathFinder):  # the library installed alone: peft is not there
        def find_spec(self, name, path=None, target=None):
            if name == "peft" or name.startswith("peft."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, NoPeft())
    from raftlib.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")


def test_the_planner_needs_no_peft_for_a_full_fine_tune_and_counts_lora_without_it(tmp_path):
    """`python -m raftlib plan` with peft unimportable: a full fine-tune plans; a LoRA plan counts the adapter from
    the vendored default targets (GPT-2's fused Conv1D included) and honours `model.lora.target_modules`."""
    from raftlib.estimates import KNOWN_SHAPES, _lora_params_per_rank, model_shape

    full = subprocess.run(
        [sys.executable, "-c", BLOCK_PEFT, "plan", str(PAPER), "model.lora=null", "--hardware", "H100-80GB", "--brief"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert full.returncode in (0, 3), full.stderr[-2000:]  # planned (fits or not), not an ImportError
    assert "| fine-tune (DDP) |" in full.stdout and "peft" not in full.stderr
    llama = model_shape(dict(KNOWN_SHAPES["huggyllama/llama-7b"]), "llama")
    assert llama.lora_params_per_rank == 32 * 2 * (4096 + 4096)  # q_proj and v_proj of 32 layers (peft's default)
    every = model_shape(
        dict(KNOWN_SHAPES["huggyllama/llama-7b"]), "llama", lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    assert every.lora_params_per_rank == 2 * llama.lora_params_per_rank
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2))
    assert _lora_params_per_rank(gpt2, "gpt2") == 2 * (64 + 3 * 64)  # c_attn: Conv1D (64 -> 192), was counted 0


@pytest.mark.parametrize("profile", ["gpu", "paper"])
def test_runner_check_plans_every_gpu_stage_of_every_notebook(profile):
    """`runner check --profile gpu|paper` prints the SFT setup, RAFT, GRPO, best-of-K, reasoning and SD stages, and
    the shipped profiles fit their hardware."""
    done = subprocess.run(
        [sys.executable, "-m", "raftsuite.runner", "check", "--profile", profile],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    for stage in (
        "| hh_rlhf | SFT setup",
        "| hh_rlhf | RAFT: generate",
        "| hh_rlhf | GRPO: fine-tune (TRL)",
        "| hh_rlhf | best-of-",
        "| ablations | RAFT: fine-tune",
        "| efficiency | GRPO: generate",
        "| reasoning | RAFT / RAFT++: fine-tune",
        "| reasoning | GRPO: generate",
        "| sd_resolution | RAFT: generate",
        "| sd_alignment | RAFT: fine-tune",
    ):
        assert stage in done.stdout, stage


def test_a_stage_that_cannot_fit_is_refused_naming_the_notebook_parameter():
    from raftlib.estimates import Hardware
    from raftsuite import profile_plan, runner

    values = runner.notebook_parameters("reasoning") | runner.load_profile("paper")["reasoning"]
    hardware = Hardware.preset("A100-80GB", 8)
    fitting = profile_plan.plan_reasoning(values, hardware)
    assert not any(r.clearly_too_big for r in fitting)
    for changed, parameter, stage in (
        ({"grpo_use_vllm": False}, "grpo_use_vllm", "GRPO: generate"),
        ({"loss_chunk_tokens": 0}, "loss_chunk_tokens", "RAFT / RAFT++: fine-tune"),
    ):
        rows = profile_plan.plan_reasoning(values | changed, hardware)
        refused = [r for r in rows if r.clearly_too_big]
        assert refused and all(r.change == parameter for r in refused if stage in r.stage), changed
    grpo = profile_plan.plan_hh(
        "hh_rlhf",
        runner.notebook_parameters("hh_rlhf")
        | runner.load_profile("gpu")["hh_rlhf"]
        | {"grpo_gradient_accumulation_steps": 1},
        Hardware.preset("H100-80GB", 1),
    )
    assert any(r.clearly_too_big and r.change == "grpo_gradient_accumulation_steps" for r in grpo)


def test_runner_check_refuses_a_grpo_baseline_whose_evaluation_could_not_run(monkeypatch):
    """Beyond memory: an HH GRPO baseline under FSDP (its curve is measured on rank 0 alone), a reasoning GRPO
    under FSDP version 1 or with a sharded LoRA policy are named by `runner check`, before any run."""
    from raftsuite import profile_plan, runner

    shipped = runner.load_profile("paper")
    assert profile_plan.refusals("paper") == [] and profile_plan.refusals("gpu") == []
    sharded = {
        "hh_rlhf": shipped["hh_rlhf"] | {"accelerate_config": "examples/accelerate/fsdp.yaml"},
        "reasoning": shipped["reasoning"] | {"lora_rank": 8},
    }
    monkeypatch.setattr(runner, "load_profile", lambda profile: sharded)
    found = profile_plan.refusals("paper")
    assert len(found) == 2
    assert found[0].startswith("hh_rlhf: ") and "measures its held-out reward on the main process alone" in found[0]
    assert found[1].startswith("reasoning: ") and "lora_rank 8 under the FSDP accelerate_config" in found[1]


@pytest.mark.parametrize("profile", ["tiny", "gpu", "paper"])
def test_reasoning_grpo_forwards_micro_batches_and_accumulates_each_update(profile, monkeypatch):
    """Each GRPO forward with gradients holds micro_batch_size sequences per process (it held a whole update:
    128 sequences on the gpu profile, 1,024 on the paper's); an iteration's samples are exactly
    grpo_updates_per_generation optimizer steps. A split that does not divide is refused by `runner check`."""
    from dataclasses import replace

    from raftsuite import profile_plan, reasoning, runner

    entry = runner.load_profile(profile).get("reasoning", {}) if profile != "tiny" else {}
    settings = reasoning.ReasoningSettings.from_parameters(runner.notebook_parameters("reasoning") | dict(entry))
    processes = settings.num_processes
    steps = reasoning.grpo_accumulation_steps(settings, processes)
    micro, updates = settings.micro_batch_size, settings.grpo_updates_per_generation
    assert steps * micro * processes * updates == settings.samples_per_iteration
    if profile != "tiny":  # an update there is more sequences than one forward holds
        assert micro <= 8 < settings.samples_per_iteration // updates // processes
    with pytest.raises(ValueError, match=f"micro_batch_size {micro + 1}"):
        reasoning.grpo_accumulation_steps(replace(settings, micro_batch_size=micro + 1), processes)
    if profile == "paper":
        monkeypatch.setattr(runner, "load_profile", lambda name: {"reasoning": entry | {"micro_batch_size": 7}})
        found = profile_plan.refusals("paper")
        assert len(found) == 1 and found[0].startswith("reasoning: GRPO: ") and "micro_batch_size 7" in found[0]


def test_a_vllm_engine_is_planned_resident_in_every_stage_with_the_pool_raftlib_gives_it():
    # The engine is built once per run and keeps its own weights and KV pool through scoring and the fine-tune.
    from raftlib.estimates import vllm_kv_cache_bytes

    config = llama7b(generation={"backend": "vllm"}, model={"dtype": "bfloat16"})
    estimate = plan(config, Hardware.preset("H100-80GB", 1), sharding="ddp")
    rows, tokens = 2 * 32, 256 + 128
    per_token = 2 * 32 * 4096 * 2  # K and V x layers x kv dim x bf16
    for row in estimate.stages:
        assert term(row, "vLLM weights") == N_7B * 2, row.stage
        assert term(row, "vLLM KV pool") == vllm_kv_cache_bytes(rows, tokens, per_token), row.stage
    eager = plan(llama7b(model={"dtype": "bfloat16"}), Hardware.preset("H100-80GB", 1), sharding="ddp")
    assert not any(t.name.startswith("vLLM") for row in eager.stages for t in row.memory_terms)
    share = llama7b(generation={"backend": "vllm", "vllm_options": {"gpu_memory_utilization": 0.5}})
    pool = term(stage(plan(share, Hardware.preset("H100-80GB", 1), sharding="ddp"), "generate"), "vLLM KV pool")
    assert pool == pytest.approx(Hardware.preset("H100-80GB").gpu_memory_gib * GiB * 0.5 - N_7B * 4)


def test_the_vllm_pool_is_capped_at_a_share_of_the_gpu_and_the_plan_says_how_many_rows_fit():
    from raftlib.estimates import VLLM_KV_MAX_SHARE, vllm_kv_cache_bytes

    config = llama7b(generation={"backend": "vllm", "prompts_per_batch": 16}, model={"dtype": "bfloat16"})
    estimate = plan(config, Hardware.preset("H100-80GB", 1), sharding="ddp")
    device = Hardware.preset("H100-80GB").gpu_memory_gib * GiB
    rows, tokens, per_token = 16 * 32, 256 + 128, 2 * 32 * 4096 * 2
    assert vllm_kv_cache_bytes(rows, tokens, per_token) > device * VLLM_KV_MAX_SHARE  # one batch would want more
    # The cap never goes below one row at its longest, which vLLM needs to start (a 1 GiB device, a 400k-token row).
    assert vllm_kv_cache_bytes(rows, 400_000, per_token, GiB) == int(400_000 * per_token * 1.25)
    assert term(stage(estimate, "generate"), "vLLM KV pool") == int(device * VLLM_KV_MAX_SHARE)
    (warning,) = [w for w in estimate.warnings if "vLLM's KV pool" in w]
    at_once = int(device * VLLM_KV_MAX_SHARE) // (tokens * per_token * 1.25)
    assert f"holds about {at_once:.0f} of a batch's {rows} rows" in warning
    # A pool the user sized is theirs: planned as given (vLLM prefers kv_cache_memory_bytes over a share), no advice.
    h100 = Hardware.preset("H100-80GB", 1)
    for options in (
        {"kv_cache_memory_bytes": 5 * GiB},
        {"kv_cache_memory_bytes": 5 * GiB, "gpu_memory_utilization": 0.9},
    ):
        sized = llama7b(generation={"backend": "vllm", "prompts_per_batch": 16, "vllm_options": options})
        estimate = plan(sized, h100, sharding="ddp")
        assert term(stage(estimate, "generate"), "vLLM KV pool") == 5 * GiB, options
        assert not [w for w in estimate.warnings if "vLLM's KV pool" in w], options
    # A share smaller than the engine's weights leaves no pool, not a negative one.
    small = llama7b(generation={"backend": "vllm", "vllm_options": {"gpu_memory_utilization": 0.01}})
    assert term(stage(plan(small, h100, sharding="ddp"), "generate"), "vLLM KV pool") == 0
