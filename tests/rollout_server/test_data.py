"""Task rows: dataset files (JSONL, Parquet, datasets directories), each server's walk, eval splits."""

from __future__ import annotations

import importlib.util
import json
import string
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protocol.config import TaskConfig
from rollout_server.tasks.data import RowSource, TaskError, alphabet_of, generated_row, load_rows


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def numbered_rows(n: int) -> list[dict[str, Any]]:
    return [{"prompt": f"q{i}", "answer": str(i)} for i in range(n)]


def dataset_cfg(path: Path, **kw: Any) -> TaskConfig:
    return TaskConfig(dataset=str(path), reward="exact_match", **kw)


# ---------------------------------------------------------------- loading


def test_jsonl_rows_load_in_order_and_blank_lines_are_skipped(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "answer": 1}\n\n   \n{"prompt": "b", "x": [1, 2]}\n\n', encoding="utf-8")
    assert load_rows(str(p), "prompt") == [{"prompt": "a", "answer": 1}, {"prompt": "b", "x": [1, 2]}]


def test_json_suffix_is_read_as_jsonl(tmp_path):
    p = write_jsonl(tmp_path / "d.json", numbered_rows(2))
    assert load_rows(str(p), "prompt") == numbered_rows(2)


def test_jsonl_line_that_is_not_json_names_its_line_number(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a"}\n\n{"prompt": "b"\n', encoding="utf-8")
    with pytest.raises(TaskError, match=r"line 3 is not JSON") as e:
        load_rows(str(p), "prompt")
    assert "task.dataset" in str(e.value) and str(p) in str(e.value)


@pytest.mark.parametrize("line", ["[1, 2]", '"text"', "3", "null"])
def test_jsonl_line_that_is_not_an_object_names_its_line_number(tmp_path, line):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(TaskError, match=r"line 2 is not a JSON object"):
        load_rows(str(p), "prompt")


def test_missing_file_unknown_extension_and_empty_file(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"), "prompt")
    csv = tmp_path / "d.csv"
    csv.write_text("prompt\na\n")
    with pytest.raises(TaskError, match=r"unknown format '\.csv'"):
        load_rows(str(csv), "prompt")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(TaskError, match="has no rows"):
        load_rows(str(empty), "prompt")


def test_unreadable_files_give_task_errors(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(TaskError, match="is not UTF-8 text"):
        load_rows(str(latin), "prompt")
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not a parquet file")
    with pytest.raises(TaskError, match="is not a readable Parquet file"):
        load_rows(str(corrupt), "prompt")


def test_the_key_named_in_errors_is_the_one_given(tmp_path):
    with pytest.raises(TaskError, match=r"^task\.eval_dataset="):
        load_rows(str(tmp_path / "nope.jsonl"), "prompt", "task.eval_dataset")


def test_row_without_the_prompt_column_names_its_line_and_the_key(tmp_path):
    p = tmp_path / "d.jsonl"  # the blank line counts: line numbers are the editor's, 1-based
    p.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"question": "c", "answer": "1"}\n', encoding="utf-8")
    with pytest.raises(TaskError, match=r"line 4 has no 'prompt' column") as e:
        load_rows(str(p), "prompt")
    assert "task.prompt_field" in str(e.value) and "question" in str(e.value)
    assert load_rows(str(p), "question") if False else True  # noqa: SIM210 (the field is configurable, below)
    q = write_jsonl(tmp_path / "q.jsonl", [{"question": "c"}])
    assert load_rows(str(q), "question") == [{"question": "c"}]


def test_prompt_as_chat_messages_is_accepted(tmp_path):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": messages, "answer": "4"}])
    assert load_rows(str(p), "prompt")[0]["prompt"] == messages


@pytest.mark.parametrize(
    "prompt",
    [
        [],  # no messages
        [{"role": "user"}],  # no content
        [{"content": "hi"}],  # no role
        [{"role": "user", "content": 3}],  # content not a string
        ["hi"],  # not a message
        [{"role": "user", "content": "hi"}, "there"],  # one good, one bad
        {"role": "user", "content": "hi"},  # a single message, not a list
        None,
        True,  # a bool is not a number a template could use
    ],
)
def test_malformed_prompts_are_rejected(tmp_path, prompt):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "fine"}, {"prompt": prompt}])
    with pytest.raises(TaskError, match=r"line 2: 'prompt' must be a string .* or a list of chat messages"):
        load_rows(str(p), "prompt")


def test_a_number_prompt_is_accepted_for_a_template(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": 42, "answer": "43"}])
    assert load_rows(str(p), "prompt")[0]["prompt"] == 42


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [
        {"prompt": "a", "answer": "1", "n": 3},
        {"prompt": [{"role": "user", "content": "hi"}], "answer": "2", "n": 4},
    ]
    # a column is one type in Parquet: keep the chat rows in a file of their own
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "s.parquet")
    pq.write_table(pa.Table.from_pylist(rows[1:]), tmp_path / "c.parquet")
    assert load_rows(str(tmp_path / "s.parquet"), "prompt") == rows[:1]
    assert load_rows(str(tmp_path / "c.parquet"), "prompt") == rows[1:]
    pq.write_table(pa.Table.from_pylist([{"question": "a"}]), tmp_path / "bad.parquet")
    with pytest.raises(TaskError, match=r"row 1 has no 'prompt' column"):  # Parquet rows count from 1 too
        load_rows(str(tmp_path / "bad.parquet"), "prompt")


def test_datasets_directory_without_datasets_installed_says_how_to_install(tmp_path, monkeypatch):
    if importlib.util.find_spec("datasets") is not None:
        monkeypatch.setitem(sys.modules, "datasets", None)  # `from datasets import ...` now raises ImportError
    d = tmp_path / "saved"
    d.mkdir()
    with pytest.raises(TaskError, match="pip install datasets") as e:
        load_rows(str(d), "prompt")
    assert "is a directory" in str(e.value)


def test_datasets_directory_loads_its_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = numbered_rows(3)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    assert load_rows(str(tmp_path / "one"), "prompt") == rows
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert load_rows(str(tmp_path / "dict"), "prompt") == rows
    dd.pop("train")
    dd["validation"] = datasets.Dataset.from_list(rows[:2])
    dd.save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(TaskError, match="no 'train'"):
        load_rows(str(tmp_path / "no_train"), "prompt")


# ---------------------------------------------------------------- each server's walk


def walk(source: RowSource, n: int) -> list[str]:
    return [source.next_row()["prompt"] for _ in range(n)]


def test_rows_are_walked_as_a_seeded_permutation_each_row_once_per_epoch(tmp_path):
    n = 20
    cfg = dataset_cfg(write_jsonl(tmp_path / "d.jsonl", numbered_rows(n)))
    a, a2, b = (RowSource(cfg, seed, run_seed=0, eval_rows=8) for seed in (1, 1, 2))
    first_a = walk(a, n)
    assert sorted(first_a) == sorted(r["prompt"] for r in numbered_rows(n))  # every row exactly once
    assert first_a == walk(a2, n)  # same seed, same order
    first_b = walk(b, n)
    assert first_b != first_a and sorted(first_b) == sorted(first_a)  # another server, another order
    assert first_a != [r["prompt"] for r in numbered_rows(n)]  # shuffled, not file order
    assert a.epoch == 0 and a.position() == {"data/epoch": 0, "data/index": n, "data/progress": 1.0}
    second_a = walk(a, n)
    assert sorted(second_a) == sorted(first_a) and second_a != first_a  # reshuffled each epoch
    assert a.epoch == 1
    third = walk(a, 5)
    assert len(set(third)) == 5
    assert a.position() == {"data/epoch": 2, "data/index": 5, "data/progress": pytest.approx(2.25)}
    assert RowSource(cfg, 1, 0, 8).position() == {"data/epoch": 0, "data/index": 0, "data/progress": 0.0}


def test_many_epochs_visit_every_row_equally(tmp_path):
    cfg = dataset_cfg(write_jsonl(tmp_path / "d.jsonl", numbered_rows(7)))
    source = RowSource(cfg, seed=5, run_seed=0, eval_rows=8)
    counts = Counter(walk(source, 7 * 6))
    assert set(counts.values()) == {6} and len(counts) == 7
    assert source.position()["data/progress"] == pytest.approx(6.0)


def test_eval_fraction_split_is_the_same_on_every_server_and_disjoint_from_training(tmp_path):
    n = 30
    cfg = dataset_cfg(write_jsonl(tmp_path / "d.jsonl", numbered_rows(n)), eval_fraction=0.2)
    sources = [RowSource(cfg, seed, run_seed=7, eval_rows=64) for seed in (0, 1, 2)]
    evals = [[r["prompt"] for r in s.eval_rows] for s in sources]
    assert evals[0] == evals[1] == evals[2] and len(evals[0]) == 6
    for s in sources:
        train = {r["prompt"] for r in s.rows}
        assert len(s.rows) == 24 and not train & set(evals[0])
        assert train | set(evals[0]) == {r["prompt"] for r in numbered_rows(n)}
        assert set(walk(s, 24)) == train  # the walk never reaches an eval row
    other_run = RowSource(cfg, 0, run_seed=8, eval_rows=64)
    assert [r["prompt"] for r in other_run.eval_rows] != evals[0]  # the split is the run seed's


def test_eval_fraction_sizes_round_up_and_keep_a_training_row(tmp_path):
    cfg = dataset_cfg(write_jsonl(tmp_path / "d.jsonl", numbered_rows(10)), eval_fraction=0.01)
    s = RowSource(cfg, 0, 0, 8)
    assert len(s.eval_rows) == 1 and len(s.rows) == 9  # at least one eval row
    cfg = dataset_cfg(write_jsonl(tmp_path / "d.jsonl", numbered_rows(10)), eval_fraction=0.25)
    s = RowSource(cfg, 0, 0, 8)
    assert len(s.eval_rows) == 3 and len(s.rows) == 7  # ceil(2.5)
    cfg = dataset_cfg(write_jsonl(tmp_path / "d.jsonl", numbered_rows(100)), eval_fraction=0.07)
    s = RowSource(cfg, 0, 0, 8)
    assert len(s.eval_rows) == 7 and len(s.rows) == 93  # 0.07 * 100 is 7.000000000000001 in floating point
    cfg = dataset_cfg(write_jsonl(tmp_path / "one.jsonl", numbered_rows(1)), eval_fraction=0.5)
    with pytest.raises(TaskError, match="leaves no training rows"):
        RowSource(cfg, 0, 0, 8)


def test_no_eval_rows_without_an_eval_setting(tmp_path):
    s = RowSource(dataset_cfg(write_jsonl(tmp_path / "d.jsonl", numbered_rows(4))), 0, 0, 8)
    assert s.eval_rows == [] and len(s.rows) == 4


def test_eval_dataset_is_loaded_from_its_own_file(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", numbered_rows(5))
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": "e0", "answer": "x"}, {"prompt": "e1", "answer": "y"}])
    s = RowSource(dataset_cfg(train, eval_dataset=str(held)), 3, 0, 8)
    assert [r["prompt"] for r in s.eval_rows] == ["e0", "e1"]
    assert len(s.rows) == 5
    with pytest.raises(TaskError, match=r"task\.eval_dataset="):
        RowSource(dataset_cfg(train, eval_dataset=str(tmp_path / "nope.jsonl")), 3, 0, 8)


@pytest.mark.parametrize("kind", ["copy", "reverse"])
def test_builtin_rows(kind):
    cfg = TaskConfig(type=kind, length=4, symbols=5)
    source = RowSource(cfg, seed=0, run_seed=0, eval_rows=10)
    assert source.rows == [] and source.position() == {}
    rows = [source.next_row() for _ in range(200)]
    for row in rows:
        assert set(row) == {"prompt", "answer"}
        body = row["prompt"][:-1]
        assert row["prompt"].endswith("=") and len(body) == 4
        assert set(body) <= set("abcde")
        assert row["answer"] == (body if kind == "copy" else body[::-1])
    assert set("".join(r["prompt"][:-1] for r in rows)) == set("abcde")  # every symbol used, none beyond
    assert len({r["prompt"] for r in rows}) > 100  # random, not a fixed handful
    assert [r["prompt"] for r in rows[:20]] != walk(RowSource(cfg, 1, 0, 10), 20)  # per-server seed


def test_builtin_eval_rows_are_fixed_by_the_run_seed():
    cfg = TaskConfig(type="reverse", length=3, symbols=12)
    a, b, c = (RowSource(cfg, seed, run_seed, eval_rows=16) for seed, run_seed in ((0, 3), (9, 3), (0, 4)))
    assert len(a.eval_rows) == 16 and a.eval_rows == b.eval_rows
    assert a.eval_rows != c.eval_rows
    assert all(r["answer"] == r["prompt"][:-1][::-1] for r in a.eval_rows)


# Rows of RowSource(TaskConfig(type=..., length=4, symbols=5), seed=7, run_seed=3, eval_rows=3), recorded
# with the generator as it was before task.min_length existed: min_length=0 must keep drawing exactly these.
FIXED_TRAIN = ["edde=", "cdeb=", "abbe=", "eace=", "adac=", "ebbb="]
FIXED_EVAL = ["cead=", "dbdd=", "cbad="]


@pytest.mark.parametrize("kind", ["copy", "reverse"])
@pytest.mark.parametrize("min_length", [0, 4])  # min_length == length is a fixed length too: no extra draw
def test_fixed_length_rows_are_the_rows_drawn_before_min_length_existed(kind, min_length):
    source = RowSource(
        TaskConfig(type=kind, length=4, symbols=5, min_length=min_length), seed=7, run_seed=3, eval_rows=3
    )
    train = [source.next_row() for _ in range(6)]
    assert [r["prompt"] for r in train] == FIXED_TRAIN
    assert [r["prompt"] for r in source.eval_rows] == FIXED_EVAL
    for r in train + source.eval_rows:
        assert r["answer"] == (r["prompt"][:-1] if kind == "copy" else r["prompt"][:-1][::-1])
    # and the generator called without min_length (its signature before) draws the same rows
    rng = np.random.default_rng(7)
    assert [generated_row(kind, 4, 5, rng)["prompt"] for _ in range(6)] == FIXED_TRAIN


@pytest.mark.parametrize("kind", ["copy", "reverse"])
def test_min_length_draws_every_length_from_min_to_length_uniformly(kind):
    cfg = TaskConfig(type=kind, min_length=1, length=16, symbols=5)
    source = RowSource(cfg, seed=0, run_seed=0, eval_rows=400)
    rows = [source.next_row() for _ in range(3200)]
    for row in rows + source.eval_rows:
        body = row["prompt"][:-1]
        assert row["prompt"].endswith("=") and 1 <= len(body) <= 16 and set(body) <= set("abcde")
        assert row["answer"] == (body if kind == "copy" else body[::-1])
    counts = Counter(len(r["answer"]) for r in rows)
    assert sorted(counts) == list(range(1, 17))  # every length from min_length to length, both ends included
    assert all(150 <= c <= 250 for c in counts.values()), counts  # uniform: 200 each expected
    # eval prompts follow the same distribution, fixed by the run seed
    assert set(len(r["answer"]) for r in source.eval_rows) == set(range(1, 17))
    assert source.eval_rows == RowSource(cfg, seed=5, run_seed=0, eval_rows=400).eval_rows
    narrow = RowSource(TaskConfig(type=kind, min_length=3, length=5, symbols=5), seed=1, run_seed=0, eval_rows=1)
    assert {len(narrow.next_row()["answer"]) for _ in range(300)} == {3, 4, 5}


def test_min_length_above_length_is_rejected_with_the_fix():
    with pytest.raises(ValueError, match=r"task\.min_length=5 is above task\.length=4") as info:
        TaskConfig(type="copy", min_length=5, length=4)
    assert "set task.min_length <= task.length" in str(info.value)
    assert TaskConfig(type="copy", min_length=4, length=4).min_length == 4
    with pytest.raises(ValueError, match="min_length"):
        TaskConfig(type="copy", min_length=-1)
    with pytest.raises(ValueError, match="min_length"):
        TaskConfig(type="copy", min_length=33, length=32)


# ---------------------------------------------------------------- alphabet of the tiny tokenizer


def test_builtin_alphabet_is_its_letters_and_equals():
    assert alphabet_of(TaskConfig(type="copy", symbols=4)) == "abcd="
    assert alphabet_of(TaskConfig(type="reverse", symbols=26)) == string.ascii_lowercase + "="


def test_dataset_alphabet_covers_rows_and_the_template_literal(tmp_path):
    rows = [{"prompt": "ab", "answer": 12, "tags": ["xy", {"k": "Z"}], "f": 0.5, "none": None}]
    cfg = dataset_cfg(write_jsonl(tmp_path / "d.jsonl", rows), template="Q: {prompt}!")
    alphabet = alphabet_of(cfg)
    assert alphabet == "".join(sorted(alphabet)) and len(set(alphabet)) == len(alphabet)
    expected = set("ab") | set("12") | set("xyZ") | set("0.5") | set("None") | set("Q: !")
    assert set(alphabet) == expected
    # the placeholder's name is not literal text: 'p', 'r', 'o', 'm', 't' are absent unless a row has them
    assert not set("prmt") & set(alphabet)


def test_dataset_alphabet_includes_eval_rows_system_prompt_and_chat_markup(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "answer": "b"}])
    held = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "c", "answer": "Q"}])
    assert set(alphabet_of(dataset_cfg(train, eval_dataset=str(held)))) == set("abcQ")
    chat = set(alphabet_of(dataset_cfg(train, chat_template=True, system_prompt="Hi.")))
    assert set("systemuserassistant: \n") | set("Hi.") | set("ab") == chat


def test_dataset_alphabet_of_chat_message_prompts_covers_the_chat_markup(tmp_path):
    # list-valued prompts are always rendered by the chat template, whatever task.chat_template says
    rows = [{"prompt": [{"role": "user", "content": "ab"}], "answer": "b"}]
    alphabet = alphabet_of(dataset_cfg(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert set("systemuserassistant: \n") <= set(alphabet)


def test_alphabet_of_a_broken_dataset_raises_task_error_naming_the_key(tmp_path):
    with pytest.raises(TaskError, match=r"^task\.dataset=.*does not exist"):
        alphabet_of(dataset_cfg(tmp_path / "nope.jsonl"))
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "answer": "b"}])
    with pytest.raises(TaskError, match=r"^task\.eval_dataset=.*does not exist"):
        alphabet_of(dataset_cfg(train, eval_dataset=str(tmp_path / "nope.jsonl")))
