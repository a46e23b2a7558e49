"""The embed job's read stage on its own (no Ray): what an earlier attempt wrote is not
emitted again, whole texts or single chunks, and is counted for the driver."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from pipelines.common.cli import make_config
from pipelines.common.corpus_io import ROW_BITS, plan_file
from pipelines.embed.accounting import ACCOUNT, PartSummary, read_account
from pipelines.embed.config import EmbedConfig
from pipelines.embed.output import write_table
from pipelines.embed.stages import part_marker_dir, read_for_encoding, write_encoded
from tests.embed_helpers import write_jsonl
from tests.tiny_models import WORDS


def _setup(tmp_path: Path, tiny_bert_dir: Path, **extra):
    docs = [{"id": i, "text": " ".join(WORDS[i * 7:i * 7 + 30])} for i in range(3)]
    write_jsonl(tmp_path / "c.jsonl", docs)
    cfg = make_config(EmbedConfig, input=str(tmp_path / "c.jsonl"), output=str(tmp_path / "o"),
                      model=str(tiny_bert_dir), **extra).stage_dict()
    (chunk,) = plan_file(str(tmp_path / "c.jsonl"), 0, 100, ["id", "text"])
    return cfg, chunk


def _read(cfg: dict, chunk) -> pa.Table:
    batch = {k: [v] for k, v in chunk.to_dict().items()}
    return read_for_encoding(batch, cfg, frozenset(), None)


def _mark(cfg: dict, chunk, name: str, pairs: list[tuple[int, int]]) -> None:
    write_table(pa.table({"key": [k for k, _ in pairs],
                          "chunk": pa.array([c for _, c in pairs], type=pa.int32())}),
                f"{part_marker_dir(cfg['output'], chunk.path, chunk.index)}/{name}")


def test_texts_written_before_are_not_emitted_again(tmp_path, tiny_bert_dir) -> None:
    cfg, chunk = _setup(tmp_path, tiny_bert_dir)
    assert _read(cfg, chunk).num_rows == 3
    _mark(cfg, chunk, "part-a.parquet", [(1, 0)])  # row 1 of file 0
    table = read_account(_read(cfg, chunk))
    assert table.column("key").to_pylist() == [0, 2]
    first = table.slice(0, 1).to_pylist()[0]
    assert (first["emit"], first["prior_docs"], first["prior_parts"]) == (2, 1, ["part-a.parquet"])
    _mark(cfg, chunk, "part-b.parquet", [(0, 0), (2, 0)])
    done = read_account(_read(cfg, chunk)).to_pylist()
    assert len(done) == 1 and done[0]["marker"] and done[0]["emit"] == 0
    assert done[0]["prior_docs"] == 3 and done[0]["prior_parts"] == [
        "part-a.parquet", "part-b.parquet"]


def test_chunks_written_before_are_not_emitted_again(tmp_path, tiny_bert_dir) -> None:
    cfg, chunk = _setup(tmp_path, tiny_bert_dir, chunk_tokens=8, chunk_overlap=2)
    full = _read(cfg, chunk)
    pairs = list(zip(read_account(full).column("key").to_pylist(),
                     full.column("chunk").to_pylist()))
    windows = {key: sum(k == key for k, _ in pairs) for key in (0, 1, 2)}
    assert all(n > 2 for n in windows.values())
    key1 = (0 << ROW_BITS) | 1  # row 1 of file 0
    done = [(0, c) for c in range(windows[0])] + [(key1, 0)]  # text 0 whole, text 1 begun
    _mark(cfg, chunk, "part-a.parquet", done)
    table = _read(cfg, chunk)
    account = read_account(table)
    left = list(zip(account.column("key").to_pylist(), table.column("chunk").to_pylist()))
    assert left == [p for p in pairs if p not in done]
    first = account.slice(0, 1).to_pylist()[0]
    assert (first["emit"], first["prior_docs"], first["prior_rows"]) == \
        (len(left), 1, len(done))
    assert sum(account.column("last").to_pylist()) == 2  # texts 1 and 2 finish in this attempt


def test_the_write_stage_splits_a_batch_by_input_chunk_and_reports_each(
        tmp_path, tiny_bert_dir) -> None:
    """Rows of two chunks (one of them only a marker row) re-batched together, as the encode
    stage hands them on: one part for the chunk with rows, none for the marker, and each
    summary carries its own chunk's account. The rows carry one accounting column only."""
    import numpy as np

    from pipelines.common.encode import vectors_to_arrow

    cfg, chunk = _setup(tmp_path, tiny_bert_dir)
    rows = _read(cfg, chunk)
    assert [c for c in rows.column_names if c.startswith("_")] == [ACCOUNT]
    write_jsonl(tmp_path / "d.jsonl", [{"id": 10 + i, "text": f"text {i}"} for i in range(3)])
    (other,) = plan_file(str(tmp_path / "d.jsonl"), 1, 100, ["id", "text"])
    _mark(cfg, other, "part-x.parquet", [((1 << ROW_BITS) | r, 0) for r in range(3)])
    marker = _read(cfg, other)
    batch = pa.concat_tables([rows.slice(0, 2), marker, rows.slice(2)],
                             promote_options="default")  # the marker's id is null
    vectors = np.random.default_rng(0).standard_normal((batch.num_rows, 4)).astype("float32")
    batch = batch.append_column("embedding", vectors_to_arrow(vectors)).append_column(
        "truncated", pa.array([False, True, False, False]))
    summaries = {(s.account.file, s.account.chunk, s.account.marker): s for s in map(
        PartSummary.from_row, write_encoded(batch, cfg["output"], "id").to_pylist())}
    written = summaries[(chunk.path, chunk.index, False)]
    assert (written.written, written.docs, written.truncated, written.account.emit) == (3, 3, 1, 3)
    assert written.part.endswith("-c0-0-3.parquet")  # first row key 0, 3 rows
    done = summaries[(other.path, other.index, True)]
    assert (done.part, done.written, done.docs, done.account.prior_docs) == ("", 0, 0, 3)
    parts = sorted(p.name for p in (tmp_path / "o").glob("part-*.parquet"))
    assert parts == [written.part]


def test_a_jsonl_file_is_read_in_line_ranges_keyed_and_rejected_by_line(
        tmp_path, tiny_bert_dir) -> None:
    import pyarrow.parquet as pq

    docs = [{"id": i, "text": f"text {i}" if i != 3 else None} for i in range(5)]
    write_jsonl(tmp_path / "c.jsonl", docs)
    cfg = make_config(EmbedConfig, input=str(tmp_path / "c.jsonl"), output=str(tmp_path / "o"),
                      model=str(tiny_bert_dir), chunk_rows=2).stage_dict()
    chunks = plan_file(str(tmp_path / "c.jsonl"), 1, 2, ["id", "text"])
    assert [(c.row_offset, c.rows) for c in chunks] == [(0, 2), (2, 2), (4, 1)]
    tables = [read_account(_read(cfg, c)) for c in chunks]
    keys = [k for t in tables for k in t.column("key").to_pylist()]
    assert keys == [(1 << ROW_BITS) | row for row in (0, 1, 2, 4)]  # row = line, file 1
    assert [t.column("rejected")[0].as_py() for t in tables] == [0, 1, 0]
    rejects = pq.read_table(tmp_path / "o" / "_rejects" / tables[1].column(
        "rejects_file")[0].as_py()).to_pylist()
    assert [(r["row"], r["reason"]) for r in rejects] == [
        (3, "missing 'text' (a string is required)")]


def test_the_tokenise_stage_truncates_within_the_models_positions(tmp_path, tiny_bert_dir):
    """A model folder without our config gets the default 512-token limit, but the tiny
    BERT has 128 positions: the job's tokenise stage must cut at 128, as `Encoder` does (it
    sent 143 tokens to the actors, which failed)."""
    from bge_core import Encoder
    from pipelines.common.encode import TOKENS_COLUMN, tokenize_batch

    batch = pa.table({"text": [" ".join(WORDS * 20)]})
    out = tokenize_batch(batch, str(tiny_bert_dir), None, "text", "")
    (ids,) = out.column(TOKENS_COLUMN).to_pylist()
    assert len(ids) == 128 and out.column("truncated").to_pylist() == [True]
    assert Encoder.from_pretrained(str(tiny_bert_dir), device="cpu").config.max_length == 128
