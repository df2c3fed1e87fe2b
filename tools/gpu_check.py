"""GPU check (issue 5): generation and fine-tuning speed of raftlib against plain Hugging Face, one short
end-to-end RAFT run on the GPU code path. Sized for about 5 minutes on one H100, no network.

    python tools/gpu_check.py --out DIR            # on the GPU machine (Qwen2.5-0.5B shape, random weights)
    python tools/gpu_check.py --out DIR --tiny     # the same code paths on a CPU, tiny shapes (a smoke test)

Writes DIR/gpu_check.json (every number and error) and prints a table last. Each section runs on its own:
a failure is recorded and the next section still runs; a deadline skips what would not finish.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H100_BF16_DENSE_TFLOPS = 989.4  # NVIDIA's H100 SXM datasheet, dense bf16; the usual MFU denominator

RESULTS: dict = {"sections": {}}
OUTPUT: Path | None = None
STARTED = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - STARTED


def section(name: str, deadline_s: float):
    def wrap(fn):
        def run(*args, **kwargs):
            if elapsed() > deadline_s:
                RESULTS["sections"][name] = {"skipped": f"deadline {deadline_s:.0f} s passed at {elapsed():.0f} s"}
                return None
            began = time.perf_counter()
            try:
                value = fn(*args, **kwargs)
                RESULTS["sections"][name] = {"ok": True, "seconds": time.perf_counter() - began, **(value or {})}
            except Exception as error:  # record and go on: one broken section must not cost the others
                RESULTS["sections"][name] = {"error": repr(error), "traceback": traceback.format_exc()[-3000:]}
            finally:
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            print(f"[{elapsed():6.1f}s] {name}: {json.dumps(RESULTS['sections'][name], default=str)[:400]}", flush=True)
            if OUTPUT is not None:  # after every section: a run cut short still leaves its numbers
                (OUTPUT / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))
            return RESULTS["sections"][name]

        return run

    return wrap


def qwen_shape(tiny: bool):
    from transformers import Qwen2Config

    if tiny:
        return Qwen2Config(
            vocab_size=4096,
            hidden_size=128,
            intermediate_size=352,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        )
    # Qwen2.5-0.5B's shape (config.json of Qwen/Qwen2.5-0.5B), random weights
    return Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )


def build_model(config, device, dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").to(device)
    model.generation_config.eos_token_id = None  # random weights: decode every step, no early stop
    model.generation_config.pad_token_id = 0
    return model


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------------------------
# Generation: HF generate against raftlib's static backend on the same model and batch
# ----------------------------------------------------------------------------------------------


def hf_generate_tokens_per_s(model, rows: int, prompt_len: int, new_tokens: int, device) -> dict:
    torch.manual_seed(1)
    prompts = torch.randint(100, model.config.vocab_size - 100, (rows, prompt_len), device=device)
    kwargs = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=0, eos_token_id=None)
    model.generate(prompts[:, :16], max_new_tokens=4, **kwargs)  # warm-up (kernels, allocator)
    reset_peak()
    sync()
    began = time.perf_counter()
    out = model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    sync()
    seconds = time.perf_counter() - began
    produced = (out.shape[1] - prompt_len) * rows
    return {"tokens_per_s": produced / seconds, "seconds": seconds, "peak_gib": peak_gib()}


def static_tokens_per_s(model, rows: int, k: int, prompt_len: int, new_tokens: int, device, compile_step: bool) -> dict:
    from raftlib.config import GenerationSection
    from raftlib.text.fastgen import StaticDecoder
    from raftlib.text.sampling import batch_generator

    settings = GenerationSection(samples_per_prompt=k, temperature=1.0, max_new_tokens=new_tokens)
    torch.manual_seed(1)
    prompts = torch.randint(100, model.config.vocab_size - 100, (rows // k, prompt_len), device=device)
    attention = torch.ones_like(prompts)
    decoder = StaticDecoder(model, compile=compile_step)
    no_eos = {-1}
    began = time.perf_counter()
    compile_error = None
    try:
        decoder.decode(prompts, attention, k, settings, generator=batch_generator(0, 0, device=device), eos_ids=no_eos)
    except Exception as error:  # keep a number: fall back to the static cache without compilation
        compile_error = repr(error)[:500]
        decoder = StaticDecoder(model, compile=False)
        decoder.decode(prompts, attention, k, settings, generator=batch_generator(0, 0, device=device), eos_ids=no_eos)
    sync()
    first_call = time.perf_counter() - began  # includes compilation and CUDA-graph capture
    reset_peak()
    sync()
    began = time.perf_counter()
    tokens, _ = decoder.decode(
        prompts, attention, k, settings, generator=batch_generator(0, 1, device=device), eos_ids=no_eos
    )
    sync()
    seconds = time.perf_counter() - began
    return {
        "tokens_per_s": tokens.numel() / seconds,
        "seconds": seconds,
        "first_call_s": first_call,
        "peak_gib": peak_gib(),
        "prefills": rows // k,
        "compiled": compile_error is None,
        "compile_error": compile_error,
    }


# ----------------------------------------------------------------------------------------------
# Fine-tuning: raftlib.finetune with the plain settings against the fast ones
# ----------------------------------------------------------------------------------------------


def model_flops_per_token(config, params: int, seq: int) -> float:
    """6N for the matrix products (forward + backward) plus 12·L·d·T for attention (PaLM's appendix B)."""
    return 6 * params + 12 * config.num_hidden_layers * config.hidden_size * seq


def finetune_speed(model_config, device, *, seq: int, micro_batch: int, steps: int, **training) -> dict:
    from accelerate import Accelerator

    from raftlib.config import TrainingSection
    from raftlib.text.finetune import finetune

    model = build_model(model_config, device, torch.float32)  # fp32 master weights, bf16 autocast
    params = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(2)
    prompt_len = seq // 8

    def examples(count):
        ids = torch.randint(100, model_config.vocab_size - 100, (count, seq), generator=generator).tolist()
        return [(row[:prompt_len], row[prompt_len:]) for row in ids]

    section = TrainingSection(
        learning_rate=1e-5,
        epochs=1,
        micro_batch_size=micro_batch,
        lr_scheduler="constant",
        mixed_precision="bf16" if device.type == "cuda" else "no",
        **training,
    )
    accelerator = Accelerator(mixed_precision=section.mixed_precision)
    model, _ = finetune(
        model,
        examples(micro_batch * 2),
        section,
        pad_id=0,
        seed=0,
        iteration=1,
        accelerator=accelerator,
        progress=False,
    )  # warm-up: kernels, allocator, autotuning
    reset_peak()
    sync()
    model, stats = finetune(
        model,
        examples(micro_batch * steps),
        section,
        pad_id=0,
        seed=0,
        iteration=2,
        accelerator=accelerator,
        progress=False,
    )
    sync()
    tokens = micro_batch * steps * seq  # every position runs forward and backward
    tokens_per_s = tokens / stats.seconds
    flops = model_flops_per_token(model_config, params, seq) * tokens_per_s
    result = {
        "tokens_per_s": tokens_per_s,
        "seconds": stats.seconds,
        "params": params,
        "seq": seq,
        "micro_batch": micro_batch,
        "steps": steps,
        "loss_last": stats.last_epoch_loss,
        "peak_gib": peak_gib(),
        "mfu": flops / (H100_BF16_DENSE_TFLOPS * 1e12) if device.type == "cuda" else None,
    }
    del model
    return result


def step_grid(model_config, device, *, seq: int, micro_batch: int, steps: int) -> dict:
    """Where fine-tuning time goes: one optimizer step per micro-batch, timed for each combination of
    weights (fp32 + bf16 autocast, or bf16), gradient checkpointing, and full-logits or chunked loss."""
    from raftlib.text.finetune import chunked_completion_loss, collate, completion_loss, output_head

    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(100, model_config.vocab_size - 100, (micro_batch, seq), generator=generator).tolist()
    batch = {k: v.to(device) for k, v in collate([(r[: seq // 8], r[seq // 8 :]) for r in ids], 0).items()}
    grid = {}
    for weights in ("fp32+autocast", "bf16"):
        model = build_model(model_config, device, torch.float32 if weights == "fp32+autocast" else torch.bfloat16)
        params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=device.type == "cuda")
        head = output_head(model)
        for checkpointing in (True, False):
            if checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_disable()
            model.train()
            for loss_kind in ("full", "chunked"):

                def one_step(model=model, head=head, optimizer=optimizer, weights=weights, loss_kind=loss_kind):
                    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=weights != "bf16")
                    with autocast:
                        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                        if loss_kind == "full":
                            loss = completion_loss(model(**inputs, use_cache=False).logits, batch["labels"])
                        else:
                            out = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1)
                            loss = chunked_completion_loss(out.hidden_states[-1], batch["labels"], head, 4096)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

                try:
                    one_step()
                    one_step()
                    reset_peak()
                    sync()
                    began = time.perf_counter()
                    for _ in range(steps):
                        one_step()
                    sync()
                    seconds = (time.perf_counter() - began) / steps
                    tokens_per_s = micro_batch * seq / seconds
                    mfu = (
                        model_flops_per_token(model_config, params, seq)
                        * tokens_per_s
                        / (H100_BF16_DENSE_TFLOPS * 1e12)
                    )
                    grid[f"{weights} gc={checkpointing} loss={loss_kind}"] = {
                        "tokens_per_s": tokens_per_s,
                        "step_s": seconds,
                        "peak_gib": peak_gib(),
                        "mfu": mfu,
                    }
                except Exception as error:
                    grid[f"{weights} gc={checkpointing} loss={loss_kind}"] = {"error": repr(error)[:300]}
                    optimizer.zero_grad(set_to_none=True)
                print(
                    f"[{elapsed():6.1f}s]   {weights} gc={checkpointing} {loss_kind}: "
                    f"{grid[f'{weights} gc={checkpointing} loss={loss_kind}']}",
                    flush=True,
                )
        model = optimizer = head = None  # free this precision's model before building the next
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"grid": grid}


# ----------------------------------------------------------------------------------------------
# End to end: a short RAFT run with the static backend, bf16 autocast, packing and the chunked loss
# ----------------------------------------------------------------------------------------------


def end_to_end(device, workdir: Path) -> dict:
    import yaml

    from raftlib import RAFTConfig, run
    from raftlib.testing import build_tokenizer, write_prompts

    tokenizer = build_tokenizer(workdir / "model", vocab_size=512)
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(workdir / "model")
    write_prompts(workdir / "prompts.jsonl", count=96)
    cfg = {
        "model": {"path": str(workdir / "model")},
        "data": {"prompts": str(workdir / "prompts.jsonl"), "eval_prompts": 16},
        "generation": {"samples_per_prompt": 4, "max_new_tokens": 32, "prompts_per_batch": 16, "backend": "static"},
        "reward": {"fn": "length", "args": {"unit": "chars", "target": 40}},
        "selection": {"strategy": "local"},
        "training": {
            "learning_rate": 1e-3,
            "epochs": 1,
            "micro_batch_size": 16,
            "packing": True,
            "loss_chunk_tokens": 256,
            "mixed_precision": "bf16" if device.type == "cuda" else "no",
        },
        "loop": {"iterations": 3, "prompts_per_iteration": 64},
        "logging": {"progress_bars": False},
        "output_dir": str(workdir / "run"),
    }
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = run(RAFTConfig.from_yaml(workdir / "config.yaml"))
    rows = result.metrics
    return {
        "eval_reward": [r.get("eval_reward_mean") for r in rows],
        "time_generate_s": [r.get("time_generate_s") for r in rows[1:]],
        "time_finetune_s": [r.get("time_finetune_s") for r in rows[1:]],
        "generate_tokens_per_s": [r.get("generate_tokens_per_s") for r in rows[1:]],
        "peak_gib": peak_gib(),
    }


def finetune_sections(shape, device, seq, micro_batch, steps, dl):
    """raftlib.finetune as a run calls it: plain (checkpointing, full logits) against the fast settings."""
    common = {"seq": seq, "micro_batch": micro_batch, "steps": steps}
    plain = section("finetune_plain", dl * 0.75)(finetune_speed)(shape, device, gradient_checkpointing=True, **common)
    fast = section("finetune_fast", dl * 0.75)(finetune_speed)(shape, device, loss_chunk_tokens=4096, **common)
    section("finetune_fast_packed", dl * 0.75)(finetune_speed)(
        shape, device, loss_chunk_tokens=4096, packing=True, **common
    )
    return plain, fast


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, for a CPU smoke test of the script")
    parser.add_argument("--deadline", type=float, default=420.0, help="seconds after which sections are skipped")
    parser.add_argument("--only", choices=["generate", "finetune", "end_to_end"], help="run one group of sections")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    global OUTPUT
    OUTPUT = args.out
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import accelerate
    import transformers

    RESULTS["environment"] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "tiny": args.tiny,
    }
    print(json.dumps(RESULTS["environment"]), flush=True)
    shape = qwen_shape(args.tiny)
    prompt_len, new_tokens = (16, 16) if args.tiny else (128, 256)
    batches = (8, 32) if args.tiny else (64, 512)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    seq, micro_batch, steps = (128, 4, 3) if args.tiny else (1024, 8, 12)
    if args.only == "finetune" and not args.tiny:
        steps = 40  # a longer stage, so the per-stage setup (optimizer state, first step) weighs less
    dl = args.deadline
    table = []

    wanted = {args.only} if args.only else {"generate", "finetune", "end_to_end"}
    model = build_model(shape, device, dtype) if "generate" in wanted else None
    for rows in batches if "generate" in wanted else ():
        hf = section(f"generate_hf_b{rows}", dl * 0.5)(hf_generate_tokens_per_s)(
            model, rows, prompt_len, new_tokens, device
        )
        fast = section(f"generate_static_b{rows}_k8", dl * 0.5)(static_tokens_per_s)(
            model, rows, 8, prompt_len, new_tokens, device, compile_step=True
        )
        if hf and fast and "tokens_per_s" in hf and "tokens_per_s" in fast:
            table.append((f"generate batch {rows} (K=8)", hf["tokens_per_s"], fast["tokens_per_s"], "tokens/s"))
    del model
    gc.collect()

    if args.only is None:
        section("finetune_step_grid", dl * 0.7)(step_grid)(shape, device, seq=seq, micro_batch=micro_batch, steps=6)
    plain = fast = None
    if "finetune" in wanted:
        plain, fast = finetune_sections(shape, device, seq, micro_batch, steps, dl)
    if plain and fast and "tokens_per_s" in plain and "tokens_per_s" in fast:
        table.append((f"fine-tune seq {seq} tokens/s", plain["tokens_per_s"], fast["tokens_per_s"], "tokens/s"))
        if plain.get("mfu") is not None:
            table.append(("fine-tune MFU", plain["mfu"], fast["mfu"], "fraction"))
        if plain.get("peak_gib") is not None:
            table.append(("fine-tune peak GiB", plain["peak_gib"], fast["peak_gib"], "GiB"))

    if "end_to_end" in wanted:
        with tempfile.TemporaryDirectory() as workdir:
            section("end_to_end_raft", dl)(end_to_end)(device, Path(workdir))

    RESULTS["total_seconds"] = elapsed()
    (args.out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    print(f"\n{'measure':34} {'plain HF':>12} {'raftlib':>12} {'ratio':>7}")
    for name, base, ours, unit in table:
        print(f"{name:34} {base:12.4g} {ours:12.4g} {ours / base if base else math.nan:7.2f}  {unit}")
    for name, value in RESULTS["sections"].items():
        status = "ok" if value.get("ok") else ("SKIPPED" if "skipped" in value else "ERROR " + value["error"][:80])
        numbers = " ".join(
            f"{key}={value[key]:.4g}"
            for key in ("tokens_per_s", "mfu", "peak_gib", "first_call_s", "seconds")
            if isinstance(value.get(key), float)
        )
        print(f"  {name:28} {status:6} {numbers}")
    print(f"total {elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
