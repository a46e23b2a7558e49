"""Training data: schema checks naming file and line, seeded group sampling, collation."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bge_core.data import (
    Group,
    TrainingDataError,
    list_data_files,
    listed_keys,
    load_examples,
    sample_group,
    text_key,
)

GOOD = {"query": "what is a cat", "pos": ["a cat is an animal"], "neg": ["n1", "n2", "n3"]}


def _jsonl(path, objs, extra_lines=()):
    lines = [json.dumps(o) for o in objs] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_jsonl_and_parquet_folder(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [GOOD, {**GOOD, "query": "q2"}])
    pq.write_table(pa.Table.from_pylist([{**GOOD, "query": "q3"}]), tmp_path / "b.parquet")
    (tmp_path / "notes.txt").write_text("ignored")
    assert [f.rsplit("/", 1)[-1] for f in list_data_files(str(tmp_path))] == [
        "a.jsonl", "b.parquet"]
    rows, bad = load_examples(str(tmp_path), group_size=2)
    assert bad == 0 and [r["query"] for r in rows] == ["what is a cat", "q2", "q3"]
    assert len({r["key"] for r in rows}) == 3  # keys unique across files


def test_reads_fsspec_uri(tmp_path):
    import fsspec

    with fsspec.open("memory://bge-data/train.jsonl", "w") as handle:
        handle.write(json.dumps(GOOD) + "\n")
    rows, _ = load_examples("memory://bge-data/train.jsonl")
    assert rows[0]["pos"] == GOOD["pos"]


BAD_CASES = [
    ('{"query": "q", "pos": ["p"], "neg": ["n"]', "not valid JSON"),
    (json.dumps({"pos": ["p"], "neg": ["n"]}), "'query'"),
    (json.dumps({"query": 3, "pos": ["p"], "neg": ["n"]}), "'query'"),
    (json.dumps({"query": "q", "pos": [], "neg": ["n"]}), "'pos' is empty"),
    (json.dumps({"query": "q", "neg": ["n"]}), "'pos' must be a list"),
    (json.dumps({"query": "q", "pos": "p", "neg": ["n"]}), "'pos' must be a list"),
    (json.dumps({"query": "q", "pos": ["p", 5], "neg": ["n"]}), "only strings"),
    (json.dumps({"query": "q", "pos": ["p"], "neg": "n"}), "'neg' must be a list"),
    (json.dumps({"query": "q", "pos": ["p"], "neg": ["p"]}), "needs negatives"),
    (json.dumps(["q", ["p"]]), "JSON object"),
]


@pytest.mark.parametrize("line, reason", BAD_CASES)
def test_bad_line_names_file_and_line(tmp_path, line, reason):
    path = _jsonl(tmp_path / "train.jsonl", [GOOD, GOOD], extra_lines=[line])
    with pytest.raises(TrainingDataError, match="train.jsonl line 3") as err:
        load_examples(str(path), group_size=2)
    assert reason in str(err.value) and "--skip_bad_examples" in str(err.value)


def test_skip_bad_examples_counts_them(tmp_path):
    lines = [line for line, _ in BAD_CASES]
    path = _jsonl(tmp_path / "train.jsonl", [GOOD], extra_lines=lines)
    rows, bad = load_examples(str(path), group_size=2, skip_bad_examples=True)
    assert len(rows) == 1 and bad == len(BAD_CASES)


def test_bad_parquet_row_is_named(tmp_path):
    rows = [GOOD, {"query": "", "pos": ["p"], "neg": ["n"]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    with pytest.raises(TrainingDataError, match="t.parquet row 2"):
        load_examples(str(tmp_path / "t.parquet"))


def test_missing_data_is_an_error(tmp_path):
    with pytest.raises(TrainingDataError, match="not found"):
        list_data_files(str(tmp_path / "nope.jsonl"))
    with pytest.raises(TrainingDataError, match="no .jsonl"):
        list_data_files(str(tmp_path))


def _row(neg, key=7):
    return {"key": key, "query": "q", "pos": ["p1", "p2"], "neg": neg}


def test_group_sampling_is_seeded_by_seed_epoch_and_key():
    row = _row([f"n{i}" for i in range(20)])
    first = sample_group(row, 4, seed=1, epoch=0)
    assert sample_group(row, 4, seed=1, epoch=0) == first  # reproducible
    assert first.passages[0] in ("p1", "p2") and len(set(first.passages[1:])) == 3
    draws = {tuple(sample_group(row, 4, seed=1, epoch=e).passages) for e in range(5)}
    assert len(draws) > 1  # a new draw each epoch
    others = {tuple(sample_group(row, 4, seed=s, epoch=0).passages) for s in range(5)}
    assert len(others) > 1  # and per seed


def test_groups_carry_their_listed_positives_as_keys():
    group = sample_group({"key": 1, "query": "q", "pos": ["p1", "p2", "p1"], "neg": ["n"]},
                         2, seed=0, epoch=0)
    assert group.listed == ("p1", "p2")  # once each, in order
    assert text_key("p1") == text_key("p1") != text_key("p2")
    single = sample_group({"key": 2, "query": "r", "pos": ["s"], "neg": ["n"]}, 2, 0, 0)
    keys = listed_keys([group, single])
    # a short row is padded with its group's own positive's key; passages in batch order
    assert keys["positive_keys"].tolist() == [[text_key("p1"), text_key("p2")],
                                              [text_key("s"), text_key("s")]]
    assert keys["passage_keys"].tolist() == [text_key(p) for g in (group, single)
                                             for p in g.passages]
    no_list = Group(query="q", passages=["a", "b"])  # built by hand: its own positive only
    assert listed_keys([no_list])["positive_keys"].tolist() == [[text_key("a")]]


def test_short_negatives_are_repeated_never_positives():
    group = sample_group(_row(["n1", "n2"]), 8, seed=0, epoch=0)
    negs = group.passages[1:]
    assert len(negs) == 7 and set(negs) == {"n1", "n2"}
    assert sorted(negs).count("n1") in (3, 4)  # repeated as evenly as possible


def test_query_instruction_only_on_queries():
    group = sample_group(_row(["n1"]), 2, 0, 0, query_instruction="Represent: ")
    assert group.query == "Represent: q"
    assert not any(p.startswith("Represent") for p in group.passages)


def test_negatives_equal_to_a_positive_are_dropped(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"query": "q", "pos": ["p"], "neg": ["p", "n"]}])
    rows, _ = load_examples(str(path), group_size=2)
    assert rows[0]["neg"] == ["n"]
