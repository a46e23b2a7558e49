"""BEIR-layout datasets: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``.

Corpus rows are ``{"_id", "title", "text"}`` and become ``title + " " + text``
(`bge_core.texts.join_title`); queries are ``{"_id", "text"}``; qrels are tab-separated
``query-id  corpus-id  score`` with a header line. Only queries that appear in the split's
qrels are evaluated, as in BEIR.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bge_core.jsonl import iter_jsonl, open_text
from bge_core.texts import join_title


@dataclass(frozen=True)
class BeirData:
    """One split: corpus ids and texts (aligned), the split's queries and its qrels."""

    corpus_ids: list[str]
    corpus_texts: list[str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    corpus_titles: list[str | None] = field(default_factory=list)  # aligned with the ids
    corpus_bodies: list[str] = field(default_factory=list)  # the text field alone


def _jsonl(path: str) -> Iterator[tuple[int, dict]]:
    with open_text(path, what="BEIR file") as handle:
        for row, item in iter_jsonl(handle, str(path)):
            if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                raise ValueError(f"{path} row {row}: needs a string 'text'")
            if "_id" not in item:
                raise ValueError(f"{path} row {row}: needs an '_id'")
            yield row, item


def read_corpus(path: str) -> tuple[list[str], list[str]]:
    """(ids, ``title + " " + text``) in file order; a duplicate id is an error."""
    ids, titles, bodies = read_corpus_fields(path)
    return ids, [join_title(t, b) for t, b in zip(titles, bodies)]


def read_corpus_fields(path: str) -> tuple[list[str], list[str | None], list[str]]:
    """(ids, titles or None, texts) in file order; a duplicate id is an error."""
    ids, titles, bodies, seen = [], [], [], set()
    for row, item in _jsonl(path):
        doc_id = str(item["_id"])
        if doc_id in seen:
            raise ValueError(f"{path} row {row}: duplicate _id {doc_id!r}")
        seen.add(doc_id)
        ids.append(doc_id)
        titles.append(item.get("title") or None)
        bodies.append(item["text"])
    return ids, titles, bodies


def read_queries(path: str) -> dict[str, str]:
    """``{query id: text}``."""
    return {str(item["_id"]): item["text"] for _, item in _jsonl(path)}


def read_qrels(path: str) -> dict[str, dict[str, int]]:
    """``{query id: {corpus id: grade}}`` from a TREC-style TSV with a header line."""
    qrels: dict[str, dict[str, int]] = {}
    with open_text(path, what="qrels file") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader, None)  # header: query-id, corpus-id, score
        for row, fields in enumerate(reader, start=2):
            if not fields:
                continue
            try:
                qid, doc_id, grade = fields[0], fields[1], int(float(fields[2]))
            except (IndexError, ValueError):
                raise ValueError(f"{path} row {row}: expected 'query-id<TAB>corpus-id<TAB>"
                                 f"score', got {fields!r}") from None
            qrels.setdefault(qid, {})[doc_id] = grade
    return qrels


def check_qrels(qrels: dict[str, dict[str, int]], corpus_ids: set[str],
                query_ids: set[str], source: str) -> None:
    """Raise one message with counts when the qrels name unknown queries or documents."""
    if not qrels:
        raise ValueError(f"{source}: the split has no judgements (empty qrels)")
    pairs = [(q, d) for q, docs in qrels.items() for d in docs]
    bad_docs = sorted({d for _, d in pairs if d not in corpus_ids})
    bad_queries = sorted(q for q in qrels if q not in query_ids)
    problems = []
    if bad_docs:
        rows = sum(d not in corpus_ids for _, d in pairs)
        problems.append(f"{rows} of {len(pairs)} judgements name {len(bad_docs)} corpus ids "
                        f"missing from corpus.jsonl (e.g. {bad_docs[:3]})")
    if bad_queries:
        problems.append(f"{len(bad_queries)} of {len(qrels)} query ids are missing from "
                        f"queries.jsonl (e.g. {bad_queries[:3]})")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))


def load_beir(directory: str | Path, split: str = "test") -> BeirData:
    """Read and cross-check one split of a BEIR-layout folder."""
    root = str(directory).rstrip("/")  # a local folder or any fsspec URI
    qrels_path = f"{root}/qrels/{split}.tsv"
    qrels = read_qrels(qrels_path)
    corpus_ids, titles, bodies = read_corpus_fields(f"{root}/corpus.jsonl")
    corpus_texts = [join_title(t, b) for t, b in zip(titles, bodies)]
    if not corpus_ids:
        raise ValueError(f"{root}/corpus.jsonl: the corpus is empty")
    all_queries = read_queries(f"{root}/queries.jsonl")
    check_qrels(qrels, set(corpus_ids), set(all_queries), qrels_path)
    queries = {q: all_queries[q] for q in qrels}
    return BeirData(corpus_ids, corpus_texts, queries, qrels, titles, bodies)
