"""Prompt sources, errors that name file and line, the eval split, per-iteration prompts."""

import json

import pandas as pd
import pytest

from raftlib.config import DataSection
from raftlib.data import (
    DataError,
    load_external_samples,
    load_prompts,
    prompts_for_iteration,
    read_rows,
    rows_to_prompts,
)


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"prompt": f"prompt {i}", "answer": str(i)} for i in range(20)]


@pytest.mark.parametrize("suffix", ["jsonl", "parquet", "csv"])
def test_each_file_format_gives_the_same_prompts(tmp_path, suffix):
    path = tmp_path / f"p.{suffix}"
    if suffix == "jsonl":
        jsonl(path, ROWS)
    elif suffix == "parquet":
        pd.DataFrame(ROWS).to_parquet(path)
    else:
        pd.DataFrame(ROWS).to_csv(path, index=False)
    splits = load_prompts(DataSection(prompts=str(path), eval_prompts=5), seed=0)
    assert len(splits.train) == 15 and len(splits.eval) == 5
    assert {p.prompt_id for p in splits.train}.isdisjoint({p.prompt_id for p in splits.eval})
    every = sorted(splits.train + splits.eval, key=lambda p: p.prompt_id)
    assert [p.text for p in every] == [r["prompt"] for r in ROWS]
    assert every[3].columns == {"answer": "3"}


def test_local_hf_dataset_dir(tmp_path):
    directory = tmp_path / "dataset"
    directory.mkdir()
    jsonl(directory / "train.jsonl", [{"question": f"q{i}"} for i in range(6)])
    splits = load_prompts(DataSection(prompts=str(directory), prompt_column="question", eval_prompts=2))
    assert sorted(p.text for p in splits.train + splits.eval) == [f"q{i}" for i in range(6)]


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n\n{"prompt": "broken"\n')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        read_rows(str(path))


def test_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8"):
        read_rows(str(path))


def test_missing_column_and_empty_prompt(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"text": "wrong column"}])
    with pytest.raises(DataError, match=rf"{path}:2: no column 'prompt'.*columns are: text"):
        load_prompts(DataSection(prompts=str(path), eval_prompts=0))
    empty = jsonl(tmp_path / "e.jsonl", [{"prompt": "fine"}, {"prompt": "   "}])
    with pytest.raises(DataError, match=rf"{empty}:2: empty prompt"):
        load_prompts(DataSection(prompts=str(empty), eval_prompts=0))
    rows = [{"prompt": 3}]
    with pytest.raises(DataError, match="must be a string, got int"):
        rows_to_prompts(rows, "prompt", "x.parquet", "row")


def test_missing_file_and_too_many_eval_prompts(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_prompts(DataSection(prompts=str(tmp_path / "nope.jsonl")))
    path = jsonl(tmp_path / "p.jsonl", ROWS[:3])
    with pytest.raises(DataError, match="leaves no training prompt"):
        load_prompts(DataSection(prompts=str(path), eval_prompts=3))


def test_prompts_for_iteration_covers_every_prompt_before_repeating(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", ROWS)
    train = load_prompts(DataSection(prompts=str(path), eval_prompts=0)).train
    first_pass = [p.prompt_id for t in (1, 2, 3, 4) for p in prompts_for_iteration(train, t, 5, seed=0)]
    assert sorted(first_pass) == list(range(20))
    assert prompts_for_iteration(train, 2, 5, seed=0) == prompts_for_iteration(train, 2, 5, seed=0)
    assert prompts_for_iteration(train, 1, 5, seed=0) != prompts_for_iteration(train, 1, 5, seed=1)
    wrapped = prompts_for_iteration(train, 3, 8, seed=0)  # positions 16..23 cross into pass two
    assert len(wrapped) == 8


def test_external_samples(tmp_path):
    path = jsonl(tmp_path / "teacher.jsonl", [{"prompt_id": 1, "completion": "a"}, {"prompt_id": 1, "completion": "b"}])
    assert load_external_samples(str(path)) == {1: ["a", "b"]}
    bad = jsonl(tmp_path / "bad.jsonl", [{"prompt_id": "1", "completion": "a"}])
    with pytest.raises(DataError, match=rf"{bad}:1: .*integer prompt_id"):
        load_external_samples(str(bad))


def test_an_eval_file_holds_the_held_out_prompts_and_every_prompt_trains(tmp_path):
    train = jsonl(tmp_path / "train.jsonl", ROWS[:5])
    test = jsonl(tmp_path / "test.jsonl", [{"prompt": "held out", "answer": "7"}, {"prompt": "bad line"}, {}])
    with pytest.raises(DataError, match=r"test.jsonl:3: no column 'prompt'"):
        load_prompts(DataSection(prompts=str(train), eval_prompts=0, eval_file=str(test)))
    test.write_text(test.read_text().splitlines(keepends=True)[0])
    splits = load_prompts(DataSection(prompts=str(train), eval_prompts=0, eval_file=str(test)))
    assert [p.text for p in splits.train] == [r["prompt"] for r in ROWS[:5]]
    assert [(p.text, p.columns["answer"]) for p in splits.eval] == [("held out", "7")]


def test_an_eval_file_with_eval_prompts_is_refused():
    from raftlib.sections import ConfigError

    with pytest.raises(ConfigError, match=r"data\.eval_prompts"):
        DataSection(prompts="p.jsonl", eval_prompts=4, eval_file="t.jsonl").validate("data")
