"""Generation speed side by side in one process: HF `generate`, raftlib's eager, static and vLLM decoders.

    python -m raftsuite.bench_generation results/tiny/bench [--rows 64 512] [--rounds 3] [--threads 2]

Same model (assets/tiny-lm, float32, on the CPU here), the same prompts (the first of
notebooks/data/openings.jsonl), temperature 1, K = 8, 48 new tokens. Each round times every decoder once, in
turn, so a load change on this shared machine hits all of them alike; the table gives the median over rounds of
completion tokens per second (tokens up to and including each row's EOS, for every decoder alike) and its ratio
to HF `generate` in the same round. Writes generation.csv (every timing), generation.md (the table) and
machine.json (CPU, threads, versions, date), then one RAFT iteration end to end per backend
(raft_iteration.csv, appended to the table). Speed is measured here, never asserted in a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

MODEL = "assets/tiny-lm"
PROMPTS = "notebooks/data/openings.jsonl"
K = 8
NEW_TOKENS = 48


def hf_generate(model, tokenizer, ids: list[list[int]], seed: int) -> int:
    """Completion tokens of HF `generate(do_sample=True, num_return_sequences=K)` (up to each row's EOS)."""
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    attention = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            max_new_tokens=NEW_TOKENS,
            num_return_sequences=K,
            pad_token_id=pad,
        )
    completions = out[:, width:]
    is_eos = completions == tokenizer.eos_token_id
    return int(torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, completions.shape[1]).sum())


def decoders(model, rows: int, width: int, backends: tuple[str, ...] = ("eager", "static", "vllm")):
    """raftlib's decoders (all three by default) on the same model, built as a run builds them."""
    from raftlib.text.config import RAFTConfig
    from raftlib.text.decoders import build_decoder
    from raftlib.text.decoding import DecoderSpec
    from raftlib.text.models import load_tokenizer
    from raftlib.text.prompts import TextFormat

    built = {}
    for backend in backends:
        config = RAFTConfig.from_dict(
            {
                "model": {"path": MODEL},
                "data": {"prompts": PROMPTS},
                "reward": {"fn": "length"},
                "generation": {
                    "samples_per_prompt": K,
                    "max_new_tokens": NEW_TOKENS,
                    "prompts_per_batch": rows // K,
                    "chat_template": "never",
                    "backend": backend,
                },
            }
        )
        tokenizer = load_tokenizer(config.model)
        text_format = TextFormat.of(tokenizer, model, config.generation)
        built[f"raftlib {backend}"] = (build_decoder(DecoderSpec(model, config, text_format, rows, width)), text_format)
    return built


def raft_iteration(backend: str, work: Path, prompts: int = 64, new_tokens: int = 32, iterations: int = 1) -> dict:
    """A RAFT run of `iterations` iterations end to end with `backend` (assets/tiny-lm, K = 8, the word-count
    reward): wall seconds from the call to the returned run (vLLM's engine start included, once per run, as a
    run pays it) and each stage's seconds summed over the iterations. Evaluation is off (eval_prompts 0) so only
    the iterations are timed."""
    from raftlib.config import RAFTConfig
    from raftlib.loop import run

    config = RAFTConfig.from_dict(
        {
            "model": {"path": MODEL},
            "data": {"prompts": PROMPTS, "eval_prompts": 0},
            "reward": {"fn": "length"},
            "loop": {"iterations": iterations, "prompts_per_iteration": prompts},
            "output_dir": str(work / backend),
            "generation": {"samples_per_prompt": K, "max_new_tokens": new_tokens, "prompts_per_batch": 16,
                           "chat_template": "never", "backend": backend},
            "training": {"learning_rate": 1e-4, "epochs": 1, "micro_batch_size": 16},
        }
    )  # fmt: skip
    began = time.perf_counter()
    result = run(config)
    wall = time.perf_counter() - began
    rows = [r for r in result.metrics if r["iteration"] >= 1]
    stages = {k: sum(r[k] for r in rows) for k in rows[0] if k.startswith("time_")}
    return {"backend": backend, "iterations": iterations, "wall_s": wall} | stages


def arguments(description: str) -> argparse.ArgumentParser:
    """The options every generation timing shares: where to write, the row counts, rounds and threads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("output", type=Path)
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--no-iteration", dest="iteration", action="store_false", help="skip the RAFT iterations")

    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from raftlib.data import read_rows, rows_to_prompts
    from raftlib.text.generate import Draw, generate_samples
    from raftsuite.header import machine, versions

    model = AutoModelForCausalLM.from_pretrained(MODEL).eval()
    all_prompts = rows_to_prompts(read_rows(PROMPTS)[0], "prompt", PROMPTS, "line")
    timings = []
    for rows in args.rows:
        prompts = all_prompts[: rows // K]
        built = decoders(model, rows, width=64)
        text_format = next(iter(built.values()))[1]
        ids = text_format.encode(prompts)
        plan = Draw(seed=0, stream=0, samples_per_prompt=K, prompts_per_batch=len(prompts))
        for decoder, fmt in built.values():  # warm up: first calls allocate, load, compile
            generate_samples(decoder, fmt, prompts[:1], plan)
        hf_generate(model, fmt.tokenizer, ids[:1], 0)
        for round_index in range(args.rounds):
            began = time.perf_counter()
            tokens = hf_generate(model, text_format.tokenizer, ids, round_index)
            timings.append(
                {
                    "rows": rows,
                    "round": round_index,
                    "decoder": "HF generate",
                    "tokens": tokens,
                    "seconds": time.perf_counter() - began,
                }
            )
            for name, (decoder, fmt) in built.items():
                began = time.perf_counter()
                samples = generate_samples(decoder, fmt, prompts, Draw(round_index, 0, K, len(prompts)))
                timings.append(
                    {
                        "rows": rows,
                        "round": round_index,
                        "decoder": name,
                        "tokens": sum(s.completion_token_count for s in samples),
                        "seconds": time.perf_counter() - began,
                    }
                )
        for decoder, _ in built.values():
            decoder.close()
    frame = pd.DataFrame(timings)
    frame["tokens_per_s"] = frame["tokens"] / frame["seconds"]
    hf = frame[frame["decoder"] == "HF generate"].set_index(["rows", "round"])["tokens_per_s"]
    frame["ratio_to_hf"] = [row.tokens_per_s / hf[(row.rows, row["round"])] for _, row in frame.iterrows()]
    table = (
        frame.groupby(["rows", "decoder"], sort=False)
        .agg(tokens_per_s=("tokens_per_s", "median"), ratio_to_hf=("ratio_to_hf", "median"))
        .reset_index()
    )
    args.output.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.output / "generation.csv", index=False)
    lines = [
        "| rows | decoder | tokens/s (median) | x HF generate (median of per-round ratios) |",
        "|---:|---|---:|---:|",
    ]
    lines += [f"| {r.rows} | {r.decoder} | {r.tokens_per_s:,.0f} | {r.ratio_to_hf:.2f} |" for r in table.itertuples()]
    (args.output / "generation.md").write_text("\n".join(lines) + "\n")
    facts = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "threads": args.threads,
        "rounds": args.rounds,
        "machine": machine(),
        "versions": versions(),
    }
    (args.output / "machine.json").write_text(json.dumps(facts, indent=2) + "\n")
    if args.iteration:
        import tempfile

        with tempfile.TemporaryDirectory() as work:
            iterations = pd.DataFrame([raft_iteration(b, Path(work)) for b in ("eager", "static", "vllm")])
        iterations.to_csv(args.output / "raft_iteration.csv", index=False)
        columns = [c for c in iterations.columns if c != "backend"]
        lines += ["", "One RAFT iteration end to end (64 prompts, K = 8, 32 new tokens, one epoch; seconds):", "",
                  "| backend | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]  # fmt: skip
        lines += [
            f"| {r['backend']} | " + " | ".join(f"{r[c]:.1f}" for c in columns) + " |" for _, r in iterations.iterrows()
        ]
        (args.output / "generation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"medians over {args.rounds} rounds; {statistics.mean(frame['seconds']):.2f} s per timing on average")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
