"""Command line: `python -m raftlib run CONFIG.yaml [dotted.key=value ...]` and `python -m raftlib resume RUN_DIR`.

Exit codes: 0 done; 2 bad config, data or run directory (a one-line message, no traceback); 1 other errors.
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
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    from raftlib.config import ConfigError, load_config
    from raftlib.data import DataError
    from raftlib.generate import GenerationError
    from raftlib.loop import resume, run
    from raftlib.models import ModelLoadError
    from raftlib.rewards import RewardError
    from raftlib.store import RunDirError

    user_errors = (ConfigError, DataError, GenerationError, ModelLoadError, RewardError, RunDirError)
    try:
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


if __name__ == "__main__":
    sys.exit(main())
