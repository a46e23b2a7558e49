"""Small real-data inputs for running every job at its defaults (`bench/defaults_smoke.sh`).

    python bench/defaults_data.py OUT_DIR

Writes, from NFCorpus in ../shared/data (read here, never copied into the repo):
``raw.jsonl`` (200 documents, RetroMAE's corpus), ``train.jsonl`` (64 train queries, so
the recipe's batch of 32 fits; each with its relevant documents as ``pos`` and 7 other
documents as ``neg``: finetuning and mining input) and ``beir/`` (20 test queries, their
relevant documents and the first 800 others: an evaluation set).
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.data import SHARED  # noqa: E402

NF = SHARED / "nfcorpus"


def _qrels(split: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    with open(NF / "qrels" / f"{split}.tsv", encoding="utf-8") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            if int(row["score"]) > 0:
                out[row["query-id"]].append(row["corpus-id"])
    return out


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main(out: Path) -> None:
    docs = {d["_id"]: d for d in _jsonl(NF / "corpus.jsonl")}
    queries = {q["_id"]: q["text"] for q in _jsonl(NF / "queries.jsonl")}

    def text(doc_id: str) -> str:
        return f"{docs[doc_id].get('title', '')} {docs[doc_id]['text']}".strip()

    _write(out / "raw.jsonl", [{"text": text(i)} for i in list(docs)[:200]])
    train = [(q, [d for d in ids if d in docs][:2]) for q, ids in _qrels("train").items()]
    ids = list(docs)
    rows = [{"query": queries[q], "pos": [text(d) for d in pos],  # negatives: 7 unjudged docs
             "neg": [text(d) for d in ids[200 + 7 * n: 207 + 7 * n]]}
            for n, (q, pos) in enumerate(train) if q in queries and pos]
    _write(out / "train.jsonl", rows[:64])
    test = dict(list(_qrels("test").items())[:20])
    keep = list(dict.fromkeys([d for ids in test.values() for d in ids if d in docs]
                              + list(docs)[:800]))
    _write(out / "beir" / "corpus.jsonl", [docs[d] for d in keep])
    _write(out / "beir" / "queries.jsonl", [{"_id": q, "text": queries[q]} for q in test])
    qrels = out / "beir" / "qrels" / "test.tsv"
    qrels.parent.mkdir(parents=True, exist_ok=True)
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t1\n" for q, ids in test.items() for d in ids if d in docs))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
