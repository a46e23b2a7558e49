"""Ray Data stage functions of the bulk embedding job (module-level, so Ray can ship them).

Main pass: `read_for_encoding` → `encode_dataset` → `write_encoded` (one summary per part).
With chunking on, `read_for_encoding` emits one row per token window (`_chunk_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.common.corpus_io import (
    ROW_BITS,
    Chunk,
    file_key,
    id_array,
    read_chunk_rows,
    text_hash,
    validate_rows,
)
from pipelines.common.encode import NODE_COLUMN
from pipelines.common.lease import Fence
from pipelines.embed.output import read_table, reject_table, write_table

ROW_MASK = (1 << ROW_BITS) - 1  # a row key's row number (its low bits)
DUPLICATE = "duplicate id (an earlier row with this id is kept)"


def read_valid(chunk: Chunk, cfg: dict[str, Any]) -> tuple[dict, list, list, list[int]]:
    columns = [cfg["id_column"], cfg["text_column"]] + (
        [cfg["title_column"]] if cfg.get("title_column") else [])
    rows, values = read_chunk_rows(chunk, columns)
    texts, reasons = validate_rows(values, cfg["id_column"], cfg["text_column"],
                                   cfg.get("title_column"))
    keys = [(chunk.file_index << ROW_BITS) | row for row in rows]
    return values, texts, reasons, keys


@dataclass
class ChunkAccount:
    """What one input chunk's read task knows of its rows, carried on every row it emits
    so the driver can account for the chunk once its rows are written."""

    rejected: int = 0
    rejects_file: str = ""
    kept: int = 0  # unchanged rows an incremental run copies from the previous output
    prior_docs: int = 0  # texts whose rows an earlier attempt wrote (part markers)
    prior_rows: int = 0  # output rows of those, and of texts partly written before
    prior_parts: list[str] = field(default_factory=list)


def read_for_encoding(batch: dict[str, Any], cfg: dict[str, Any], losers: frozenset[int],
                      to_encode: frozenset[int] | None, fence: Fence | None = None) -> pa.Table:
    """Main pass: read one chunk, write its rejects, emit the rows to encode.

    Every file it writes is checked against `fence` (the run's lease) first.

    Rows not in `to_encode` (incremental runs) are kept from the previous output and not
    emitted; rows an earlier attempt already wrote (its part markers) are not emitted
    again. A chunk with nothing to encode emits one marker row, so the driver still hears
    that it finished.
    """
    chunk = Chunk(**{k: _scalar(v) for k, v in batch.items()})
    values, texts, reasons, keys = read_valid(chunk, cfg)
    reasons = [DUPLICATE if r is None and k in losers else r for r, k in zip(reasons, keys)]
    ids = values[cfg["id_column"]]
    bad = [i for i, r in enumerate(reasons) if r is not None]
    account = ChunkAccount(rejected=len(bad))
    if bad:
        account.rejects_file = f"{file_key(chunk.path)}-c{chunk.index}.parquet"
        write_table(reject_table([ids[i] for i in bad], chunk.path,
                                 [keys[i] & ROW_MASK for i in bad], [reasons[i] for i in bad]),
                    f"{cfg['output'].rstrip('/')}/_rejects/{account.rejects_file}", fence)
    emit = [i for i, r in enumerate(reasons)
            if r is None and (to_encode is None or keys[i] in to_encode)]
    account.kept = len(texts) - len(bad) - len(emit)
    done, account.prior_parts = read_part_markers(cfg["output"], chunk)
    if cfg.get("chunk_tokens"):
        return _chunk_rows(chunk, cfg, values, texts, keys, emit, account, done)
    todo = [i for i in emit if (keys[i], 0) not in done]
    account.prior_docs = account.prior_rows = len(emit) - len(todo)
    rows = todo or [0]
    marker = not todo
    return pa.table({
        "id": id_array([None if marker else ids[i] for i in rows]),
        "text": pa.array(["" if marker else texts[i] for i in rows], type=pa.string()),
        "text_hash": pa.array(["" if marker else text_hash(texts[i]) for i in rows]),
        "_row_key": pa.array([-1 if marker else keys[i] for i in rows], type=pa.int64()),
        **_chunk_fields(chunk, len(rows), len(todo), account, marker),
    })


def _chunk_rows(chunk: Chunk, cfg: dict[str, Any], values: dict[str, list[Any]],
                texts: list[str | None], keys: list[int], emit: list[int],
                account: ChunkAccount, done: set[tuple[int, int]]) -> pa.Table:
    """Chunking: one row per token window of each emitted text (`bge_core.chunking`).

    The window is cut from the text column alone (offsets index that string); the title,
    when there is one, prefixes every chunk: ``title + " " + text[start_char:end_char]``.
    Windows an earlier attempt wrote (`done`) are skipped. `_emit` counts window rows (the
    write stage's completion check). With nothing to emit, one marker row with the same
    columns tells the driver the chunk is done.
    """
    from bge_core.chunking import ChunkSpec, split_texts
    from bge_core.texts import join_title
    from pipelines.common.encode import tokenizer_for

    bodies = [values[cfg["text_column"]][i] for i in emit]
    title_column = cfg.get("title_column")
    titles = [values[title_column][i] for i in emit] if title_column else [None] * len(emit)
    spec = ChunkSpec(cfg["chunk_tokens"], cfg.get("chunk_overlap") or 0)
    spans = split_texts(tokenizer_for(cfg["encode"]["model"]).tokenizer, bodies, spec)
    out: dict[str, list[Any]] = {k: [] for k in ("id", "text", "text_hash", "_row_key",
                                                  "chunk", "start_char", "end_char", "_last")}
    ids = values[cfg["id_column"]]
    for i, body, title, doc_spans in zip(emit, bodies, titles, spans):
        todo = [k for k in range(len(doc_spans)) if (keys[i], k) not in done]
        account.prior_rows += len(doc_spans) - len(todo)
        account.prior_docs += not todo
        for k in todo:
            start, end = doc_spans[k]
            out["id"].append(ids[i])
            out["text"].append(join_title(title, body[start:end]))
            out["text_hash"].append(text_hash(texts[i] or ""))
            out["_row_key"].append(keys[i])
            out["chunk"].append(k)
            out["start_char"].append(start)
            out["end_char"].append(end)
            out["_last"].append(k == todo[-1])  # one per text: counts texts finished
    n = len(out["id"])
    marker = n == 0
    if marker:
        for key, value in (("id", None), ("text", ""), ("text_hash", ""), ("_row_key", -1),
                           ("chunk", 0), ("start_char", 0), ("end_char", 0), ("_last", True)):
            out[key].append(value)
    return pa.table({
        "id": id_array(out["id"]), "text": pa.array(out["text"], type=pa.string()),
        "text_hash": pa.array(out["text_hash"], type=pa.string()),
        "_row_key": pa.array(out["_row_key"], type=pa.int64()),
        "chunk": pa.array(out["chunk"], type=pa.int32()),
        "start_char": pa.array(out["start_char"], type=pa.int64()),
        "end_char": pa.array(out["end_char"], type=pa.int64()),
        "_last": pa.array(out["_last"], type=pa.bool_()),
        **_chunk_fields(chunk, len(out["id"]), n, account, marker),
    })


def _chunk_fields(chunk: Chunk, rows: int, emit: int, account: ChunkAccount,
                  marker: bool) -> dict[str, pa.Array]:
    """The per-input-chunk columns every emitted row carries (for the driver's accounting)."""
    def same(value: Any, kind: pa.DataType) -> pa.Array:
        return pa.array([value] * rows, type=kind)

    return {
        "_file": same(chunk.path, pa.string()), "_chunk": same(chunk.index, pa.int64()),
        "_emit": same(emit, pa.int64()), "_rejected": same(account.rejected, pa.int64()),
        "_rejects_file": same(account.rejects_file, pa.string()),
        "_kept": same(account.kept, pa.int64()),
        "_prior_docs": same(account.prior_docs, pa.int64()),
        "_prior_rows": same(account.prior_rows, pa.int64()),
        "_prior_parts": same(",".join(account.prior_parts), pa.string()),
        "_marker": same(marker, pa.bool_()),
    }


def part_marker_dir(output: str, chunk_path: str, chunk_index: int) -> str:
    """Where the write tasks record the parts of one input chunk, one marker per part."""
    return f"{output.rstrip('/')}/_state/parts/{file_key(chunk_path)}-c{chunk_index}"


def read_part_markers(output: str, chunk: Chunk) -> tuple[set[tuple[int, int]], list[str]]:
    """(row key, chunk) pairs an earlier attempt wrote for this input chunk, and its parts.

    A marker is written right after its part (`write_encoded`), so a part without one is
    incomplete; the driver deletes those before the attempt starts.
    """
    fs, folder = fsspec.core.url_to_fs(part_marker_dir(output, chunk.path, chunk.index))
    if not fs.exists(folder):
        return set(), []
    done: set[tuple[int, int]] = set()
    parts = []
    for path in sorted(fs.ls(folder, detail=False)):
        name = path.rsplit("/", 1)[1]
        if not name.startswith("part-"):
            continue  # a temporary file of a marker being written
        table = read_table(fs.unstrip_protocol(path))
        done.update(zip(table.column("key").to_pylist(), table.column("chunk").to_pylist()))
        parts.append(name)
    return done, parts


CHUNK_COLUMNS = ("chunk", "start_char", "end_char")


def write_encoded(batch: pa.Table, output: str, id_column: str,
                  vectors: dict[str, Any] | None = None,
                  fence: Fence | None = None) -> pa.Table:
    """Write each chunk's encoded rows to a part file; return one summary row per part.

    `vectors`: the stored form (`pipelines.embed.quantize.vector_spec`; None: as encoded).
    Each part and its marker are checked against `fence` (the run's lease) first.
    """
    from pipelines.embed.quantize import stored_column

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
                chunked = [c for c in CHUNK_COLUMNS if c in rows.column_names]
                table = pa.table({id_column: rows.column("id"),
                                  **{c: rows.column(c) for c in chunked},
                                  "embedding": stored_column(rows.column("embedding"),
                                                             vectors),
                                  "text_hash": rows.column("text_hash")})
                write_table(table, f"{output.rstrip('/')}/{name}", fence)
                # the part is complete: record its rows at once, so a kill from here on
                # costs only the batches in flight (`read_part_markers`)
                pairs = pa.table({"key": rows.column("_row_key"), "chunk": rows.column(
                    "chunk").cast(pa.int32()) if "chunk" in rows.column_names
                    else pa.array([0] * rows.num_rows, type=pa.int32())})
                write_table(pairs, f"{part_marker_dir(output, path, index)}/{name}", fence)
            first = part.slice(0, 1).to_pylist()[0]
            docs = (int(pc.sum(rows.column("_last")).as_py() or 0)
                    if "_last" in rows.column_names else rows.num_rows)
            summaries.append({
                "file": path, "chunk": index, "part": name, "written": rows.num_rows,
                "docs": docs,
                "truncated": int(pc.sum(rows.column("truncated")).as_py() or 0),
                "emit": first["_emit"], "rejected": first["_rejected"],
                "rejects_file": first["_rejects_file"], "kept": first["_kept"],
                "prior_docs": first["_prior_docs"], "prior_rows": first["_prior_rows"],
                "prior_parts": first["_prior_parts"],
                "node": first.get(NODE_COLUMN) or "",
            })
    return pa.Table.from_pylist(summaries, schema=SUMMARY_SCHEMA)


SUMMARY_SCHEMA = pa.schema([
    ("file", pa.string()), ("chunk", pa.int64()), ("part", pa.string()),
    ("written", pa.int64()), ("docs", pa.int64()), ("truncated", pa.int64()),
    ("emit", pa.int64()),
    ("rejected", pa.int64()), ("rejects_file", pa.string()), ("kept", pa.int64()),
    ("prior_docs", pa.int64()), ("prior_rows", pa.int64()), ("prior_parts", pa.string()),
    ("node", pa.string()),
])


def copy_kept(batch: dict[str, Any], output: str, id_column: str, drop_ids: list[Any],
              fence: Fence | None = None) -> pa.Table:
    """Incremental pass: copy one previous part minus dropped/changed ids to the output
    (checked against `fence`, the run's lease, first)."""
    path = str(_scalar(batch["path"]))
    table = read_table(path)
    if drop_ids:
        table = table.filter(pc.invert(pc.is_in(table.column(id_column),
                                                pa.array(drop_ids, table.schema.field(
                                                    id_column).type))))
    name = f"part-kept-{file_key(path)}.parquet"
    write_table(table, f"{output.rstrip('/')}/{name}", fence)
    # a chunked output holds several rows (chunks) per document
    docs = len(pc.unique(table.column(id_column))) if "chunk" in table.column_names \
        else table.num_rows
    return pa.table({"source": [path], "part": [name], "rows": [docs],
                     "chunks": [table.num_rows]})


def _scalar(value: Any) -> Any:
    """Ray hands batch_size=1 batches as length-1 arrays; unwrap to a Python value."""
    item = value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value
    if isinstance(item, (list, tuple)):
        return tuple(item)
    return item.tolist() if hasattr(item, "tolist") else item


def first_texts(chunks: list[Chunk], cfg: dict[str, Any], n: int) -> list[str]:
    """The first `n` valid texts of the input in plan order (title joined as it is
    embedded), read in one Ray task, for the int8 calibration every actor shares."""
    import ray

    from bge_core.storage import storage_runtime_env

    def read(chunks: list[Chunk]) -> list[str]:
        out: list[str] = []
        for chunk in chunks:
            out += [t for t in read_valid(chunk, cfg)[1] if t and t.strip()]
            if len(out) >= n:
                break
        return out[:n]

    task = ray.remote(num_cpus=0.25)(read).options(**storage_runtime_env())
    return ray.get(task.remote(chunks))
