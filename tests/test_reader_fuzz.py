"""Fuzzed bad input files against every reader (Ray-free): one `InputError` naming the file
(and line or row where there is one), or rows with reasons; never another exception.

Readers: `bge_core.io` (plan + read, under the embedding job's `corpus_io` and the training
jobs), `bge_core.records.read_checked` (evaluation / mining inputs), `bge_core.data` (the
finetuning examples) and RetroMAE's `texts_of`. Inputs: JSONL lines of random bytes, random
JSON, integers past Python's 4,300-digit limit and deep nesting; truncated and corrupted
Parquet; Parquet columns of the wrong type.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bge_core.data import parse_range
from bge_core.errors import InputError
from bge_core.io import plan_ranges
from bge_core.records import check_document, read_checked
from pipelines.common.corpus_io import plan_file, read_chunk_rows, validate_rows
from pipelines.train.retromae import texts_of

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
COLUMNS = ["id", "text"]
SPECIAL_LINES = [
    b'{"id": 1, "text": "fine"}',
    b'{"id": ' + b"9" * 5000 + b', "text": "a"}',  # over int's 4,300-digit limit
    b"[" * 50_000 + b"]" * 50_000,  # deeper than the JSON parser's recursion
    b'{"id": 2, "text": "\\ud800"}',  # a lone surrogate
    b"\xff\xfe\x00binary\x00",  # not UTF-8
    b'{"id": 3, "text": ',  # cut short
    b"\x00" * 20,
    b'{"id": NaN, "text": Infinity}',
    b"   ",
]
LINE = st.one_of(
    st.sampled_from(SPECIAL_LINES), st.binary(max_size=60),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(
                     st.sampled_from(["id", "text", "query", "pos", "neg", "title", "x"]), c,
                     max_size=5), max_leaves=12).map(lambda v: json.dumps(v).encode()))


def _outcome(path: Path, read: Any) -> Any:
    """Run one reader; an InputError must name the file (its first line, for the CLI)."""
    try:
        return read()
    except InputError as err:
        assert str(path) in str(err).splitlines()[0], str(err)
        event(f"{type(err).__name__}: {str(err).split(': ', 1)[-1][:40]}")
        return err


def _read_everything(path: Path) -> None:
    """Every reader over one file; only InputError may escape any of them."""
    def embed_job() -> Any:  # pipelines/embed_job: plan, read the columns, validate
        rows, values = [], {c: [] for c in COLUMNS}
        for chunk in plan_file(str(path), 0, 7, COLUMNS):
            got, vals = read_chunk_rows(chunk, COLUMNS)
            rows += got
            for c in COLUMNS:
                values[c] += vals[c]
        return validate_rows(values, "id", "text", None)

    def training() -> Any:
        return [r for part in plan_ranges(str(path), 0, 5) for r in parse_range(part, 2)]

    def retromae() -> Any:
        return [texts_of(part, "text") for part in plan_ranges(str(path), 0, 5)]

    def corpus() -> Any:
        return list(read_checked(str(path), check_document, "corpus"))

    for read in (embed_job, training, retromae, corpus):
        _outcome(path, read)


@FUZZ
@given(lines=st.lists(LINE, min_size=1, max_size=12))
def test_fuzz_jsonl_lines(tmp_path: Path, lines: list[bytes]):
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"\n".join(lines))
    _read_everything(path)


def test_bad_json_lines_name_the_file_and_line(tmp_path: Path):
    for number, line in [(2, SPECIAL_LINES[1]), (2, SPECIAL_LINES[2]), (2, SPECIAL_LINES[4])]:
        path = tmp_path / "c.jsonl"
        path.write_bytes(SPECIAL_LINES[0] + b"\n" + line + b"\n")
        with pytest.raises(InputError, match=rf"c\.jsonl line {number}: not valid"):
            read_chunk_rows(plan_file(str(path), 0, 10, COLUMNS)[0], COLUMNS)
        rows = parse_range(plan_ranges(str(path), 0, 10)[0])
        assert f"c.jsonl line {number}: not valid" in rows[number - 1]["error"]


def _parquet(path: Path, table: pa.Table) -> bytes:
    pq.write_table(table, path, row_group_size=4)
    return path.read_bytes()


GOOD = pa.table({"id": list(range(10)), "text": [f"text {i}" for i in range(10)],
                 "query": ["q"] * 10, "pos": [["p"]] * 10, "neg": [["n"]] * 10})


@FUZZ
@given(data=st.data())
def test_fuzz_truncated_and_corrupted_parquet(tmp_path: Path, data: st.DataObject):
    whole = _parquet(tmp_path / "good.parquet", GOOD)
    cut = data.draw(st.integers(0, len(whole) - 1), label="cut")
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(whole) - 1), st.integers(1, 255)),
                               max_size=3), label="flips")
    damaged = bytearray(whole if flips else whole[:cut])
    for at, xor in flips:
        damaged[at] ^= xor
    path = tmp_path / "corpus.parquet"
    path.write_bytes(bytes(damaged))
    _read_everything(path)


def test_a_truncated_parquet_is_one_input_error_naming_it(tmp_path: Path):
    whole = _parquet(tmp_path / "good.parquet", GOOD)
    path = tmp_path / "cut.parquet"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match=r"cannot read input file .*cut\.parquet"):
        plan_file(str(path), 0, 10, COLUMNS)


WRONG = {  # column name → values of a type no reader expects there
    "int": pa.array(range(4)), "float": pa.array([0.5, None, 2.0, 3.0]),
    "list": pa.array([["a"], [], None, ["b", "c"]]), "binary": pa.array([b"\xff", b"a", None, b""]),
    "struct": pa.array([{"a": 1}, {"a": 2}, None, {"a": None}]), "null": pa.nulls(4),
    "bool": pa.array([True, False, None, True]), "list_int": pa.array([[1], [2, 3], [], None]),
    "string": pa.array(["a", "b", None, ""]),
}


@FUZZ
@given(columns=st.fixed_dictionaries({name: st.sampled_from(sorted(WRONG))
                                      for name in ("id", "text", "query", "pos", "neg")}))
def test_fuzz_parquet_columns_of_the_wrong_type(tmp_path: Path, columns: dict[str, str]):
    table = pa.table({name: WRONG[kind] for name, kind in columns.items()})
    path = tmp_path / "typed.parquet"
    _parquet(path, table)
    _read_everything(path)


def test_wrong_typed_rows_are_rejects_in_the_embed_job_and_errors_in_training(tmp_path: Path):
    path = tmp_path / "t.parquet"
    _parquet(path, pa.table({"id": WRONG["float"], "text": WRONG["list"], "query": WRONG["int"],
                             "pos": WRONG["string"], "neg": WRONG["list_int"]}))
    (chunk,) = plan_file(str(path), 0, 10, COLUMNS)
    texts, reasons = validate_rows(read_chunk_rows(chunk, COLUMNS)[1], "id", "text", None)
    assert texts == [None] * 4
    assert reasons == ["'text' is list, not a string", "missing 'id'",
                       "missing 'text' (a string is required)", "'text' is list, not a string"]
    rows = parse_range(plan_ranges(str(path), 0, 10)[0], 1)
    assert [r["error"] for r in rows] == [
        f"{path} row {i}: missing or empty 'query' (a string is required)" for i in range(1, 5)]
    with pytest.raises(InputError, match=r"t\.parquet row 1: 'text' is list, not a string"):
        texts_of(plan_ranges(str(path), 0, 10)[0], "text")
