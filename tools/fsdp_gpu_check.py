"""GPU check (issue 13): one FSDP fine-tune stage and one generation stage measured against the planner.

    accelerate launch --config_file examples/accelerate/fsdp.yaml --num_processes 1 tools/fsdp_gpu_check.py --out DIR

Model: TinyLlama-1.1B's shape (22 layers, d 2048, f 5632, 4 KV heads, 32k vocabulary), random weights; no
network. Fine-tune: raftlib.finetune under accelerate's FSDP2 plugin, bf16 mixed precision, micro-batch 8 of
384 tokens (256 prompt + 128 completion), 64 samples, one epoch. Generation: raftlib's static backend
(compiled), bf16 weights, 16 prompts x K = 8 of 256 tokens, 128 new tokens, no early stop; the second call is
timed. For each: raftlib.plan's estimate (runtime term left out) against torch.cuda.max_memory_allocated,
and its time against the measured seconds. Writes DIR/fsdp_gpu_check.json; prints a table. Goal: memory
within 15 %. Sized for about 3 minutes on one H100/H200. With --tiny: the same code on a CPU, tiny shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT, NEW, MICRO_BATCH, SAMPLES, PROMPTS, K = 256, 128, 8, 64, 16, 8


def shape(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(
            vocab_size=4000,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )


def raft_config(model_dir: Path, **sections):
    from raftlib import RAFTConfig

    raw = {
        "model": {"path": str(model_dir)},
        "data": {"prompts": "unused.jsonl", "max_prompt_tokens": PROMPT, "eval_prompts": 0},
        "generation": {
            "samples_per_prompt": K,
            "max_new_tokens": NEW,
            "prompts_per_batch": PROMPTS,
            "backend": "static",
        },
        "reward": {"fn": "length"},
        "training": {"micro_batch_size": MICRO_BATCH, "epochs": 1, "mixed_precision": "bf16"},
        "loop": {"iterations": 1, "prompts_per_iteration": SAMPLES},
    }
    for name, values in sections.items():
        raw[name] = raw[name] | values
    return RAFTConfig.from_dict(raw)


def peak() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def finetune_stage(model_config, model_dir: Path, hardware) -> dict:
    from transformers import LlamaForCausalLM

    from raftlib.plan import RUNTIME_OVERHEAD_BYTES, plan
    from raftlib.sharding import build_accelerator, is_sharded
    from raftlib.text.finetune import finetune

    config = raft_config(model_dir)
    accelerator = build_accelerator(config.training)
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config).to(accelerator.device)
    examples = [
        (
            torch.randint(100, model_config.vocab_size, (PROMPT,)).tolist(),
            torch.randint(100, model_config.vocab_size, (NEW,)).tolist(),
        )
        for _ in range(SAMPLES)
    ]
    reset()
    _, stats = finetune(
        model, examples, config.training, pad_id=0, seed=0, iteration=1, accelerator=accelerator, progress=False
    )
    measured = peak()
    row = next(s for s in plan(config, hardware, sharding="fsdp").stages if s.stage == "fine-tune (FSDP)")
    predicted = row.memory_bytes - RUNTIME_OVERHEAD_BYTES
    train = next(t.value for t in row.time_terms if t.name == "train")
    return {
        "sharded": is_sharded(accelerator),
        "measured_peak_allocated_gib": measured / 2**30,
        "predicted_gib": predicted / 2**30,
        "memory_ratio": predicted / measured if measured else None,
        "measured_seconds": stats.seconds,
        "predicted_train_seconds": train,
        "tokens_per_s": SAMPLES * (PROMPT + NEW) / stats.seconds,
        "terms": {t.name: t.value / 2**30 for t in row.memory_terms},
    }


def generation_stage(model_config, model_dir: Path, hardware, device) -> dict:
    from transformers import LlamaForCausalLM

    from raftlib.config import GenerationSection
    from raftlib.plan import RUNTIME_OVERHEAD_BYTES, plan
    from raftlib.text.fastgen import StaticDecoder
    from raftlib.text.sampling import batch_generator

    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config).to(device=device, dtype=torch.bfloat16).eval()
    settings = GenerationSection(samples_per_prompt=K, temperature=1.0, max_new_tokens=NEW)
    prompts = torch.randint(100, model_config.vocab_size, (PROMPTS, PROMPT), device=device)
    attention = torch.ones_like(prompts)
    decoder = StaticDecoder(model, compile=device.type == "cuda")
    began = time.perf_counter()
    decoder.decode(prompts, attention, K, settings, generator=batch_generator(0, 0, device=device), eos_ids={-1})
    first = time.perf_counter() - began
    reset()
    began = time.perf_counter()
    decoder.decode(prompts, attention, K, settings, generator=batch_generator(0, 1, device=device), eos_ids={-1})
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    measured = peak()
    config = raft_config(model_dir, model={"dtype": "bfloat16"}, loop={"prompts_per_iteration": PROMPTS})
    row = next(s for s in plan(config, hardware).stages if s.stage == "generate")
    predicted = row.memory_bytes - RUNTIME_OVERHEAD_BYTES
    return {
        "measured_peak_allocated_gib": measured / 2**30,
        "predicted_gib": predicted / 2**30,
        "memory_ratio": predicted / measured if measured else None,
        "measured_seconds": seconds,
        "first_call_seconds": first,
        "predicted_seconds": row.seconds,
        "tokens_per_s": PROMPTS * K * NEW / seconds,
        "terms": {t.name: t.value / 2**30 for t in row.memory_terms},
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from raftlib.plan import Hardware

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hardware = Hardware.detect(1) if device.type == "cuda" else Hardware(gpus=1, gpu_memory_gib=24, name="cpu")
    model_config = shape(args.tiny)
    model_dir = args.out / "model"
    model_config.save_pretrained(model_dir)  # config.json only: all the planner reads
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "hardware": hardware.__dict__,
    }
    for name, fn in (
        ("finetune_fsdp", lambda: finetune_stage(model_config, model_dir, hardware)),
        ("generate_static", lambda: generation_stage(model_config, model_dir, hardware, device)),
    ):
        try:
            results[name] = fn()
        except Exception as error:  # record and go on: the other stage's numbers still count
            import traceback

            results[name] = {"error": repr(error), "traceback": traceback.format_exc()[-3000:]}
        (args.out / "fsdp_gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
        reset()
    print("| stage | measured GiB | predicted GiB | ratio | measured s | predicted s |")
    for name in ("finetune_fsdp", "generate_static"):
        r = results[name]
        if "error" in r:
            print(f"| {name} | error: {r['error'][:80]} |")
            continue
        seconds = r.get("predicted_train_seconds", r.get("predicted_seconds"))
        print(
            f"| {name} | {r['measured_peak_allocated_gib']:.2f} | {r['predicted_gib']:.2f} | "
            f"{r['memory_ratio'] or float('nan'):.2f} | {r['measured_seconds']:.1f} | {seconds:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
