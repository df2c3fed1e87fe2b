"""raftsuite.hh_setup.prepare: the HH notebooks' one setup call reads the existing builders' caches unchanged.

A setup built by the builder itself (as the notebooks built it before `prepare` existed) must be reused, not
rebuilt, when `prepare` gets the notebook's parameters as a `SetupRequest`: so results and caches stay as they were.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from raftlib import testing
from raftlib.config import DataSection
from raftlib.data import load_prompts
from raftsuite import hh, hh_methods, hh_paper, hh_setup
from raftsuite.hh_setup import SetupRequest

OPENINGS = Path(__file__).resolve().parent.parent / "notebooks" / "data" / "openings.jsonl"


def _parameters(**overrides) -> dict:
    """The notebooks' parameters (tiny profile's names), shrunk to build in seconds; with some the setup does not
    read (a notebook's `globals()` holds them all)."""
    return {
        "dataset": "",
        "eval_prompts": 6,
        "base_model": "",
        "openings": "",
        "setup_samples_per_prompt": 2,
        "setup_max_new_tokens": 6,
        "rm_epochs": 1,
        "policy_model": "",
        "sft_model": "",
        "reward_model": "",
        "reward_formatter": "open_llama_hh",
        "subset": "helpful",
        "max_prompt_tokens": 256,
        "train_limit": 0,
        "sft_examples": 0,
        "policy_dtype": "float32",
        "mixed_precision": "no",
        "gradient_checkpointing": False,
        "show_progress": False,
        "seeds": [0, 1, 2],
        "learning_rates": [1e-4, 2e-4],
    } | overrides


def _request(**overrides) -> SetupRequest:
    return SetupRequest.from_parameters(_parameters(**overrides))


def test_a_request_takes_the_setups_parameters_and_nothing_else():
    import dataclasses

    import torch

    request = _request(base_model="assets/tiny-lm", policy_dtype="auto", eval_prompts=9)
    assert (request.base_model, request.eval_prompts, request.setup_max_new_tokens, request.rm_epochs) == (
        "assets/tiny-lm",
        9,
        6,
        1,
    )
    assert request.policy_dtype == ("bfloat16" if torch.cuda.is_available() else "float32")  # "auto" resolved
    assert {f.name for f in dataclasses.fields(SetupRequest)} >= set(_parameters()) - {"seeds", "learning_rates"}
    assert _request(seeds=[7]) == _request(learning_rates=[1.0])  # the runs' parameters: one cached setup for all
    assert SetupRequest.from_parameters({"eval_prompts": 8}) == SetupRequest(eval_prompts=8)  # defaults otherwise
    with pytest.raises(ValueError, match="policy_dtype = 'fp8'"):
        _request(policy_dtype="fp8")


def test_the_tiny_setup_reuses_the_builders_cache_and_holds_out_its_openings(tmp_path):
    openings = tmp_path / "openings.jsonl"
    openings.write_text("".join(OPENINGS.read_text(encoding="utf-8").splitlines(keepends=True)[:24]))
    base = testing.build_gpt2(tmp_path / "base", pad_token=True)  # the RM trainer pads, as assets/tiny-lm does
    runs = tmp_path / "runs"
    # what hh_rlhf.ipynb called before: its max_new_tokens is the setup's, split seed 0
    built = hh.prepare_setup(
        runs / "hh_setup",
        hh.SetupSettings(str(base), str(openings), 6, samples_per_pair_prompt=2, max_new_tokens=6, rm_epochs=1, seed=0),
    )
    record = (runs / "hh_setup" / "setup.json").read_bytes()

    setup = hh_setup.prepare(runs, _request(base_model=str(base), openings=str(openings)))

    assert (runs / "hh_setup" / "setup.json").read_bytes() == record, "the cached setup was rebuilt"
    assert (setup.sft_model, setup.reward_model, setup.prompts) == (
        str(built.sft_model),
        str(built.reward_model),
        built.prompts,
    )
    assert setup.rm_accuracy == built.rm_accuracy_heldout and not setup.hh_data
    assert (setup.formatter, setup.max_prompt_tokens, setup.test_prompts_file) == ("raw", None, None)
    assert setup.summary["preference pairs (train / held-out)"] == f"{built.pairs_train} / {built.pairs_heldout}"

    held_out = setup.held_out()
    # the openings the setup held out of its pairs, SFT and RM: its own split of the openings file with seed 0
    setup_split = load_prompts(DataSection(prompts=str(openings), eval_prompts=6), 0)
    assert [p.text for p in held_out] == [p.text for p in setup_split.eval]
    assert all(p.columns.keys() == {"reference"} for p in held_out)
    # hh_rlhf.ipynb's held-out prompts were the plan's curve rows: the same records, in the same order
    plan = setup.plan(4)
    assert setup.curve_prompts == 6 and held_out == hh.plan_prompts(plan, "curve")
    assert not {p.text for p in hh.plan_prompts(plan, "validation")} & {p.text for p in held_out}

    train_only = setup.train_only_prompts(tmp_path / "work" / "train_prompts.jsonl")
    rows = [json.loads(line)["prompt"] for line in train_only.read_text().splitlines()]
    assert len(rows) == 24 - 6 and not set(rows) & {p.text for p in held_out}

    # the method runs start from what this setup built, and score the tiny setting's gold beside the proxy
    settings = hh_methods.MethodSettings.from_parameters(_parameters(iterations=2), setup)
    assert (settings.sft_model, settings.reward_model) == (str(built.sft_model), str(built.reward_model))
    assert (settings.reward_formatter, settings.max_prompt_tokens, settings.gold) == ("raw", None, True)

    # a runs/ folder copied elsewhere (another checkout, a test's tmp dir) serves its setup from the copy
    shutil.copytree(runs, tmp_path / "moved")
    shutil.rmtree(runs)
    moved = hh_setup.prepare(tmp_path / "moved", _request(base_model=str(base), openings=str(openings)))
    assert moved.sft_model == str(tmp_path / "moved" / "hh_setup" / "sft") and Path(moved.reward_model).is_dir()
    assert (tmp_path / "moved" / "hh_setup" / "setup.json").read_bytes() == record  # reused, not rebuilt
    assert len(moved.held_out()) == 6


def test_the_hh_rlhf_setup_reuses_the_paper_builders_cache(tmp_path):
    from raftsuite.standins import build_all

    standins = build_all(tmp_path / "standins")
    runs = tmp_path / "runs"
    hub = {
        "policy_model": str(standins["policy_model"]),
        "dataset": str(standins["dataset"]),
        "reward_model": str(standins["reward_model"]),
    }
    # what the notebooks called before: train_limit and sft_examples 0 passed as None
    request = hh_paper.PaperSetupRequest(
        **hub,
        sft_model="",
        subset="helpful",
        max_prompt_tokens=128,
        eval_prompts=40,
        train_limit=None,
        sft_examples=None,
        policy_dtype="float32",
        mixed_precision="no",
        gradient_checkpointing=False,
    )
    built = hh_paper.prepare_paper_setup(runs / "hh_paper_setup", request, progress=False)
    record = (runs / "hh_paper_setup" / "setup.json").read_bytes()

    setup = hh_setup.prepare(runs, _request(**hub, eval_prompts=40, max_prompt_tokens=128))

    assert (runs / "hh_paper_setup" / "setup.json").read_bytes() == record, "the cached setup was rebuilt"
    assert setup.hh_data and (setup.sft_model, setup.prompts) == (str(built.sft_model), built.prompts)
    assert (setup.formatter, setup.max_prompt_tokens, setup.rm_accuracy) == ("open_llama_hh", 128, None)
    assert setup.held_out() == hh_paper.test_prompts(built)  # the test split, no train prompt in it
    assert setup.curve_prompts == min(40, hh_setup.CURVE_PROMPTS_HH)
    assert setup.train_only_prompts(tmp_path / "unused.jsonl") == built.prompts
    assert not (tmp_path / "unused.jsonl").exists()
    settings = hh_methods.MethodSettings.from_parameters(_parameters(), setup)
    # the stand-in ships a pytorch_model.bin only, as the authors' RM: the runs read the setup's safetensors copy
    converted = runs / "hh_paper_setup" / hh_paper.REWARD_MODEL_DIR
    assert (settings.sft_model, settings.reward_model) == (setup.sft_model, str(converted))
    assert (converted / "model.safetensors").is_file()
    assert (settings.reward_formatter, settings.max_prompt_tokens, settings.gold) == ("open_llama_hh", 128, False)


def test_bad_setup_parameters_are_named_before_anything_is_built(tmp_path):
    with pytest.raises(ValueError, match="reward_formatter = 'chatml'"):
        hh_setup.prepare(tmp_path, _request(dataset=str(tmp_path / "hh"), reward_formatter="chatml"))
    with pytest.raises(FileNotFoundError, match="policy_model = 'runs/nowhere/policy'"):
        hh_setup.prepare(tmp_path, _request(dataset="d", policy_model="runs/nowhere/policy"))
    assert list(tmp_path.iterdir()) == []
