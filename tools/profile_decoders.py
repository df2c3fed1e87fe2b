"""Where generation time goes, per decoder, side by side in one process (issue 20: "find where their time goes").

    python tools/profile_decoders.py results/tiny/bench [--rows 64 512] [--rounds 3] [--threads 2]

The same model, prompts and settings as `raftsuite.bench_generation` (assets/tiny-lm, float32, temperature 1,
K = 8, 48 new tokens). The model's forward is wrapped with a timer, so each decode's wall time splits into the
model's forwards (the prefill counted apart: its rows and seconds) and everything else the decoder does between
them (sampling, log-probabilities, cache copies, Python). Each round runs every decoder in turn; the table gives
medians over rounds. Writes profile.csv (every round) and profile.md (the table). Measured, never asserted.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raftsuite import bench_generation as bench


class ForwardTimer:
    """Wraps `model.forward`: seconds and rows of the first (prefill) call and of the rest, per decode."""

    def __init__(self, model) -> None:
        self.model, self.inner = model, model.forward
        model.forward = self
        self.reset()

    def reset(self) -> None:
        self.calls, self.prefill_s, self.prefill_rows, self.step_s = 0, 0.0, 0, 0.0

    def __call__(self, *args, **kwargs):
        began = time.perf_counter()
        out = self.inner(*args, **kwargs)
        seconds = time.perf_counter() - began
        if self.calls == 0:
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.prefill_s, self.prefill_rows = seconds, int(ids.shape[0])
        else:
            self.step_s += seconds
        self.calls += 1
        return out


def main(argv: list[str] | None = None) -> int:
    args = bench.arguments(__doc__.splitlines()[0]).parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    from raftlib.data import read_rows, rows_to_prompts
    from raftlib.text.generate import Draw, generate_samples
    from raftsuite.header import machine, versions

    model = AutoModelForCausalLM.from_pretrained(bench.MODEL).eval()
    all_prompts = rows_to_prompts(read_rows(bench.PROMPTS)[0], "prompt", bench.PROMPTS, "line")
    records = []
    for rows in args.rows:
        prompts = all_prompts[: rows // bench.K]
        built = bench.decoders(model, rows, width=64, backends=("eager", "static"))  # vLLM: its own model copy
        text_format = next(iter(built.values()))[1]
        ids = text_format.encode(prompts)
        plan = Draw(seed=0, stream=0, samples_per_prompt=bench.K, prompts_per_batch=len(prompts))
        for decoder, fmt in built.values():  # warm up: first calls allocate and load
            generate_samples(decoder, fmt, prompts[:1], plan)
        bench.hf_generate(model, text_format.tokenizer, ids[:1], 0)
        timer = ForwardTimer(model)
        for round_index in range(args.rounds):
            for name in ("HF generate", *built):
                timer.reset()
                began = time.perf_counter()
                if name == "HF generate":
                    bench.hf_generate(model, text_format.tokenizer, ids, round_index)
                else:
                    generate_samples(*built[name], prompts, plan)
                wall = time.perf_counter() - began
                forward = timer.prefill_s + timer.step_s
                records.append(
                    {
                        "rows": rows,
                        "round": round_index,
                        "decoder": name,
                        "wall_s": wall,
                        "prefill_rows": timer.prefill_rows,
                        "prefill_s": timer.prefill_s,
                        "decode_forward_s": timer.step_s,
                        "forwards": timer.calls,
                        "outside_forward_s": wall - forward,
                    }
                )
        model.forward = timer.inner
    frame = pd.DataFrame(records)
    args.output.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.output / "profile.csv", index=False)
    lines = [
        "| rows | decoder | wall s | prefill rows | prefill s | decode forwards s | outside the forward s (share) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for (rows, decoder), group in frame.groupby(["rows", "decoder"], sort=False):
        med = {c: statistics.median(group[c]) for c in ("wall_s", "prefill_s", "decode_forward_s", "outside_forward_s")}
        lines.append(
            f"| {rows} | {decoder} | {med['wall_s']:.3f} | {int(group['prefill_rows'].iloc[0])} | "
            f"{med['prefill_s']:.3f} | {med['decode_forward_s']:.3f} | "
            f"{med['outside_forward_s']:.3f} ({med['outside_forward_s'] / med['wall_s']:.0%}) |"
        )
    facts = machine()
    header = (
        f"{facts['cpu']}, {args.threads} torch threads, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        + ", ".join(f"{k} {v}" for k, v in versions().items() if k in ("torch", "transformers"))
    )
    (args.output / "profile.md").write_text(header + "\n\n" + "\n".join(lines) + "\n")
    print(header, *lines, sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
