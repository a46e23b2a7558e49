"""Ray stages of hard-negative mining: no corpus text and no mined list on the driver.

Training examples and the candidate pool are read by Ray tasks (`pipelines.search.records`).
The corpus is deduplicated on the text (first copy kept: `pipelines.common.duplicates`) and
numbered 0..n-1 in first-seen order, as `bge_core.mining.distinct_texts` orders it in
process, so passage ids stand for texts exactly. The driver then holds only ids: each
query's top ids (from `pipelines.search.exact`), each example's banned ids (its positives
and query found in the corpus by a join on the text) and the mined ids; a join on the id
resolves the mined negatives' texts, a second map-reduce on the example rebuilds each
record in contiguous ranges of examples, and tasks write the JSONL in order. The joins
are `pipelines.common.duplicates.by_key` map-reduces on Ray tasks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from bge_core.errors import InputError
from bge_core.records import check_candidate, check_training_example
from pipelines.common.duplicates import blocks, by_key, first_copies, identity, split_by_range
from pipelines.search.records import number_rows, read_checked_dataset, write_lines

SLOT_BITS = 20  # default pool: key of example i's passage j = i << SLOT_BITS | j
EXAMPLE_SCHEMA = pa.schema([("key", pa.int64()), ("text", pa.string()),
                            ("pos", pa.list_(pa.string())), ("neg", pa.list_(pa.string())),
                            ("record", pa.string())])
CANDIDATE_SCHEMA = pa.schema([("key", pa.int64()), ("text", pa.string())])
PIECE_SCHEMA = pa.schema([("example", pa.int64()), ("slot", pa.int64()), ("text", pa.string())])


def _example_row(key: int, line: int, obj: dict[str, Any]) -> dict[str, Any]:
    return {"key": key, "text": obj["query"], "pos": list(obj["pos"]),
            "neg": list(obj.get("neg") or []), "record": json.dumps(obj, ensure_ascii=False)}


def examples_dataset(path: str) -> tuple[ray.data.Dataset, int]:
    """Training examples (``row`` = 0..n-1 in file order, ``text`` = the query, ``pos``,
    ``neg``, ``record`` = the example as JSON) and their count."""
    ds = read_checked_dataset(path, check_training_example, _example_row, EXAMPLE_SCHEMA,
                              "training data")
    ds = number_rows(ds, "row", by="key").drop_columns(["key"])
    count = ds.count()
    if not count:
        raise InputError(f"{path}: no training examples")
    return ds, count


def pool_dataset(path: str) -> ray.data.Dataset:
    """Candidate-pool texts with their place in the files (``key``, file order)."""
    return read_checked_dataset(path, check_candidate,
                                lambda key, line, obj: {"key": key, "text": obj["text"]},
                                CANDIDATE_SCHEMA, "candidate pool")


def _passages(batch: pa.Table) -> pa.Table:
    keys, texts = [], []
    for row, pos, neg in zip(batch["row"].to_pylist(), batch["pos"].to_pylist(),
                             batch["neg"].to_pylist()):
        passages = [*pos, *neg]
        if len(passages) >= 1 << SLOT_BITS:
            raise InputError(f"example {row} has {len(passages)} passages: at most "
                             f"{(1 << SLOT_BITS) - 1} can form the default pool")
        keys += [(row << SLOT_BITS) + j for j in range(len(passages))]
        texts += passages
    return pa.table({"key": pa.array(keys, pa.int64()), "text": pa.array(texts, pa.string())})


def corpus_dataset(examples: ray.data.Dataset,
                   pool: ray.data.Dataset | None) -> tuple[ray.data.Dataset, int]:
    """The mining corpus: distinct texts of the pool (else of every pos and neg), numbered
    in first-seen order (``row``), materialised in the object store; and its size."""
    source = pool if pool is not None else examples.map_batches(
        _passages, batch_format="pyarrow").materialize()
    unique = first_copies(source, on="text", order="key")
    corpus = number_rows(unique.sort("key"), "row").select_columns(["row", "text"]).materialize()
    size = corpus.count()
    if not size:
        raise InputError("the corpus is empty: no candidate texts")
    return corpus, size


def _query_and_positives(batch: pa.Table) -> pa.Table:
    examples, texts = [], []
    for row, query, pos in zip(batch["row"].to_pylist(), batch["text"].to_pylist(),
                               batch["pos"].to_pylist()):
        examples += [row] * (len(pos) + 1)
        texts += [query, *pos]
    return pa.table({"example": pa.array(examples, pa.int64()),
                     "text": pa.array(texts, pa.string())})


def _sides(table: pa.Table, left: str, right: str) -> tuple[pa.Table, pa.Table]:
    """A partition's rows from the two kinds of source (each leaves the other's own
    column null), split back apart."""
    return table.filter(pc.is_valid(table[left])), table.filter(pc.is_valid(table[right]))


def _banned_pairs(table: pa.Table) -> pa.Table:
    """Texts of queries and positives, and corpus texts → (example, row) where equal."""
    texts, corpus = _sides(table, "example", "row")
    return texts.select(["example", "text"]).join(
        corpus.select(["row", "text"]), "text").select(["example", "row"])


def banned_ids(examples: ray.data.Dataset, corpus: ray.data.Dataset,
               count: int) -> list[set[int]]:
    """Per example, the corpus ids of its query and positives (a join on the text)."""
    texts, rows = blocks(examples.map_batches(_query_and_positives, batch_format="pyarrow"))
    corpus_sources, size = blocks(corpus)
    banned: list[set[int]] = [set() for _ in range(count)]
    for ref in by_key([*texts, *corpus_sources], "text", _banned_pairs, rows + size):
        pairs = ray.get(ref)
        for example, row in zip(pairs["example"].to_pylist(), pairs["row"].to_pylist()):
            banned[example].add(row)
    return banned


def _picked_texts(table: pa.Table) -> pa.Table:
    """Mined picks (example, slot, row) and corpus rows (row, text) → picks with texts."""
    picks, corpus = _sides(table, "slot", "text")
    return picks.select(["example", "slot", "row"]).join(
        corpus.select(["row", "text"]), "row").select(["example", "slot", "text"])


def _records(batch: pa.Table) -> pa.Table:
    return pa.table({"example": batch["row"],
                     "slot": pa.array(np.full(batch.num_rows, -1, dtype=np.int64)),
                     "text": batch["record"]}, schema=PIECE_SCHEMA)


def _assemble(pieces: pa.Table) -> pa.Table:
    """Examples' pieces (each record at slot -1, its negatives' texts at slots 0..) → one
    output line per example, in example order, ``neg`` replaced and every other field
    kept in place."""
    pieces = pieces.sort_by([("example", "ascending"), ("slot", "ascending")])
    lines: list[str] = []
    record: dict[str, Any] | None = None
    for slot, text in zip(pieces["slot"].to_pylist(), pieces["text"].to_pylist()):
        if slot < 0:  # a record opens its example (slots sort after it)
            if record is not None:
                lines.append(json.dumps(record, ensure_ascii=False))
            record = {**json.loads(text), "neg": []}
        else:
            assert record is not None
            record["neg"].append(text)
    if record is not None:
        lines.append(json.dumps(record, ensure_ascii=False))
    return pa.table({"line": pa.array(lines, pa.string())})


def write_mined(examples: ray.data.Dataset, corpus: ray.data.Dataset,
                mined: Sequence[Sequence[int]], uri: str, block_rows: int = 65536) -> None:
    """Write each example with ``neg`` = the texts of its mined ids (in order) to `uri`.

    Two map-reduces on Ray tasks (`pipelines.common.duplicates.by_key`): picks meet the
    corpus rows they name (by id), then every example's record meets its picks' texts (by
    example, in contiguous ranges of examples, so the parts come out in file order)."""
    example = np.repeat(np.arange(len(mined), dtype=np.int64), [len(m) for m in mined])
    slot = np.concatenate([np.arange(len(m), dtype=np.int64) for m in mined])
    ids = np.fromiter((i for m in mined for i in m), dtype=np.int64, count=len(example))
    table = pa.table({"example": example, "slot": slot, "row": ids})
    picks = [(identity, ray.put(table.slice(i, block_rows)))
             for i in range(0, max(len(table), 1), block_rows)]
    corpus_sources, size = blocks(corpus)
    texts = by_key([*picks, *corpus_sources], "row", _picked_texts, len(table) + size)
    records, count = blocks(examples.map_batches(_records, batch_format="pyarrow"))
    lines = by_key([*records, *[(identity, ref) for ref in texts]], "example", _assemble,
                   count + len(table), split=split_by_range(count))
    write_lines(lines, uri)
