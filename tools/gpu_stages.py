"""Every GPU stage of the gpu profile's text notebooks, run once at the profile's batch shapes on hub-shaped models
with random weights, measured against the planner's estimate (`raftsuite.profile_plan`). No hub access needed.

    python tools/gpu_stages.py --out DIR            # on one H100/H200 (Qwen2.5-0.5B, Open-LLaMA-3B RM, Qwen2.5-Math-1.5B)
    python tools/gpu_stages.py --out DIR --tiny     # the same code on a CPU with tiny shapes (tests/test_gpu_stages.py)

Each stage runs the code a notebook runs (raftlib's decoder, raftlib's fine-tune with fp32 master weights under
bf16 autocast, the reward model's forward, TRL's GRPO for one optimizer step) on one batch of the profile's shape,
with CUDA's peak allocation reset before it. Writes DIR/gpu_stages.json after every stage (a stage that fails is
recorded and the next one runs; a deadline skips what would not finish in time) and prints a table last:
stage | estimated GiB | measured GiB | seconds. Generation runs in the profile's policy_dtype without autocast, as
raftlib generates, on the profile's backend where it is installed (the row says which). efficiency and ablations
run hh_rlhf's stages at its shapes (their planned rows are equal). Not covered: the SD notebooks (their UNet shapes
are planned in docs/diffusion_estimates.md), GRPO with TRL's colocated vLLM and FSDP (the paper profile's reasoning
only: its gathered evaluation copy is tested on CPU processes, tests/test_fsdp.py).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30
RESULTS: dict = {"stages": {}}


def shaped_model(directory: Path, shape: dict, tiny: bool, head: str = "lm") -> Path:
    """A model dir of `shape` (a KNOWN_SHAPES config) with random weights and a small BPE tokenizer (ids fit any
    vocabulary); `tiny` shrinks the widths to run on a CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from raftlib import testing as T

    values = {k: v for k, v in shape.items() if k not in ("model_type", "architectures")}
    if tiny:
        values |= {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "vocab_size": 512}  # fmt: skip
    config = AutoConfig.for_model(shape["model_type"], **values)
    if head == "score":
        config.num_labels = 1
    tokenizer = T.build_tokenizer(directory, pad_token=True)
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = (AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM).from_config(config)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def measure(name: str, estimate_gib: float | None, deadline: float, started: float, out: Path):
    def wrap(function):
        if time.perf_counter() - started > deadline:
            RESULTS["stages"][name] = {"skipped": "deadline"}
            return
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        try:
            extra = function() or {}
            peak = torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else None
            RESULTS["stages"][name] = {"ok": True, "seconds": time.perf_counter() - began, "estimated_gib": estimate_gib,
                                       "measured_gib": peak} | extra  # fmt: skip
        except Exception as error:  # record it and go on: one broken stage must not cost the others
            RESULTS["stages"][name] = {"error": repr(error), "traceback": traceback.format_exc()[-3000:]}
        gc.collect()
        print(f"[{time.perf_counter() - started:6.1f}s] {name}: {json.dumps(RESULTS['stages'][name], default=str)[:300]}",
              flush=True)  # fmt: skip
        (out / "gpu_stages.json").write_text(json.dumps(RESULTS, indent=1, default=str))

    return wrap


def estimates(profile: str = "gpu") -> dict[str, float]:
    from raftsuite import profile_plan

    return {f"{r.notebook}: {r.stage}": r.memory_gib for r in profile_plan.plan_profile(profile)}


def run_stages(out: Path, tiny: bool, deadline: float) -> None:
    from raftlib.config import GenerationSection, ModelSection, RAFTConfig, TrainingSection
    from raftlib.estimates import KNOWN_SHAPES
    from raftlib.text.decoders import build_decoder
    from raftlib.text.decoding import DecoderSpec
    from raftlib.text.finetune import finetune
    from raftlib.text.models import load_tokenizer
    from raftlib.text.prompts import TextFormat
    from raftsuite import runner

    started, device = time.perf_counter(), "cuda" if torch.cuda.is_available() else "cpu"
    planned = estimates()
    work = Path(tempfile.mkdtemp(prefix="gpu_stages_"))
    policy_dir = shaped_model(work / "policy", KNOWN_SHAPES["Qwen/Qwen2.5-0.5B"], tiny)
    math_dir = shaped_model(work / "math", KNOWN_SHAPES["Qwen/Qwen2.5-Math-1.5B"], tiny)
    rm_dir = shaped_model(work / "rm", KNOWN_SHAPES["weqweasdas/hh_rlhf_rm_open_llama_3b"], tiny, head="score")
    hh = runner.notebook_parameters("hh_rlhf") | runner.load_profile("gpu")["hh_rlhf"]
    reasoning = runner.notebook_parameters("reasoning") | runner.load_profile("gpu")["reasoning"]
    prompt_tokens, scale = (16, 8) if tiny else (hh["max_prompt_tokens"], 1)

    def generate(model_dir: Path, values: dict, k: int) -> dict:
        """One batch through raftlib's decoder as the run builds it: weights in the profile's policy_dtype and no
        autocast (raftlib generates in the weights' dtype), the profile's backend where it is installed."""
        from transformers import AutoModelForCausalLM

        new_tokens = max(4, values["max_new_tokens"] // scale)
        prompts_per_batch = max(1, values["prompts_per_batch"] // scale)
        dtype = (
            values["policy_dtype"]
            if values["policy_dtype"] != "auto"
            else "bfloat16"
            if device == "cuda"
            else "float32"
        )
        backend = "eager" if tiny else values.get("generation_backend", "eager")
        if backend == "vllm" and importlib.util.find_spec("vllm") is None:
            backend = "eager"  # recorded: the vLLM estimate is then compared against HF's eager decoder
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
        tokenizer = load_tokenizer(ModelSection(path=str(model_dir)))
        section = GenerationSection(
            samples_per_prompt=k,
            max_new_tokens=new_tokens,
            prompts_per_batch=prompts_per_batch,
            backend=backend,
            chat_template="never",
        )
        config = RAFTConfig(model=ModelSection(path=str(model_dir), dtype=dtype), generation=section)
        text_format = TextFormat.of(tokenizer, model, section)
        decoder = build_decoder(DecoderSpec(model, config, text_format, prompts_per_batch * k, prompt_tokens))
        ids = [[5 + (i % 100)] * prompt_tokens for i in range(prompts_per_batch)]
        with torch.no_grad():
            decoded = decoder.decode(ids, samples_per_prompt=k, seed=0)
        decoder.close()
        return {
            "rows": prompts_per_batch * k,
            "new_tokens": new_tokens,
            "dtype": dtype,
            "backend": backend,
            "tokens": int(sum(decoded.lengths) if decoded.lengths else decoded.tokens.numel()),
        }

    def train(model_dir: Path, micro_batch: int, sequence: int, **training) -> dict:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)  # fp32 masters
        section = TrainingSection(learning_rate=1e-5, epochs=1, micro_batch_size=micro_batch,
                                  mixed_precision="bf16" if device == "cuda" else "no", **training)  # fmt: skip
        examples = [(list(range(5, 5 + sequence // 2)), list(range(7, 7 + sequence // 2)))] * (2 * micro_batch)
        _, stats = finetune(model, examples, section, pad_id=0, seed=0, iteration=1, progress=False)
        dtypes = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
        return {"optimizer_steps": stats.optimizer_steps, "trainable_dtypes": dtypes}

    def score(rows: int, sequence: int) -> dict:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(rm_dir, dtype=torch.bfloat16).to(device).eval()
        with torch.no_grad():
            values = model(input_ids=torch.full((rows, sequence), 7, device=device)).logits
        return {"rows": rows, "finite": bool(torch.isfinite(values.float()).all())}

    sequence = prompt_tokens + max(4, hh["max_new_tokens"] // scale)
    K = hh["samples_per_prompt"]
    steps = [
        ("hh_rlhf: RAFT: generate", lambda: generate(policy_dir, hh, K)),
        ("hh_rlhf: RAFT: score (reward model)", lambda: score(max(1, hh["reward_batch_size"] // scale), sequence)),
        ("hh_rlhf: RAFT: fine-tune (DDP)", lambda: train(policy_dir, max(1, hh["micro_batch_size"] // scale), sequence)),
        ("hh_rlhf: SFT setup: fine-tune (fp32 masters)", lambda: train(policy_dir, max(1, 8 // scale), sequence)),
        ("hh_rlhf: RAFT: evaluate", lambda: generate(policy_dir, hh, hh["eval_samples_per_prompt"])),
        ("hh_rlhf: best-of-8 evaluation", lambda: generate(policy_dir, hh, hh["best_of_k_at_inference"])),
        ("hh_rlhf: GRPO: fine-tune (TRL)", lambda: grpo_step(policy_dir, rm_dir, hh, work, scale)),
        ("reasoning: RAFT / RAFT++: generate", lambda: generate(math_dir, reasoning, reasoning["samples_per_prompt"])),
        ("reasoning: RAFT / RAFT++: fine-tune (DDP)",
         lambda: train(math_dir, max(1, reasoning["micro_batch_size"] // scale), prompt_tokens + reasoning["max_new_tokens"] // scale,
                       loss="raftpp", loss_chunk_tokens=reasoning["loss_chunk_tokens"], gradient_checkpointing=True)),
        ("reasoning: RAFT / RAFT++: evaluate", lambda: generate(math_dir, reasoning, reasoning["eval_samples_per_prompt"])),
        ("reasoning: GRPO: fine-tune (TRL)", lambda: reasoning_grpo(math_dir, reasoning, work, scale)),
    ]  # fmt: skip
    # efficiency and ablations run hh_rlhf's stages (the same models and code); their shapes are smaller or equal
    # (ablations generate fewer rows: 6.4 against 10.0 GiB planned), so hh_rlhf's rows bound theirs
    for name, step in steps:
        measure(name, planned.get(name), deadline, started, out)(step)


def grpo_step(policy_dir: Path, rm_dir: Path, values: dict, work: Path, scale: int) -> dict:
    """One GRPO optimizer step through raftsuite.hh_methods.run_grpo (TRL), the reward model resident."""
    from raftlib.records import Prompt
    from raftsuite import hh_methods

    settings = hh_methods.MethodSettings(
        sft_model=str(policy_dir), reward_model=str(rm_dir), samples_per_prompt=values["samples_per_prompt"],
        max_new_tokens=max(4, values["max_new_tokens"] // scale), prompts_per_iteration=values["grpo_prompts_per_step"],
        iterations=1, grpo_prompts_per_step=max(2, values["grpo_prompts_per_step"] // scale),
        grpo_gradient_accumulation_steps=values["grpo_gradient_accumulation_steps"] if scale == 1 else 1,
        mixed_precision="bf16" if torch.cuda.is_available() else "no", gold=False, reward_dtype="bfloat16",
    )  # fmt: skip
    prompts = [Prompt(i, f"prompt number {i}", {}) for i in range(64)]
    record = hh_methods.run_grpo(settings, prompts, hh_methods.MethodRun("grpo", 1e-6, 0), work / "grpo")
    return {"steps": record["steps"]}


def reasoning_grpo(math_dir: Path, values: dict, work: Path, scale: int) -> dict:
    """One iteration of the reasoning notebook's GRPO child (raftsuite.reasoning.grpo_curve: TRL's trainer on the
    policy with raftlib's stop set, the callback's held-out evaluation through raftlib on the run's device, the
    final validation) at the profile's batch shape, on 8 held-out and 8 validation problems."""
    from dataclasses import asdict, replace

    from raftsuite import reasoning as R

    settings = R.ReasoningSettings.from_parameters(values)
    settings = replace(
        settings,
        base_model=str(math_dir),
        iterations=1,
        prompts_per_iteration=max(2, settings.prompts_per_iteration // scale),
        max_new_tokens=max(4, settings.max_new_tokens // scale),
        micro_batch_size=max(1, settings.micro_batch_size // scale),
        eval_samples_per_prompt=2,
        num_processes=1,
        accelerate_config="",
        grpo_use_vllm=False,
        mixed_precision="bf16" if torch.cuda.is_available() else "no",
        generation_backend=settings.generation_backend if scale == 1 and importlib.util.find_spec("vllm") else "eager",
    )
    parameters = {
        "train_dataset": "",
        "eval_problems": 8,
        "validation_problems": 8,
        "base_model": str(math_dir),
        "max_new_tokens": settings.max_new_tokens,
    }
    files = R.problem_files(work / "problems", parameters)
    job = {
        "settings": asdict(settings),
        "files": asdict(files),
        "run": {"method": "GRPO", "learning_rate": 1e-6, "seed": 0},
        "output_dir": str(work / "reasoning_grpo"),
    }
    record = R.grpo_curve(job)
    return {"iterations": len(record["iterations"]), "validation_pass_at_1": record["validation_pass_at_1"]}


def table() -> str:
    lines = ["| stage | estimated GiB | measured GiB | seconds |", "|---|---:|---:|---:|"]
    for name, r in RESULTS["stages"].items():
        if "ok" in r:
            est = "-" if r["estimated_gib"] is None else f"{r['estimated_gib']:.1f}"
            meas = "-" if r["measured_gib"] is None else f"{r['measured_gib']:.1f}"
            lines.append(f"| {name} | {est} | {meas} | {r['seconds']:.1f} |")
        else:
            lines.append(f"| {name} | {r.get('skipped') or r.get('error', '')[:60]} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on a CPU: the code paths, not the numbers")
    parser.add_argument("--deadline", type=float, default=480.0, help="seconds after which stages are skipped")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    RESULTS["environment"] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                              "tiny": args.tiny, "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
    run_stages(args.out, args.tiny, args.deadline)
    print(table())
    return 0 if all("ok" in r for r in RESULTS["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
