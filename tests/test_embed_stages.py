"""The embed job's read stage on its own (no Ray): what an earlier attempt wrote is not
emitted again, whole texts or single chunks, and is counted for the driver."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from pipelines.common.cli import make_config
from pipelines.common.corpus_io import ROW_BITS, plan_file
from pipelines.embed.config import EmbedConfig
from pipelines.embed.output import write_table
from pipelines.embed.stages import part_marker_dir, read_for_encoding
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
    table = _read(cfg, chunk)
    assert table.column("_row_key").to_pylist() == [0, 2]
    first = table.slice(0, 1).to_pylist()[0]
    assert (first["_emit"], first["_prior_docs"], first["_prior_parts"]) == (2, 1, "part-a.parquet")
    _mark(cfg, chunk, "part-b.parquet", [(0, 0), (2, 0)])
    done = _read(cfg, chunk).to_pylist()
    assert len(done) == 1 and done[0]["_marker"] and done[0]["_emit"] == 0
    assert done[0]["_prior_docs"] == 3 and done[0]["_prior_parts"].split(",") == [
        "part-a.parquet", "part-b.parquet"]


def test_chunks_written_before_are_not_emitted_again(tmp_path, tiny_bert_dir) -> None:
    cfg, chunk = _setup(tmp_path, tiny_bert_dir, chunk_tokens=8, chunk_overlap=2)
    full = _read(cfg, chunk)
    pairs = list(zip(full.column("_row_key").to_pylist(), full.column("chunk").to_pylist()))
    windows = {key: sum(k == key for k, _ in pairs) for key in (0, 1, 2)}
    assert all(n > 2 for n in windows.values())
    key1 = (0 << ROW_BITS) | 1  # row 1 of file 0
    done = [(0, c) for c in range(windows[0])] + [(key1, 0)]  # text 0 whole, text 1 begun
    _mark(cfg, chunk, "part-a.parquet", done)
    table = _read(cfg, chunk)
    left = list(zip(table.column("_row_key").to_pylist(), table.column("chunk").to_pylist()))
    assert left == [p for p in pairs if p not in done]
    first = table.slice(0, 1).to_pylist()[0]
    assert (first["_emit"], first["_prior_docs"], first["_prior_rows"]) == \
        (len(left), 1, len(done))
    assert sum(table.column("_last").to_pylist()) == 2  # texts 1 and 2 finish in this attempt


def test_a_jsonl_file_is_read_in_line_ranges_keyed_and_rejected_by_line(
        tmp_path, tiny_bert_dir) -> None:
    import pyarrow.parquet as pq

    docs = [{"id": i, "text": f"text {i}" if i != 3 else None} for i in range(5)]
    write_jsonl(tmp_path / "c.jsonl", docs)
    cfg = make_config(EmbedConfig, input=str(tmp_path / "c.jsonl"), output=str(tmp_path / "o"),
                      model=str(tiny_bert_dir), chunk_rows=2).stage_dict()
    chunks = plan_file(str(tmp_path / "c.jsonl"), 1, 2, ["id", "text"])
    assert [(c.row_offset, c.rows) for c in chunks] == [(0, 2), (2, 2), (4, 1)]
    tables = [_read(cfg, c) for c in chunks]
    keys = [k for t in tables for k in t.column("_row_key").to_pylist()]
    assert keys == [(1 << ROW_BITS) | row for row in (0, 1, 2, 4)]  # row = line, file 1
    assert [t.column("_rejected")[0].as_py() for t in tables] == [0, 1, 0]
    rejects = pq.read_table(tmp_path / "o" / "_rejects" / tables[1].column(
        "_rejects_file")[0].as_py()).to_pylist()
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
