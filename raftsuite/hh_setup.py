"""The starting point every HH notebook shares: the SFT policy, the reward model and the prompts, as one record.

`prepare` takes a notebook's parameters (as a `SetupRequest`) and dispatches on `dataset`: "" builds (or reuses) the tiny setting with
`raftsuite.hh.prepare_setup` in RUNS/hh_setup; a dataset builds (or reuses) the HH-RLHF setting with
`raftsuite.hh_paper.prepare_paper_setup` in RUNS/hh_paper_setup. Both builders and their caches are unchanged:
this module only picks one and reads its result into `HHSetup`, so the notebooks need no branch of their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from raftlib.config import DataSection
from raftlib.data import load_prompts
from raftlib.records import Prompt
from raftsuite import hh, hh_paper, standins

CURVE_PROMPTS_HH = 64
"""HH profiles: at most this many train-file prompts for the per-iteration curves (the test split is scored at the
end); the tiny setting's curve prompts are its held-out openings, all `eval_prompts` of them."""


@dataclass(frozen=True)
class HHSetup:
    """What the HH notebooks start from, whichever setting built it."""

    hh_data: bool
    """True: HH-RLHF (hub ids or local stand-ins); False: the tiny offline setting."""
    directory: Path
    sft_model: str
    """The SFT policy every method starts from (a local dir, or a hub id given as `sft_model`)."""
    reward_model: str
    formatter: str
    """How the reward model reads (prompt, completion): a key of `raftsuite.hh_paper.FORMATTERS`."""
    prompts: Path
    """RAFT's prompts file with a `reference` column: tiny, every opening; HH, the train split only."""
    eval_prompts: int
    """Held-out prompts asked for: tiny, the openings held out of the setup's pairs; HH, the test split's cap."""
    curve_prompts: int
    """How many prompts the per-iteration curves are drawn on (`hh.prompt_plan`'s `curve_prompts`)."""
    max_prompt_tokens: int | None
    """The prompt cut for the runs: None in the tiny setting (openings are short)."""
    test_prompts_file: Path | None
    """HH: the test split (no train prompt in it); tiny: None."""
    rm_accuracy: float | None
    """The tiny reward model's accuracy on held-out pairs; None for a given (HH) reward model."""
    description: str
    """One line saying what was built or reused."""
    summary: dict[str, str] = field(default_factory=dict)
    """The setup's facts as label -> text, for a one-column table."""

    def held_out(self) -> list[Prompt]:
        """The prompts the final models are reported on: HH, the test split; tiny, the setup's held-out openings
        (`load_prompts(prompts, eval_prompts, seed=0).eval`: the openings no pair, SFT or RM step trained on)."""
        if self.test_prompts_file is not None:
            return hh_paper.read_test_prompts(self.test_prompts_file)
        return load_prompts(DataSection(prompts=str(self.prompts), eval_prompts=self.eval_prompts), 0).eval

    def plan(self, validation_prompts: int) -> hh.PromptPlan:
        """Curve, validation and fit rows of `prompts`, fixed for every seed and method (`hh.prompt_plan`)."""
        return hh.prompt_plan(self.prompts, self.curve_prompts, validation_prompts)

    def train_only_prompts(self, destination: str | Path) -> Path:
        """A prompts file no seed's own split can take a held-out prompt from: HH, `prompts` itself (train split
        only); tiny, `prompts` less the held-out openings, written to `destination`."""
        if self.hh_data:
            return self.prompts
        from raftsuite import ablations

        return ablations.train_only_prompts(self.prompts, self.held_out(), destination)


@dataclass(frozen=True)
class SetupRequest:
    """What a notebook asks of the setup: its parameters that the setup reads (`from_parameters`).

    `dataset` "" is the tiny setting (base_model, openings, setup_samples_per_prompt, setup_max_new_tokens,
    rm_epochs; built with seed 0 whatever the runs' seeds); a dataset is HH-RLHF (policy_model or sft_model,
    reward_model read with reward_formatter, subset, max_prompt_tokens, train_limit and sft_examples with 0 = all,
    policy_dtype, mixed_precision, gradient_checkpointing). The other setting's fields are not read.
    """

    dataset: str = ""
    eval_prompts: int = 64
    base_model: str = "assets/tiny-lm"
    openings: str = "notebooks/data/openings.jsonl"
    setup_samples_per_prompt: int = 8
    setup_max_new_tokens: int = 32
    rm_epochs: int = 2
    policy_model: str = ""
    sft_model: str = ""
    reward_model: str = ""
    reward_formatter: str = "open_llama_hh"
    subset: str = "helpful"
    max_prompt_tokens: int = 256
    train_limit: int = 0
    sft_examples: int = 0
    policy_dtype: str = "float32"
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    num_processes: int = 1
    sft_accelerate_config: str = ""
    """The SFT's launch config (FSDP for a 7B full fine-tune: fp32 masters and AdamW are 16 bytes per parameter)."""
    show_progress: bool = False

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Any]) -> SetupRequest:
        """The fields a notebook's parameters hold (the rest keep their defaults); dtypes resolved ("auto")."""
        values = {f.name: parameters[f.name] for f in fields(cls) if f.name in parameters}
        values["policy_dtype"] = hh.resolve_dtype(values.get("policy_dtype", "float32"))
        return cls(**values)


def prepare(runs_dir: str | Path, request: SetupRequest) -> HHSetup:
    """Build or reuse the profile's setup under `runs_dir` (runs/PROFILE), shared by every HH notebook."""
    runs_dir, r = Path(runs_dir), request
    for name in ("policy_model", "sft_model", "dataset", "reward_model"):
        standins.require(getattr(r, name), name)
    return _paper(runs_dir, r) if r.dataset else _tiny(runs_dir, r)


def _paper(runs_dir: Path, r: SetupRequest) -> HHSetup:
    formatter = r.reward_formatter
    if formatter not in hh_paper.FORMATTERS:
        raise ValueError(f"reward_formatter = {formatter!r}: known formatters {', '.join(hh_paper.FORMATTERS)}")
    # one build per profile (runs/PROFILE/hh_paper_setup), under a lock: notebooks started together share it
    request = hh_paper.PaperSetupRequest(
        policy_model=r.policy_model,
        dataset=r.dataset,
        reward_model=r.reward_model,
        sft_model=r.sft_model,
        subset=r.subset,
        max_prompt_tokens=r.max_prompt_tokens,
        eval_prompts=r.eval_prompts,
        train_limit=r.train_limit or None,
        sft_examples=r.sft_examples or None,
        policy_dtype=r.policy_dtype,
        mixed_precision=r.mixed_precision,
        gradient_checkpointing=r.gradient_checkpointing,
        num_processes=r.num_processes,
        sft_accelerate_config=r.sft_accelerate_config,
    )
    paper = hh_paper.prepare_paper_setup(runs_dir / "hh_paper_setup", request, progress=r.show_progress)
    return HHSetup(
        hh_data=True,
        directory=runs_dir / "hh_paper_setup",
        sft_model=str(paper.sft_model),
        reward_model=str(paper.reward_model),
        formatter=formatter,
        prompts=paper.prompts,
        eval_prompts=r.eval_prompts,
        curve_prompts=min(r.eval_prompts, CURVE_PROMPTS_HH),
        max_prompt_tokens=r.max_prompt_tokens,
        test_prompts_file=paper.eval_prompts_file,
        rm_accuracy=None,
        description=(
            f"HH-RLHF: {paper.train_prompts} train prompts, {paper.eval_prompts} test prompts; "
            f"SFT {paper.sft_model}; reward model {paper.reward_model}"
        ),
        summary={
            "prompts (train / test split)": f"{paper.train_prompts} / {paper.eval_prompts}",
            "SFT policy": str(paper.sft_model),
            "reward model": f"{paper.reward_model} (read as {formatter})",
            "setup minutes": f"{paper.seconds / 60:.1f}",
        },
    )


def _tiny(runs_dir: Path, r: SetupRequest) -> HHSetup:
    # one build per profile (runs/PROFILE/hh_setup), with split seed 0 whatever the RAFT seeds
    settings = hh.SetupSettings(
        base_model=r.base_model,
        openings=r.openings,
        eval_prompts=r.eval_prompts,
        samples_per_pair_prompt=r.setup_samples_per_prompt,
        max_new_tokens=r.setup_max_new_tokens,
        rm_epochs=r.rm_epochs,
        seed=0,
    )
    tiny = hh.prepare_setup(runs_dir / "hh_setup", settings, progress=r.show_progress)
    return HHSetup(
        hh_data=False,
        directory=tiny.directory,
        sft_model=str(tiny.sft_model),
        reward_model=str(tiny.reward_model),
        formatter="raw",
        prompts=tiny.prompts,
        eval_prompts=r.eval_prompts,
        curve_prompts=r.eval_prompts,
        max_prompt_tokens=None,
        test_prompts_file=None,
        rm_accuracy=tiny.rm_accuracy_heldout,
        description=(
            f"tiny setting: SFT {tiny.sft_model}, reward model {tiny.reward_model} "
            f"(held-out pair accuracy {tiny.rm_accuracy_heldout:.1%}); {r.eval_prompts} held-out openings"
        ),
        summary={
            "preference pairs (train / held-out)": f"{tiny.pairs_train} / {tiny.pairs_heldout}",
            "reward model accuracy, train": f"{tiny.rm_accuracy_train:.1%}",
            "reward model accuracy, held-out pairs": f"{tiny.rm_accuracy_heldout:.1%}",
            "paper (Open-LLaMA-3B RM, HH-RLHF validation)": "75.48%",
            "setup minutes": f"{tiny.seconds / 60:.1f}",
        },
    )
