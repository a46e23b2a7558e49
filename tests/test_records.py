"""One validator per record kind; the same bad record gets the same message in every reader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bge_core import records
from bge_core.records import RecordError, located, read_checked


def test_training_example_rules_name_the_field() -> None:
    check = records.check_training_example
    assert check({"query": "q", "pos": ["p"]}) is None
    assert check({"query": "q", "pos": ["p"], "neg": None}) is None
    assert "JSON object" in check(["q"])
    assert "'query'" in check({"query": "", "pos": ["p"]})  # mining used to accept it
    assert "'query'" in check({"query": 3, "pos": ["p"]})
    assert "'pos' must be a list" in check({"query": "q", "pos": "p"})
    assert "'pos' is empty" in check({"query": "q", "pos": [" "]})
    assert "'neg' must hold only strings" in check({"query": "q", "pos": ["p"], "neg": [1]})
    assert check({"query": "q", "pos": ["p"], "neg": ["p"]}) is None
    assert "train_group_size=2" in check({"query": "q", "pos": ["p"], "neg": ["p"]}, 2)


def test_candidate_and_beir_rules_name_the_field() -> None:
    assert records.check_candidate({"text": ""}) is None
    assert records.check_candidate({"txt": "a"}) == "missing 'text' (a string is required)"
    assert records.check_candidate({"text": 5}) == "'text' is int, not a string"
    assert records.check_beir_query({"_id": 1, "text": "q"}) is None
    assert records.check_beir_query({"text": "q"}) == "missing '_id'"
    assert records.check_beir_doc({"_id": "d", "title": None, "text": "t"}) is None
    assert records.check_beir_doc({"_id": "d", "title": 2, "text": "t"}) == \
        "'title' is int, not a string"
    assert records.check_beir_doc({"_id": "d", "title": "x"}) == \
        "missing 'text' (a string is required)"
    assert records.check_text({"text": None}) is None  # skipped and counted by the reader
    assert records.check_text({"body": ["a"]}, "body") == "'body' is list, not a string"
    assert records.parse_qrel(["q1", "d1", "2"]) == ("q1", "d1", 2)
    assert "query-id<TAB>corpus-id<TAB>score" in records.parse_qrel(["q1", "d1"])
    assert "query-id<TAB>corpus-id<TAB>score" in records.parse_qrel(["q1", "d1", "x"])


def test_reader_names_file_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "pool.jsonl"
    path.write_text('{"text": "a"}\n\n{"txt": "b"}\n')
    with pytest.raises(RecordError) as err:
        list(read_checked(str(path), records.check_candidate, "candidate pool"))
    assert str(err.value) == located(str(path), 3, "missing 'text' (a string is required)")
    path.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match="pool.jsonl line 2: not valid JSON"):
        list(read_checked(str(path), records.check_candidate, "candidate pool"))


def test_qrels_and_queries_readers_use_the_same_messages(tmp_path: Path) -> None:
    from bge_core.beir import read_qrels, read_queries

    qrels = tmp_path / "test.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\n")
    with pytest.raises(RecordError) as err:
        read_qrels(str(qrels))
    assert str(err.value).startswith(f"{qrels} line 3: expected 'query-id<TAB>")
    queries = tmp_path / "queries.jsonl"
    queries.write_text(json.dumps({"_id": "q1", "text": "a"}) + "\n" + json.dumps({"_id": "q2"}))
    with pytest.raises(RecordError, match=f"{queries} line 2: missing 'text'"):
        read_queries(str(queries))


BAD_EXAMPLE = {"query": "", "pos": ["p"], "neg": ["n"]}  # finetuning rejected, mining took


def _training_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    good = {"query": "q", "pos": ["p"], "neg": ["n"]}
    path.write_text("".join(json.dumps(e) + "\n" for e in (good, good, BAD_EXAMPLE)))
    return path


@pytest.mark.timeout(180)
def test_same_bad_example_same_message_in_finetune_and_mining(ray_session,
                                                               tmp_path: Path) -> None:
    """finetune's reader (`bge_core.data`), mining's Ray reader and the in-process reader."""
    from bge_core.data import TrainingDataError
    from bge_core.data import load_examples as read_training_data
    from pipelines.search.mining import examples_dataset as read_mining_data

    path = _training_file(tmp_path)
    expected = located(str(path), 3, "missing or empty 'query' (a string is required)")
    with pytest.raises(TrainingDataError) as finetune_err:
        read_training_data(str(path))
    assert f"invalid training example: {expected} (1 invalid" in str(finetune_err.value)
    with pytest.raises(RecordError) as mining_err:
        read_mining_data(str(path))
    assert str(mining_err.value) == expected
    with pytest.raises(RecordError) as local_err:
        list(read_checked(str(path), records.check_training_example, "training data"))
    assert str(local_err.value) == expected


def test_embed_rows_and_beir_documents_share_one_rule() -> None:
    """The embedding job's rejects and the BEIR reader give the same reason for the same
    bad document (the embed job under its own column names)."""
    from pipelines.common.corpus_io import validate_rows

    docs = [{"_id": "a", "title": None, "text": "ok"}, {"_id": "b", "text": None},
            {"_id": None, "text": "t"}, {"_id": "c", "title": 3, "text": "t"}]
    values = {k: [d.get(k) for d in docs] for k in ("_id", "title", "text")}
    texts, reasons = validate_rows(values, "_id", "text", "title")
    assert texts == ["ok", None, None, None]
    assert reasons == [records.check_beir_doc(d) for d in docs]
    assert reasons[1:] == ["missing 'text' (a string is required)", "missing '_id'",
                           "'title' is int, not a string"]
    renamed = {"doc_id": values["_id"], "body": values["text"]}
    _, reasons = validate_rows(renamed, "doc_id", "body", None)
    assert reasons[1:3] == ["missing 'body' (a string is required)", "missing 'doc_id'"]
