"""Readers for the reference data in ../shared/data (benchmarks only; never copied here)."""

from __future__ import annotations

import json
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def nfcorpus_passages(limit: int | None = None, data: Path = SHARED) -> list[str]:
    """NFCorpus documents as ``title + " " + text``, in file order."""
    out = []
    with open(data / "nfcorpus" / "corpus.jsonl", encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)
            out.append(f"{doc.get('title', '')} {doc['text']}".strip())
            if limit and len(out) >= limit:
                break
    return out


def stsb_test(data: Path = SHARED, split: str = "test") -> tuple[list[str], list[str], list[float]]:
    """STS-B `split` (``test`` or ``dev``): first sentences, second sentences, gold scores."""
    from pipelines.search.evaluate import read_sts

    left, right, gold = read_sts(str(data / "stsb" / f"sts-{split}.csv"))
    return left, right, list(gold)
