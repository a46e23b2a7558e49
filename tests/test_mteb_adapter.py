"""The mteb adapter: mteb's encoder protocol, offline, on mteb's own local mock tasks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

# mteb is imported inside the tests: at module level it cost every pytest worker ~2 s of
# collection, the workers that never run these tests included.

INSTRUCTION = "query: "


class RecordingEncoder:
    """Wraps a `MtebEncoder`'s `Encoder`, recording every list of texts it embeds."""

    def __init__(self, encoder) -> None:
        self.inner = encoder
        self.calls: list[list[str]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, texts, batch_size=None, max_length=None):
        self.calls.append(list(texts))
        return self.inner.encode(texts, batch_size, max_length)


@pytest.fixture(scope="module")
def adapter(tiny_bert_dir: Path):
    from bge_core.mteb_adapter import MtebEncoder

    model = MtebEncoder.from_pretrained(str(tiny_bert_dir), device="cpu",
                                        query_instruction=INSTRUCTION)
    model.encoder = RecordingEncoder(model.encoder)
    return model


def _evaluate(model, task) -> dict:
    import mteb

    result = mteb.evaluate(model, task, cache=None, show_progress_bar=False)
    return result.task_results[0].scores["test"][0]


def test_adapter_satisfies_the_encoder_protocol(adapter) -> None:
    from mteb.models.models_protocols import EncoderProtocol

    assert isinstance(adapter, EncoderProtocol)
    meta = adapter.mteb_model_meta
    assert meta.embed_dim == 32 and meta.name.startswith("bge-ray/")


def test_retrieval_instructs_queries_only_and_joins_titles(adapter) -> None:
    from mteb.mocks import mock_tasks

    from bge_core.metrics import evaluate_run

    adapter.encoder.calls.clear()
    task = mock_tasks.MockRetrievalTask()
    scores = _evaluate(adapter, task)
    encoded = [t for call in adapter.encoder.calls for t in call]
    from mteb.mocks.mock_tasks.retrieval import base_retrieval_datasplit

    split = base_retrieval_datasplit()  # the data MockRetrievalTask evaluates on (unloaded after)
    queries = [INSTRUCTION + q["text"] for q in split["queries"]]
    docs = [d["title"] + " " + d["text"] for d in split["corpus"]]
    assert set(encoded) == set(queries) | set(docs)

    # mteb's nDCG@10 equals ours on the same embeddings (in-process encoder, full matrix).
    inner = adapter.encoder.inner
    sims = inner.encode(queries) @ inner.encode(docs).T  # (Q, N), both normalised
    run = {q["id"]: {d["id"]: float(sims[i, j]) for j, d in enumerate(split["corpus"])}
           for i, q in enumerate(split["queries"])}
    means, _ = evaluate_run(run, split["relevant_docs"], [10])
    assert scores["ndcg_at_10"] == pytest.approx(means["ndcg@10"], abs=1e-5)


def test_sts_gets_no_instruction(adapter) -> None:
    from mteb.mocks import mock_tasks

    adapter.encoder.calls.clear()
    task = mock_tasks.MockSTSTask()
    scores = _evaluate(adapter, task)
    encoded = [t for call in adapter.encoder.calls for t in call]
    assert encoded and not any(t.startswith(INSTRUCTION) for t in encoded)
    assert np.isfinite(scores["main_score"])


def test_similarity_is_cosine(adapter) -> None:
    a = np.array([[3.0, 4.0], [1.0, 0.0]], dtype=np.float32)
    b = np.array([[6.0, 8.0], [0.0, 2.0]], dtype=np.float32)
    np.testing.assert_allclose(adapter.similarity(a, b).numpy(), [[1.0, 0.8], [0.6, 0.0]],
                               atol=1e-6)
    np.testing.assert_allclose(adapter.similarity_pairwise(a, b).numpy(), [1.0, 0.0], atol=1e-6)


def test_cli_needs_a_benchmark_or_tasks(capsys: pytest.CaptureFixture) -> None:
    from bge_core.mteb_adapter import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "m"])
    assert exit_info.value.code == 2
    assert "--benchmark or --tasks" in capsys.readouterr().err
