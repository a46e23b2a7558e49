"""BEIR loading checks, and the Ray evaluation job against an in-process reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bge_core.beir import load_beir
from bge_core.metrics import evaluate_run, spearman
from tests.driver_spy import spy_on_driver
from tests.tiny_models import WORDS

K_VALUES = "1,3,10"
MARKER = "corpusonly"  # in every document, in no query: what reaches the driver is scanned


def _sentence(rng: np.random.Generator, n: int = 8) -> str:
    return " ".join(rng.choice(WORDS, size=n))


def write_beir(root: Path, n_docs: int = 40, n_queries: int = 6, seed: int = 0,
               words: int = 8) -> Path:
    """A tiny BEIR folder: titled and untitled docs, graded qrels (0 = judged not relevant)."""
    rng = np.random.default_rng(seed)
    (root / "qrels").mkdir(parents=True)
    with (root / "corpus.jsonl").open("w") as f:
        for i in range(n_docs):
            title = _sentence(rng, 2) if i % 2 else ""
            text = f"{_sentence(rng, words)} {MARKER}"
            f.write(json.dumps({"_id": f"d{i}", "title": title, "text": text}) + "\n")
    with (root / "queries.jsonl").open("w") as f:
        for q in range(n_queries + 2):  # two queries have no judgements in the split
            f.write(json.dumps({"_id": f"q{q}", "text": _sentence(rng, 4)}) + "\n")
    lines = ["query-id\tcorpus-id\tscore"]
    for q in range(n_queries):
        for d in rng.choice(n_docs, size=4, replace=False):
            lines.append(f"q{q}\td{d}\t{int(rng.integers(0, 3))}")
    (root / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return root


def test_load_beir_joins_titles_and_keeps_judged_queries(tmp_path: Path) -> None:
    data = load_beir(write_beir(tmp_path / "beir"), "test")
    assert len(data.corpus_ids) == 40 and set(data.queries) == set(data.qrels)
    assert len(data.queries) == 6
    first = json.loads((tmp_path / "beir" / "corpus.jsonl").read_text().splitlines()[1])
    assert data.corpus_texts[1] == first["title"] + " " + first["text"]


def test_missing_ids_and_empty_split_are_clear_errors(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "beir")
    qrels = root / "qrels" / "test.tsv"
    qrels.write_text(qrels.read_text() + "q0\tnope\t1\nq0\tnope2\t1\nghost\td1\t1\n")
    with pytest.raises(ValueError) as err:
        load_beir(root, "test")
    message = str(err.value)
    assert "test.tsv" in message
    assert "2 of 27 judgements name 2 corpus ids" in message
    assert "1 of 7 query ids are missing" in message
    (root / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\n")
    with pytest.raises(ValueError, match="empty qrels"):
        load_beir(root, "dev")
    with pytest.raises(FileNotFoundError, match="train.tsv"):
        load_beir(root, "train")


@pytest.mark.timeout(180)
def test_ray_corpus_reader_checks_ids_where_the_corpus_lives(ray_session, tmp_path: Path) -> None:
    from bge_core.records import RecordError
    from pipelines.search.beir import judged_documents, read_corpus

    corpus_file = write_beir(tmp_path / "beir") / "corpus.jsonl"
    corpus, size = read_corpus(str(corpus_file))
    assert size == 40
    assert judged_documents(corpus, {"d1", "d39", "nope"}) == {"d1", "d39"}
    with corpus_file.open("a") as handle:
        handle.write(json.dumps({"_id": "d5", "text": "again"}) + "\n")
    with pytest.raises(RecordError, match=f"{corpus_file} line 41: duplicate _id 'd5'"):
        read_corpus(str(corpus_file))
    with corpus_file.open("a") as handle:
        handle.write(json.dumps({"_id": "d50", "title": 7, "text": "t"}) + "\n")
    with pytest.raises(RecordError, match="line 42: 'title' is int, not a string"):
        read_corpus(str(corpus_file))


def test_cli_rejects_bad_flags(capsys: pytest.CaptureFixture) -> None:
    from pipelines.search.evaluate import main

    assert main(["--model", "m"]) == 2
    assert "exactly one of --beir_dir" in capsys.readouterr().err
    assert main(["--model", "m", "--sts", "x.csv", "--k_values", "1,a"]) == 2
    assert "k_values" in capsys.readouterr().err


def _reference_encoder(model_dir: Path, instruction: str):
    from bge_core.model import Encoder

    return Encoder.from_pretrained(str(model_dir), device="cpu", query_instruction=instruction)


def _assert_metrics_of(scores: np.ndarray, data, qids: list[str], result: dict) -> np.ndarray:
    """The job's metrics equal those of the (Q, N) reference scores' top 10; returns it."""
    top = np.argsort(-scores, axis=1)[:, :10]
    reference = {q: {data.corpus_ids[j]: float(scores[i, j]) for j in top[i]}
                 for i, q in enumerate(qids)}
    expected, _ = evaluate_run(reference, data.qrels, [1, 3, 10])
    for name, value in expected.items():
        assert result["metrics"][name] == pytest.approx(value, abs=1e-6), name
    return top


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_beir_job_on_s3_equals_in_process_reference(ray_session, mean_bert_dir: Path,
                                                    tmp_path: Path, s3, monkeypatch) -> None:
    """Dataset read from and results written to S3 (the moto server on loopback); the corpus
    is read by Ray tasks and none of its text reaches the driver."""
    from pipelines.common.cli import make_config
    from pipelines.search.evaluate import EvaluateConfig, run

    root = write_beir(tmp_path / "beir")
    s3.put(str(root) + "/", "bucket/beir/", recursive=True)
    cfg = make_config(EvaluateConfig,
        model=str(mean_bert_dir), beir_dir="s3://bucket/beir/", k_values=K_VALUES,
        query_instruction_for_retrieval="query: ", output="s3://bucket/out/m.json",
        run_file="s3://bucket/out/run.trec", batch_rows=8, search_shard_rows=16,
        cpus_per_actor=0.5, search_cpus=1.0)
    with spy_on_driver(monkeypatch, MARKER) as spy:
        result = run(cfg)
    assert spy.received > 0 and spy.leaks == []

    # Reference: in-process encoding, the full score matrix, metrics on its top 10.
    data = load_beir(root, "test")
    encoder = _reference_encoder(mean_bert_dir, "query: ")
    qids = list(data.queries)
    scores = encoder.encode_queries([data.queries[q] for q in qids]) @ \
        encoder.encode_corpus(data.corpus_texts).T  # (Q, N) full matrix
    top = _assert_metrics_of(scores, data, qids, result)
    assert result["num_queries"] == 6 and result["query_instruction"] == "query: "
    assert json.loads(s3.cat("bucket/out/m.json"))["metrics"] == result["metrics"]
    lines = s3.cat("bucket/out/run.trec").decode().splitlines()
    assert len(lines) == 6 * 10
    qid, q0, doc, rank, score, _ = lines[0].split()
    assert (qid, q0, rank) == (qids[0], "Q0", "1")
    assert doc == data.corpus_ids[top[0, 0]]
    assert float(score) == pytest.approx(scores[0, top[0, 0]], abs=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_chunked_corpus_scores_a_document_by_its_best_chunk(ray_session, mean_bert_dir: Path,
                                                           tmp_path: Path) -> None:
    from bge_core.chunking import ChunkSpec, split_texts
    from bge_core.texts import join_title
    from pipelines.common.cli import make_config
    from pipelines.search.evaluate import EvaluateConfig, run

    root = write_beir(tmp_path / "beir", words=40)
    result = run(make_config(EvaluateConfig, model=str(mean_bert_dir), beir_dir=str(root),
                             k_values="1,3,10", chunk_tokens=12, chunk_overlap=3,
                             batch_rows=16, search_shard_rows=32, cpus_per_actor=0.5))
    # Reference: every chunk encoded in process, a document's score = its best chunk's.
    data = load_beir(root, "test")
    encoder = _reference_encoder(mean_bert_dir, "")
    spans = split_texts(encoder.tokenizer, data.corpus_bodies, ChunkSpec(12, 3))
    assert max(len(s) for s in spans) > 2
    chunks = [(d, join_title(data.corpus_titles[d], data.corpus_bodies[d][a:b]))
              for d, doc_spans in enumerate(spans) for a, b in doc_spans]
    qids = list(data.queries)
    chunk_scores = encoder.encode_queries([data.queries[q] for q in qids]) @ \
        encoder.encode([t for _, t in chunks]).T  # (Q, chunks)
    owner = np.array([d for d, _ in chunks])
    doc_scores = np.full((len(qids), len(data.corpus_ids)), -np.inf)
    np.maximum.at(doc_scores, (slice(None), owner), chunk_scores)  # best chunk per doc
    _assert_metrics_of(doc_scores, data, qids, result)
    assert result["timings"]["chunks"] == len(chunks) and result["chunk_tokens"] == 12


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sts_mode_equals_in_process_spearman(ray_session, mean_bert_dir: Path,
                                             tmp_path: Path) -> None:
    from pipelines.common.cli import make_config
    from pipelines.search.evaluate import EvaluateConfig, run

    rng = np.random.default_rng(1)
    rows = [f"g\tsrc\t2012\t{i:04d}\t{rng.uniform(0, 5):.3f}\t{_sentence(rng)}\t"
            f"{_sentence(rng)}" for i in range(30)]
    sts = tmp_path / "sts.csv"
    sts.write_text("\n".join(rows) + "\n")
    result = run(make_config(EvaluateConfig, model=str(mean_bert_dir), sts=str(sts), batch_rows=16,
                                cpus_per_actor=0.5))
    encoder = _reference_encoder(mean_bert_dir, "")
    fields = [r.split("\t") for r in rows]
    a = encoder.encode([f[5] for f in fields]).astype(np.float64)
    b = encoder.encode([f[6] for f in fields]).astype(np.float64)
    cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    expected = 100 * spearman(cosine, [float(f[4]) for f in fields])
    assert result["metrics"]["spearman"] == pytest.approx(expected, abs=1e-4)
    assert result["num_pairs"] == 30
