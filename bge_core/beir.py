"""BEIR-layout datasets: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``.

Corpus rows are ``{"_id", "title", "text"}`` and become ``title + " " + text``
(`bge_core.texts.join_title`); queries are ``{"_id", "text"}``; qrels are tab-separated
``query-id  corpus-id  score`` with a header line. Only queries that appear in the split's
qrels are evaluated, as in BEIR.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from bge_core.errors import InputError
from bge_core.io import open_text
from bge_core.records import (
    RecordError,
    check_beir_doc,
    check_beir_query,
    located,
    parse_qrel,
    read_checked,
)
from bge_core.texts import join_title


@dataclass(frozen=True)
class BeirData:
    """One split read in this process (small datasets, benchmarks, test references):
    corpus ids, titles and texts (aligned), the split's queries and its qrels. The jobs
    read the corpus as a Ray dataset instead (`pipelines/evaluate.py`)."""

    corpus_ids: list[str]
    corpus_titles: list[str | None]
    corpus_bodies: list[str]  # the text field alone
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]

    @property
    def corpus_texts(self) -> list[str]:
        """``title + " " + text`` per document, as it is embedded."""
        return [join_title(t, b) for t, b in zip(self.corpus_titles, self.corpus_bodies)]


def doc_fields(doc: dict) -> tuple[str, str | None, str]:
    """(id, title or None, text) of a checked corpus document (`check_beir_doc`)."""
    return str(doc["_id"]), doc.get("title") or None, doc["text"]


def read_corpus_fields(path: str) -> tuple[list[str], list[str | None], list[str]]:
    """(ids, titles or None, texts) in file order; a duplicate id is an error."""
    ids, titles, bodies, seen = [], [], [], set()
    for line, doc in read_checked(path, check_beir_doc, "BEIR corpus"):
        doc_id, title, body = doc_fields(doc)
        if doc_id in seen:
            raise RecordError(located(path, line, f"duplicate _id {doc_id!r}"))
        seen.add(doc_id)
        ids.append(doc_id)
        titles.append(title)
        bodies.append(body)
    return ids, titles, bodies


def read_queries(path: str) -> dict[str, str]:
    """``{query id: text}``."""
    return {str(q["_id"]): q["text"] for _, q in read_checked(path, check_beir_query,
                                                               "BEIR queries")}


def read_qrels(path: str) -> dict[str, dict[str, int]]:
    """``{query id: {corpus id: grade}}`` from a TREC-style TSV with a header line."""
    qrels: dict[str, dict[str, int]] = {}
    with open_text(path, what="qrels file") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader, None)  # header: query-id, corpus-id, score
        for line, fields in enumerate(reader, start=2):
            if not fields:
                continue
            parsed = parse_qrel(fields)
            if isinstance(parsed, str):
                raise RecordError(located(path, line, parsed))
            qid, doc_id, grade = parsed
            qrels.setdefault(qid, {})[doc_id] = grade
    return qrels


def check_qrels(qrels: dict[str, dict[str, int]], corpus_ids: set[str],
                query_ids: set[str], source: str) -> None:
    """Raise one message with counts when the qrels name unknown queries or documents."""
    if not qrels:
        raise InputError(f"{source}: the split has no judgements (empty qrels)")
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
        raise InputError(f"{source}: " + "; ".join(problems))


def read_split(directory: str | Path,
               split: str) -> tuple[dict[str, str], dict[str, dict[str, int]]]:
    """The split's judged queries and its qrels, O(queries), read in this process (checked
    against the corpus by `check_qrels`)."""
    root = str(directory).rstrip("/")  # a local folder or any fsspec URI
    qrels = read_qrels(f"{root}/qrels/{split}.tsv")
    queries = read_queries(f"{root}/queries.jsonl")
    return {q: queries[q] for q in qrels if q in queries}, qrels


def load_beir(directory: str | Path, split: str = "test") -> BeirData:
    """Read and cross-check one split of a BEIR-layout folder in this process."""
    root = str(directory).rstrip("/")
    queries, qrels = read_split(root, split)
    corpus_ids, titles, bodies = read_corpus_fields(f"{root}/corpus.jsonl")
    if not corpus_ids:
        raise InputError(f"{root}/corpus.jsonl: the corpus is empty")
    check_qrels(qrels, set(corpus_ids), set(queries), f"{root}/qrels/{split}.tsv")
    return BeirData(corpus_ids, titles, bodies, queries, qrels)
