"""Build the toy example's model and prompts offline (a random tiny GPT-2 and 200 short prompts).

    python examples/toy/build.py runs/toy-assets

Until the suite's pretrained tiny language model lands (the experiment-suite issue), this is the
smallest honest RAFT run: a random model learns to please a programmatic reward.
"""

import sys
from pathlib import Path

from raftlib.testing import build_gpt2, write_prompts

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/toy-assets")
    out.mkdir(parents=True, exist_ok=True)
    build_gpt2(out / "model")
    write_prompts(out / "prompts.jsonl", count=200)
    print(f"built {out / 'model'} and {out / 'prompts.jsonl'}")
