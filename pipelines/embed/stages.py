"""Ray Data stage functions of the bulk embedding job (module-level, so Ray can ship them).

Main pass: `read_for_encoding` → `encode_dataset` → `write_encoded` (one summary per part).
With chunking on, `read_for_encoding` emits one row per token window (`_chunk_rows`).
The rows carry their accounting in one column (`pipelines.embed.accounting`).
"""

from __future__ import annotations

from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from bge_core.chunking import ChunkSpec
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
from pipelines.common.encode_options import ChunkOptions
from pipelines.common.lease import Fence
from pipelines.embed.accounting import (
    ACCOUNT,
    ChunkAccount,
    PartSummary,
    read_account,
    summary_table,
)
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


def read_for_encoding(batch: dict[str, Any], cfg: dict[str, Any], losers: frozenset[int],
                      to_encode: frozenset[int] | None, fence: Fence | None = None) -> pa.Table:
    """Main pass: read one chunk, write its rejects, emit the rows to encode.

    Every file it writes is checked against `fence` (the run's lease) first.

    Rows not in `to_encode` (incremental runs) are kept from the previous output and not
    emitted; rows an earlier attempt already wrote (its part markers) are not emitted
    again. A chunk with nothing to encode emits one marker row, so the driver still hears
    that it finished. Every row carries its chunk's account (`accounting.ACCOUNT`).
    """
    chunk = Chunk(**{k: _scalar(v) for k, v in batch.items()})
    values, texts, reasons, keys = read_valid(chunk, cfg)
    reasons = [DUPLICATE if r is None and k in losers else r for r, k in zip(reasons, keys)]
    ids = values[cfg["id_column"]]
    bad = [i for i, r in enumerate(reasons) if r is not None]
    account = ChunkAccount(file=chunk.path, chunk=chunk.index, rejected=len(bad))
    if bad:
        account.rejects_file = f"{file_key(chunk.path)}-c{chunk.index}.parquet"
        write_table(reject_table([ids[i] for i in bad], chunk.path,
                                 [keys[i] & ROW_MASK for i in bad], [reasons[i] for i in bad]),
                    f"{cfg['output'].rstrip('/')}/_rejects/{account.rejects_file}", fence)
    wanted = [i for i, r in enumerate(reasons)
              if r is None and (to_encode is None or keys[i] in to_encode)]
    account.kept = len(texts) - len(bad) - len(wanted)
    done, account.prior_parts = read_part_markers(cfg["output"], chunk)
    spec = chunk_spec(cfg)
    if spec is not None:
        return _chunk_rows(spec, cfg, values, texts, keys, wanted, account, done)
    todo = [i for i in wanted if (keys[i], 0) not in done]
    account.prior_docs = account.prior_rows = len(wanted) - len(todo)
    account.emit = len(todo)
    if not todo:
        return _marker_row(account, chunked=False)
    return pa.table({
        "id": id_array([ids[i] for i in todo]),
        "text": pa.array([texts[i] for i in todo], type=pa.string()),
        "text_hash": pa.array([text_hash(texts[i]) for i in todo], type=pa.string()),
        ACCOUNT: account.column([keys[i] for i in todo], [True] * len(todo)),
    })


def chunk_spec(cfg: dict[str, Any]) -> ChunkSpec | None:
    """The token windows of a stage dict's chunking settings (`ChunkOptions`), or None."""
    return ChunkOptions(**cfg["chunking"]).spec() if cfg.get("chunking") else None


def _chunk_rows(spec: ChunkSpec, cfg: dict[str, Any], values: dict[str, list[Any]],
                texts: list[str | None], keys: list[int], wanted: list[int],
                account: ChunkAccount, done: set[tuple[int, int]]) -> pa.Table:
    """Chunking: one row per token window of each wanted text (`bge_core.chunking`).

    The window is cut from the text column alone (offsets index that string); the title,
    when there is one, prefixes every chunk: ``title + " " + text[start_char:end_char]``.
    Windows an earlier attempt wrote (`done`) are skipped; `account.emit` counts window
    rows (the write stage's completion check). With nothing to emit, one marker row.
    """
    from bge_core.chunking import split_texts
    from bge_core.texts import join_title
    from pipelines.common.encode import tokenizer_for

    bodies = [values[cfg["text_column"]][i] for i in wanted]
    title_column = cfg.get("title_column")
    titles = [values[title_column][i] for i in wanted] if title_column else [None] * len(wanted)
    spans = split_texts(tokenizer_for(cfg["encode"]["model"]).tokenizer, bodies, spec)
    out: dict[str, list[Any]] = {k: [] for k in ("id", "text", "text_hash", "key", "chunk",
                                                  "start_char", "end_char", "last")}
    ids = values[cfg["id_column"]]
    for i, body, title, doc_spans in zip(wanted, bodies, titles, spans):
        todo = [k for k in range(len(doc_spans)) if (keys[i], k) not in done]
        account.prior_rows += len(doc_spans) - len(todo)
        account.prior_docs += not todo
        for k in todo:
            start, end = doc_spans[k]
            out["id"].append(ids[i])
            out["text"].append(join_title(title, body[start:end]))
            out["text_hash"].append(text_hash(texts[i] or ""))
            out["key"].append(keys[i])
            out["chunk"].append(k)
            out["start_char"].append(start)
            out["end_char"].append(end)
            out["last"].append(k == todo[-1])  # one per text: counts texts finished
    account.emit = len(out["id"])
    if not account.emit:
        return _marker_row(account, chunked=True)
    return pa.table({
        "id": id_array(out["id"]), "text": pa.array(out["text"], type=pa.string()),
        "text_hash": pa.array(out["text_hash"], type=pa.string()),
        **_window_columns(out["chunk"], out["start_char"], out["end_char"]),
        ACCOUNT: account.column(out["key"], out["last"]),
    })


def _window_columns(chunk: list[int], start: list[int], end: list[int]) -> dict[str, pa.Array]:
    return {"chunk": pa.array(chunk, type=pa.int32()),
            "start_char": pa.array(start, type=pa.int64()),
            "end_char": pa.array(end, type=pa.int64())}


def _marker_row(account: ChunkAccount, chunked: bool) -> pa.Table:
    """The one row of a chunk with nothing to encode: same columns, never written."""
    account.marker = True
    return pa.table({
        "id": id_array([None]), "text": pa.array([""], type=pa.string()),
        "text_hash": pa.array([""], type=pa.string()),
        **(_window_columns([0], [0], [0]) if chunked else {}),
        ACCOUNT: account.column([-1], [True]),
    })


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
    """Write each input chunk's encoded rows to a part file; return one summary row per
    part (`accounting.SUMMARY_SCHEMA`).

    `vectors`: the stored form (`pipelines.embed.quantize.vector_spec`; None: as encoded).
    Each part and its marker are checked against `fence` (the run's lease) first.
    """
    account = read_account(batch)
    summaries: list[PartSummary] = []
    for path in pc.unique(account.column("file")).to_pylist():
        in_file = pc.equal(account.column("file"), path)
        for index in pc.unique(account.filter(in_file).column("chunk")).to_pylist():
            mask = pc.and_(in_file, pc.equal(account.column("chunk"), index))
            summaries.append(_write_part(batch.filter(mask), account.filter(mask), output,
                                         id_column, vectors, fence))
    return summary_table(summaries)


def _write_part(part: pa.Table, account: pa.Table, output: str, id_column: str,
                vectors: dict[str, Any] | None, fence: Fence | None) -> PartSummary:
    """Write one input chunk's rows of a batch (none if only its marker row) and the part
    marker that vouches for them; summarise them for the driver."""
    from pipelines.embed.quantize import stored_column

    chunk = ChunkAccount.from_row(account.slice(0, 1).to_pylist()[0])
    real = pc.invert(account.column("marker"))
    rows, keys = part.filter(real), account.filter(real)
    name = ""
    if rows.num_rows:
        # Named by content (first row key, row count): a retried write overwrites.
        first_key = pc.min(keys.column("key")).as_py()
        name = f"part-{file_key(chunk.file)}-c{chunk.chunk}-{first_key}-{rows.num_rows}.parquet"
        chunked = [c for c in CHUNK_COLUMNS if c in rows.column_names]
        table = pa.table({id_column: rows.column("id"),
                          **{c: rows.column(c) for c in chunked},
                          "embedding": stored_column(rows.column("embedding"), vectors),
                          "text_hash": rows.column("text_hash")})
        write_table(table, f"{output.rstrip('/')}/{name}", fence)
        # the part is complete: record its rows at once, so a kill from here on
        # costs only the batches in flight (`read_part_markers`)
        pairs = pa.table({"key": keys.column("key"), "chunk": rows.column(
            "chunk").cast(pa.int32()) if "chunk" in rows.column_names
            else pa.array([0] * rows.num_rows, type=pa.int32())})
        write_table(pairs, f"{part_marker_dir(output, chunk.file, chunk.chunk)}/{name}",
                    fence)
    node = part.column(NODE_COLUMN)[0].as_py() if NODE_COLUMN in part.column_names else None
    return PartSummary(part=name, written=rows.num_rows,
                       docs=int(pc.sum(keys.column("last")).as_py() or 0),
                       truncated=int(pc.sum(rows.column("truncated")).as_py() or 0),
                       node=node or "", account=chunk)


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
