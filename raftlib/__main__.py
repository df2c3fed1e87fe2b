"""Command line: `python -m raftlib run CONFIG.yaml [dotted.key=value ...]` and `python -m raftlib resume RUN_DIR`.

`python -m raftlib plan CONFIG.yaml [--hardware A40-48GB] [--gpus N] ...` prints the memory/time planner's table.

Exit codes: 0 done (plan: every stage fits); 2 bad config, data or run directory (a one-line message, no
traceback); 3 plan: a stage does not fit; 1 other errors.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raftlib", description="RAFT: Reward rAnked FineTuning")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="start a run (or pick up the same run in its output_dir)")
    run_parser.add_argument("config", help="YAML config file")
    run_parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. loop.iterations=3")
    resume_parser = commands.add_parser("resume", help="continue a run from its directory")
    resume_parser.add_argument("run_dir")
    plan_parser = commands.add_parser(
        "plan", help="estimate each stage's peak memory per process and time per iteration (reads config.json only)"
    )
    plan_parser.add_argument("config", help="YAML config file")
    plan_parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    plan_parser.add_argument(
        "--hardware", default="H100-80GB", help="preset: A40-48GB, A100-80GB, H100-80GB, H200-141GB"
    )
    plan_parser.add_argument("--gpus", type=int, default=1, help="processes, one per GPU (default 1)")
    plan_parser.add_argument("--gpu-memory", type=float, help="GiB per GPU (overrides the preset)")
    plan_parser.add_argument("--gpu-tflops", type=float, help="dense bf16 TFLOP/s per GPU (overrides the preset)")
    plan_parser.add_argument("--gpu-bandwidth", type=float, help="memory bandwidth GB/s per GPU (overrides the preset)")
    plan_parser.add_argument("--sharding", choices=["auto", "ddp", "fsdp"], default="auto", help="fine-tune strategy")
    plan_parser.add_argument("--model-config", help="the policy's config.json (or its dir) when model.path is a hub id")
    plan_parser.add_argument("--reward-config", help="the reward model's config.json when its path is a hub id")
    plan_parser.add_argument("--prompt-tokens", type=int, help="prompt length when data.max_prompt_tokens is unset")
    plan_parser.add_argument("--brief", action="store_true", help="the table only, without each term's arithmetic")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    from raftlib.config import ConfigError, load_config
    from raftlib.data import DataError
    from raftlib.diffusion.pipelines import PipelineError
    from raftlib.hub import ModelLoadError
    from raftlib.loop import resume, run
    from raftlib.rewards import RewardError
    from raftlib.store import RunDirError
    from raftlib.text.prompts import GenerationError

    user_errors = (ConfigError, DataError, GenerationError, ModelLoadError, PipelineError, RewardError, RunDirError)
    try:
        if args.command == "plan":
            return _plan(args)
        if args.command == "run":
            result = run(load_config(args.config, overrides=args.overrides))
        else:
            result = resume(args.run_dir)
    except user_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    last = result.metrics[-1] if result.metrics else {}
    print(
        f"done: {result.run_dir} (final model in {result.final_dir}); last eval reward {last.get('eval_reward_mean')}"
    )
    return 0


def _plan(args) -> int:
    """Print the per-stage table; exit 0 when every stage fits, 3 when one does not."""
    from dataclasses import replace

    from raftlib.config import load_config
    from raftlib.plan import Hardware, plan

    hardware = Hardware.preset(args.hardware, args.gpus)
    for name, value in (
        ("gpu_memory_gib", args.gpu_memory),
        ("gpu_tflops", args.gpu_tflops),
        ("gpu_bandwidth_gbps", args.gpu_bandwidth),
    ):
        if value is not None:
            hardware = replace(hardware, **{name: value, "name": f"{hardware.name} (edited)"})
    estimate = plan(
        load_config(args.config, overrides=args.overrides),
        hardware,
        sharding=args.sharding,
        model_config=args.model_config,
        reward_config=args.reward_config,
        prompt_tokens=args.prompt_tokens,
    )
    print(estimate.table(terms=not args.brief))
    return 0 if estimate.fits else 3


if __name__ == "__main__":
    sys.exit(main())
