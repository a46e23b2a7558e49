"""The one data reader (`bge_core.io`): listing, JSONL ranges cut at whole lines, Parquet
row groups, at a local path or an fsspec URI."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bge_core.io import (
    DataFileError,
    columns_of,
    list_files,
    plan_ranges,
    read_columns,
    read_range,
)

# CRLF lines, multibyte UTF-8 (2, 3 and 4 bytes), a blank line, no final line break
TRICKY = ('{"t": "caf\u00e9"}\r\n{"t": "\u6f22\u5b57\u6f22\u5b57"}\n\n{"t": "\U0001f600 x"}\n'
          '{"t": "plain"}\r\n{"t": "\u00e9\u00e9\u00e9\u00e9"}').encode()


def _expected(data: bytes) -> list[tuple[int, object]]:
    lines = data.split(b"\n")
    return [(i, json.loads(line)) for i, line in enumerate(lines) if line.strip()]


def _read_all(ranges) -> list[tuple[int, object]]:
    return [(row, record) for part in ranges for row, record, _ in read_range(part)]


def _check_cover(ranges, data: bytes, rows_per_range: int) -> None:
    """Ranges tile the file, each starts at a line start and holds at most the asked rows."""
    assert [p.index for p in ranges] == list(range(len(ranges)))
    assert ranges[0].start == 0 and ranges[-1].end == len(data)
    for before, after in zip(ranges, ranges[1:]):
        assert before.end == after.start and data[after.start - 1:after.start] == b"\n"
        assert after.row_offset == before.row_offset + before.rows
    assert all(0 < p.rows <= rows_per_range for p in ranges) or len(data) == 0


@pytest.mark.parametrize("rows_per_range", [1, 2, 3, 6, 100])
def test_jsonl_ranges_cut_whole_lines_whatever_the_scan_block(tmp_path, rows_per_range):
    path = tmp_path / "t.jsonl"
    path.write_bytes(TRICKY)
    reference = plan_ranges(str(path), 0, rows_per_range)
    _check_cover(reference, TRICKY, rows_per_range)
    assert _read_all(reference) == _expected(TRICKY)  # every record once, right line
    assert sum(p.rows for p in reference) == TRICKY.count(b"\n") + 1
    # a scan block ending inside a CRLF pair, inside a multibyte character, or exactly
    # after a line break plans the same ranges
    for scan_bytes in range(1, len(TRICKY) + 2):
        assert plan_ranges(str(path), 0, rows_per_range, scan_bytes) == reference


def test_a_line_break_at_the_end_of_a_range_and_of_the_file(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(4)))
    ranges = plan_ranges(str(path), 3, 2)  # the second cut falls exactly at the end
    assert [(p.row_offset, p.rows) for p in ranges] == [(0, 2), (2, 2)]
    assert [r["i"] for _, r, _ in read_range(ranges[1])] == [2, 3]
    assert {p.file_index for p in ranges} == {3}


def test_an_empty_file_is_one_empty_range(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    (only,) = plan_ranges(str(path), 0, 10)
    assert (only.start, only.end, only.rows) == (0, 0, 0)
    assert list(read_range(only)) == [] and columns_of(only) is None


def test_bad_lines_are_named_with_their_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"t": "a"}\n\n{"t": \n{"t": "\xff"}\n[1]\n')
    records = list(read_range(plan_ranges(str(path), 0, 10)[0]))
    assert [(row, error.split(" (")[0] if error else None) for row, _, error in records] == [
        (0, None), (2, "not valid JSON"), (3, "not valid UTF-8"), (4, None)]
    part = plan_ranges(str(path), 0, 2)[1]  # lines 3-4
    with pytest.raises(DataFileError, match=r"bad\.jsonl line 3: not valid JSON"):
        read_columns(part, ["t"])


def test_read_columns_gives_rows_and_nulls_for_missing_keys(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": 1, "t": "x"}\n\n{"id": 2}\n"not an object"\n')
    assert read_columns(plan_ranges(str(path), 0, 10)[0], ["id", "t"]) == (
        [0, 2, 3], {"id": [1, 2, None], "t": ["x", None, None]})
    assert columns_of(plan_ranges(str(path), 0, 10)[0]) == {"id", "t"}


def test_parquet_row_groups_are_grouped_into_ranges(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"t": [f"r{i}" for i in range(10)]}), path, row_group_size=3)
    ranges = plan_ranges(str(path), 1, 5)
    assert [(p.row_groups, p.row_offset, p.rows) for p in ranges] == [
        ((0, 1), 0, 6), ((2, 3), 6, 4)]
    assert [(row, r["t"]) for row, r, _ in read_range(ranges[1])] == [
        (6, "r6"), (7, "r7"), (8, "r8"), (9, "r9")]
    assert columns_of(ranges[0]) == {"t"}


def test_list_files_folder_glob_and_errors(tmp_path):
    for name in ("b.jsonl", "a.parquet", "_state/x.jsonl", ".hidden.jsonl", "notes.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    assert [f.rsplit("/", 1)[1] for f in list_files(str(tmp_path))] == ["a.parquet", "b.jsonl"]
    assert list_files(str(tmp_path / "*.parquet")) == [str(tmp_path / "a.parquet")]
    with pytest.raises(KeyError, match="corpus not found: .*nope"):
        list_files(str(tmp_path / "nope"), "corpus", KeyError)
    with pytest.raises(DataFileError, match="no .jsonl, .json or .parquet files"):
        list_files(str(tmp_path / "_state" / "*.txt"))


def test_ranges_read_from_s3(s3, tmp_path):
    s3.pipe("bucket/corpus/part.jsonl", TRICKY)
    (uri,) = list_files("s3://bucket/corpus/")
    assert uri == "s3://bucket/corpus/part.jsonl"
    assert _read_all(plan_ranges(uri, 0, 2)) == _expected(TRICKY)
