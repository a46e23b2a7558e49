"""Ray Data stage functions of the bulk embedding job (module-level, so Ray can ship them).

Main pass: `read_for_encoding` → `encode_dataset` → `write_encoded` (one summary per part).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.corpus_io import (
    ROW_BITS,
    Chunk,
    file_key,
    id_array,
    read_chunk_rows,
    text_hash,
    validate_rows,
)
from pipelines.embed_output import read_table, reject_table, write_table
from pipelines.ray_encode import NODE_COLUMN

DUPLICATE = "duplicate id (an earlier row with this id is kept)"


def read_valid(chunk: Chunk, cfg: dict[str, Any]) -> tuple[dict, list, list, list[int]]:
    columns = [cfg["id_column"], cfg["text_column"]] + (
        [cfg["title_column"]] if cfg.get("title_column") else [])
    values = read_chunk_rows(chunk, columns)
    texts, reasons = validate_rows(values, cfg["id_column"], cfg["text_column"],
                                   cfg.get("title_column"))
    keys = [(chunk.file_index << ROW_BITS) | (chunk.row_offset + i) for i in range(len(texts))]
    return values, texts, reasons, keys


def read_for_encoding(batch: dict[str, Any], cfg: dict[str, Any], losers: frozenset[int],
                      to_encode: frozenset[int] | None) -> pa.Table:
    """Main pass: read one chunk, write its rejects, emit the rows to encode.

    Rows not in `to_encode` (incremental runs) are kept from the previous output and not
    emitted. A chunk with nothing to encode emits one marker row, so the driver still
    hears that it finished.
    """
    chunk = Chunk(**{k: _scalar(v) for k, v in batch.items()})
    values, texts, reasons, keys = read_valid(chunk, cfg)
    reasons = [DUPLICATE if r is None and k in losers else r for r, k in zip(reasons, keys)]
    ids = values[cfg["id_column"]]
    bad = [i for i, r in enumerate(reasons) if r is not None]
    reject_name = f"{file_key(chunk.path)}-c{chunk.index}.parquet"
    if bad:
        write_table(reject_table([ids[i] for i in bad], chunk.path,
                                 [chunk.row_offset + i for i in bad], [reasons[i] for i in bad]),
                    f"{cfg['output'].rstrip('/')}/_rejects/{reject_name}")
    emit = [i for i, r in enumerate(reasons)
            if r is None and (to_encode is None or keys[i] in to_encode)]
    kept = len(texts) - len(bad) - len(emit)
    marker = not emit
    rows = emit or [0]
    n = len(rows)
    return pa.table({
        "id": id_array([None if marker else ids[i] for i in rows]),
        "text": pa.array(["" if marker else texts[i] for i in rows], type=pa.string()),
        "text_hash": pa.array(["" if marker else text_hash(texts[i]) for i in rows]),
        "_row_key": pa.array([-1 if marker else keys[i] for i in rows], type=pa.int64()),
        "_file": pa.array([chunk.path] * n, type=pa.string()),
        "_chunk": pa.array([chunk.index] * n, type=pa.int64()),
        "_emit": pa.array([len(emit)] * n, type=pa.int64()),
        "_rejected": pa.array([len(bad)] * n, type=pa.int64()),
        "_rejects_file": pa.array([reject_name if bad else ""] * n, type=pa.string()),
        "_kept": pa.array([kept] * n, type=pa.int64()),
        "_marker": pa.array([marker] * n, type=pa.bool_()),
    })


def write_encoded(batch: pa.Table, output: str, id_column: str) -> pa.Table:
    """Write each chunk's encoded rows to a part file; return one summary row per part."""
    summaries: list[dict[str, Any]] = []
    for path in pc.unique(batch.column("_file")).to_pylist():
        in_file = batch.filter(pc.equal(batch.column("_file"), path))
        for index in pc.unique(in_file.column("_chunk")).to_pylist():
            part = in_file.filter(pc.equal(in_file.column("_chunk"), index))
            rows = part.filter(pc.invert(part.column("_marker")))
            name = ""
            if rows.num_rows:
                # Named by content (first row key, row count): a retried write overwrites.
                first_key = pc.min(rows.column("_row_key")).as_py()
                name = f"part-{file_key(path)}-c{index}-{first_key}"
                name = f"{name}-{rows.num_rows}.parquet"
                table = pa.table({id_column: rows.column("id"),
                                  "embedding": rows.column("embedding"),
                                  "text_hash": rows.column("text_hash")})
                write_table(table, f"{output.rstrip('/')}/{name}")
            first = part.slice(0, 1).to_pylist()[0]
            summaries.append({
                "file": path, "chunk": index, "part": name, "written": rows.num_rows,
                "truncated": int(pc.sum(rows.column("truncated")).as_py() or 0),
                "emit": first["_emit"], "rejected": first["_rejected"],
                "rejects_file": first["_rejects_file"], "kept": first["_kept"],
                "node": first.get(NODE_COLUMN) or "",
            })
    return pa.Table.from_pylist(summaries, schema=SUMMARY_SCHEMA)


SUMMARY_SCHEMA = pa.schema([
    ("file", pa.string()), ("chunk", pa.int64()), ("part", pa.string()),
    ("written", pa.int64()), ("truncated", pa.int64()), ("emit", pa.int64()),
    ("rejected", pa.int64()), ("rejects_file", pa.string()), ("kept", pa.int64()),
    ("node", pa.string()),
])


def copy_kept(batch: dict[str, Any], output: str, id_column: str, drop_ids: list[Any]) -> pa.Table:
    """Incremental pass: copy one previous part minus dropped/changed ids to the output."""
    path = str(_scalar(batch["path"]))
    table = read_table(path)
    if drop_ids:
        table = table.filter(pc.invert(pc.is_in(table.column(id_column),
                                                pa.array(drop_ids, table.schema.field(
                                                    id_column).type))))
    name = f"part-kept-{file_key(path)}.parquet"
    write_table(table, f"{output.rstrip('/')}/{name}")
    return pa.table({"source": [path], "part": [name], "rows": [table.num_rows]})


def _scalar(value: Any) -> Any:
    """Ray hands batch_size=1 batches as length-1 arrays; unwrap to a Python value."""
    item = value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value
    if isinstance(item, (list, tuple)):
        return tuple(item)
    return item.tolist() if hasattr(item, "tolist") else item
