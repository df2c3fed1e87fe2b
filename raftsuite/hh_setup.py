"""The starting point every HH notebook shares: the SFT policy, the reward model and the prompts, as one record.

`prepare` takes a notebook's parameters and dispatches on `dataset`: "" builds (or reuses) the tiny setting with
`raftsuite.hh.prepare_setup` in RUNS/hh_setup; a dataset builds (or reuses) the HH-RLHF setting with
`raftsuite.hh_paper.prepare_paper_setup` in RUNS/hh_paper_setup. Both builders and their caches are unchanged:
this module only picks one and reads its result into `HHSetup`, so the notebooks need no branch of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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


def prepare(
    runs_dir: str | Path,
    *,
    dataset: str,
    eval_prompts: int,
    base_model: str,
    openings: str,
    setup_samples_per_prompt: int,
    setup_max_new_tokens: int,
    rm_epochs: int,
    policy_model: str,
    sft_model: str,
    reward_model: str,
    reward_formatter: str,
    subset: str,
    max_prompt_tokens: int,
    train_limit: int,
    sft_examples: int,
    policy_dtype: str,
    mixed_precision: str,
    gradient_checkpointing: bool,
    progress: bool,
) -> HHSetup:
    """Build or reuse the profile's setup under `runs_dir` (runs/PROFILE), shared by every HH notebook.

    `dataset` "" is the tiny setting (base_model, openings, setup_samples_per_prompt, setup_max_new_tokens,
    rm_epochs; built with seed 0 whatever the runs' seeds); a dataset is HH-RLHF (policy_model or sft_model,
    reward_model read with reward_formatter, subset, max_prompt_tokens, train_limit and sft_examples with 0 = all,
    policy_dtype, mixed_precision, gradient_checkpointing). The other setting's parameters are not read.
    """
    runs_dir = Path(runs_dir)
    for name, value in (
        ("policy_model", policy_model),
        ("sft_model", sft_model),
        ("dataset", dataset),
        ("reward_model", reward_model),
    ):
        standins.require(value, name)
    hh_data = bool(dataset)
    formatter = reward_formatter if hh_data else "raw"
    if formatter not in hh_paper.FORMATTERS:
        raise ValueError(f"reward_formatter = {formatter!r}: known formatters {', '.join(hh_paper.FORMATTERS)}")
    if hh_data:
        # one build per profile (runs/PROFILE/hh_paper_setup), under a lock: notebooks started together share it
        paper = hh_paper.prepare_paper_setup(
            runs_dir / "hh_paper_setup",
            policy_model=policy_model,
            sft_model=sft_model,
            dataset=dataset,
            reward_model=reward_model,
            subset=subset,
            max_prompt_tokens=max_prompt_tokens,
            eval_prompts=eval_prompts,
            train_limit=train_limit or None,
            sft_examples=sft_examples or None,
            policy_dtype=policy_dtype,
            mixed_precision=mixed_precision,
            gradient_checkpointing=gradient_checkpointing,
            progress=progress,
        )
        return HHSetup(
            hh_data=True,
            directory=runs_dir / "hh_paper_setup",
            sft_model=str(paper.sft_model),
            reward_model=str(paper.reward_model),
            formatter=formatter,
            prompts=paper.prompts,
            eval_prompts=eval_prompts,
            curve_prompts=min(eval_prompts, CURVE_PROMPTS_HH),
            max_prompt_tokens=max_prompt_tokens,
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
    # one build per profile (runs/PROFILE/hh_setup), with split seed 0 whatever the RAFT seeds
    tiny = hh.prepare_setup(
        runs_dir / "hh_setup",
        hh.SetupSettings(
            base_model=base_model,
            openings=openings,
            eval_prompts=eval_prompts,
            samples_per_pair_prompt=setup_samples_per_prompt,
            max_new_tokens=setup_max_new_tokens,
            rm_epochs=rm_epochs,
            seed=0,
        ),
        progress=progress,
    )
    return HHSetup(
        hh_data=False,
        directory=tiny.directory,
        sft_model=str(tiny.sft_model),
        reward_model=str(tiny.reward_model),
        formatter=formatter,
        prompts=tiny.prompts,
        eval_prompts=eval_prompts,
        curve_prompts=eval_prompts,
        max_prompt_tokens=None,
        test_prompts_file=None,
        rm_accuracy=tiny.rm_accuracy_heldout,
        description=(
            f"tiny setting: SFT {tiny.sft_model}, reward model {tiny.reward_model} "
            f"(held-out pair accuracy {tiny.rm_accuracy_heldout:.1%}); {eval_prompts} held-out openings"
        ),
        summary={
            "preference pairs (train / held-out)": f"{tiny.pairs_train} / {tiny.pairs_heldout}",
            "reward model accuracy, train": f"{tiny.rm_accuracy_train:.1%}",
            "reward model accuracy, held-out pairs": f"{tiny.rm_accuracy_heldout:.1%}",
            "paper (Open-LLaMA-3B RM, HH-RLHF validation)": "75.48%",
            "setup minutes": f"{tiny.seconds / 60:.1f}",
        },
    )
