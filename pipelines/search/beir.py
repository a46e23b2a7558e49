"""A BEIR corpus as a Ray dataset: read and checked by Ray tasks, never on the driver.

`read_corpus` gives rows ``_id``, ``title``, ``text`` (each document checked by
`bge_core.records.check_beir_doc`; a duplicate ``_id`` is found by
`pipelines.common.duplicates`).
`judged_documents` returns which of the qrels' documents the corpus holds (O(qrels)).
`document_texts` and `chunk_texts` turn it into the ``row`` (the document id) and ``text``
rows that `pipelines.search.exact` encodes and searches.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray

from bge_core.beir import doc_fields
from bge_core.chunking import ChunkSpec, split_texts
from bge_core.errors import InputError
from bge_core.records import RecordError, check_beir_doc, located
from bge_core.texts import join_title
from pipelines.common.duplicates import later_copies
from pipelines.common.encode import tokenizer_for
from pipelines.search.records import read_checked_dataset

DOC_SCHEMA = pa.schema([("_id", pa.string()), ("title", pa.string()), ("text", pa.string()),
                        ("line", pa.int64()), ("key", pa.int64())])


def _doc_row(key: int, line: int, doc: dict[str, Any]) -> dict[str, Any]:
    doc_id, title, text = doc_fields(doc)
    return {"_id": doc_id, "title": title, "text": text, "line": line, "key": key}


def read_corpus(path: str) -> tuple[ray.data.Dataset, int]:
    """The corpus (materialised in the object store) and its size; a duplicate id raises
    `RecordError` naming the line of the first later copy in file order (the rule of
    `pipelines.common.duplicates`; only duplicates reach the driver)."""
    corpus = read_checked_dataset(path, check_beir_doc, _doc_row, DOC_SCHEMA, "BEIR corpus")
    size = corpus.count()
    if not size:
        raise InputError(f"{path}: the corpus is empty")
    dups = later_copies(corpus.select_columns(["_id", "line", "key"]), on="_id", order="key")
    if dups.num_rows:
        first = dups.slice(0, 1).to_pylist()[0]
        raise RecordError(located(path, first["line"], f"duplicate _id {first['_id']!r}"))
    return corpus.drop_columns(["line", "key"]), size


def judged_documents(corpus: ray.data.Dataset, judged: set[str]) -> set[str]:
    """The ids in `judged` that `corpus` holds (tasks filter; only those ids come back)."""
    wanted = pa.array(sorted(judged), pa.string())
    found = corpus.select_columns(["_id"]).map_batches(
        lambda t: t.filter(pc.is_in(t["_id"], value_set=wanted)), batch_format="pyarrow")
    return {row["_id"] for row in found.take_all()}


def _texts(batch: pa.Table) -> pa.Table:
    texts = [join_title(t, b) for t, b in zip(batch["title"].to_pylist(),
                                               batch["text"].to_pylist())]
    return pa.table({"row": batch["_id"], "text": pa.array(texts, pa.string())})


def document_texts(corpus: ray.data.Dataset) -> ray.data.Dataset:
    """``row`` = document id, ``text`` = ``title + " " + text`` (as `embed_corpus.py`)."""
    return corpus.map_batches(_texts, batch_format="pyarrow")


def _chunks(batch: pa.Table, model: str, spec: ChunkSpec) -> pa.Table:
    tokenizer = tokenizer_for(model).tokenizer
    titles, bodies = batch["title"].to_pylist(), batch["text"].to_pylist()
    ids, texts, counts = [], [], []
    for doc_id, title, body, spans in zip(batch["_id"].to_pylist(), titles, bodies,
                                          split_texts(tokenizer, bodies, spec)):
        ids += [doc_id] * len(spans)
        texts += [join_title(title, body[s:e]) for s, e in spans]
        counts += [len(spans)] * len(spans)
    return pa.table({"row": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string()),
                     "chunks": pa.array(counts, pa.int64())})


def chunk_texts(corpus: ray.data.Dataset, model: str,
                spec: ChunkSpec) -> tuple[ray.data.Dataset, int, int]:
    """Each document's token windows (title prefixed, as the embed job writes them) with
    ``row`` = its document id, materialised; the number of chunks and the most of one
    document."""
    chunks = corpus.map_batches(_chunks, batch_format="pyarrow",
                                fn_kwargs={"model": model, "spec": spec}).materialize()
    return chunks.select_columns(["row", "text"]), chunks.count(), int(chunks.max("chunks"))
