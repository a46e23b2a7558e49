"""`evaluate.py --vectors`: stored vectors of each `--output-dtype` (Parquet and Lance) score
as the model does, and `--index` measures a Lance table's ANN index against exact search,
an incremental run keeping the index up to date."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from bge_core import Encoder
from bge_core.beir import load_beir
from bge_core.quantize_vectors import dequantize, quantize
from pipelines.common.cli import make_config
from pipelines.common.encode import arrow_to_vectors, vectors_to_arrow
from pipelines.embed.main import EmbedConfig
from pipelines.embed.main import run as embed
from pipelines.embed.quantize import describe
from pipelines.search.evaluate import EvaluateConfig
from pipelines.search.evaluate import run as evaluate
from tests.test_evaluate_job import write_beir

pytestmark = [pytest.mark.slow]
RAY = {"cpus_per_actor": 0.5, "batch_rows": 64}  # one part per 64 rows
EPS = 2e-5  # the run file keeps 6 decimals


def _embed(model: Path, beir: Path, out: Path, **extra: Any) -> dict[str, Any]:
    return embed(make_config(EmbedConfig, input=str(beir / "corpus.jsonl"), output=str(out),
                             model=str(model), id_column="_id", title_column="title",
                             **RAY, **extra))


def _evaluate(model: Path, beir: Path, run_file: Path, **extra: Any) -> dict[str, Any]:
    return evaluate(make_config(EvaluateConfig, model=str(model), beir_dir=str(beir),
                                k_values="1,3,10", run_file=str(run_file), **RAY, **extra))


def _read_run(path: Path) -> dict[str, list[tuple[str, float]]]:
    """qid → [(doc, score)] best first, from a TREC run file."""
    run: dict[str, list[tuple[str, float]]] = {}
    for line in path.read_text().splitlines():
        qid, _, doc, _, score, _ = line.split()
        run.setdefault(qid, []).append((doc, float(score)))
    return run


def _stored(folder: Path) -> tuple[list[str], np.ndarray]:
    """Document ids and stored vectors of a Parquet output or Lance table."""
    if (folder / "_versions").exists():
        import lance

        table = lance.dataset(str(folder)).to_table(columns=["_id", "embedding"])
    else:
        table = pq.read_table(folder, columns=["_id", "embedding"])
    return table.column("_id").to_pylist(), arrow_to_vectors(table.column("embedding"))


def _to_float16(source: Path, target: Path) -> None:
    """A float32 Parquet output rewritten as the job stores float16 (parts and manifest)."""
    shutil.copytree(source, target)
    for part in target.glob("part-*.parquet"):
        table = pq.read_table(part)
        vectors = quantize(arrow_to_vectors(table.column("embedding")), "float16")
        pq.write_table(table.set_column(table.schema.get_field_index("embedding"), "embedding",
                                        vectors_to_arrow(vectors)), part)
    manifest = json.loads((target / "_manifest.json").read_text())
    manifest.update(describe({"dtype": "float16"}, vectors.shape[1]))
    (target / "_manifest.json").write_text(json.dumps(manifest))


def _assert_top(job: list[tuple[str, float]], ids: list[str], scores: np.ndarray,
                required: np.ndarray, allowed: np.ndarray, eps: float = EPS) -> None:
    """`job` is a top 10 of `scores` (one query, over all documents) among candidates that
    hold every `required` document and only `allowed` ones: its scores are the documents'
    scores, best first, and no required document scoring above its last one is left out."""
    where = {d: i for i, d in enumerate(ids)}
    rows = [where[d] for d, _ in job]
    assert len(job) == 10 and allowed[rows].all()
    np.testing.assert_allclose([s for _, s in job], scores[rows], atol=eps)
    assert all(a >= b - eps for a, b in zip(scores[rows], scores[rows][1:]))
    missed = required & (scores > scores[rows[-1]] + eps)
    missed[rows] = False
    assert not missed.any(), [ids[i] for i in np.flatnonzero(missed)]


@pytest.mark.timeout(420)
def test_stored_vectors_of_each_dtype_score_as_the_model(ray_session, mean_bert_dir: Path,
                                                         tmp_path: Path) -> None:
    beir = write_beir(tmp_path / "beir", n_docs=40)
    data = load_beir(beir, "test")
    qids = list(data.queries)
    queries = Encoder.from_pretrained(str(mean_bert_dir), device="cpu").encode_queries(
        [data.queries[q] for q in qids])  # (Q, D) float32, in process
    direct = _evaluate(mean_bert_dir, beir, tmp_path / "direct.trec")
    expected = _read_run(tmp_path / "direct.trec")

    # float32, Parquet: the same run as encoding the corpus, to float precision.
    assert _embed(mean_bert_dir, beir, tmp_path / "f32")["output_dtype"] == "float32"
    f32 = _evaluate(mean_bert_dir, beir, tmp_path / "f32.trec", vectors=str(tmp_path / "f32"))
    for name, value in direct["metrics"].items():
        assert f32["metrics"][name] == pytest.approx(value, abs=1e-6), name
    got = _read_run(tmp_path / "f32.trec")
    assert [[d for d, _ in got[q]] for q in qids] == [[d for d, _ in expected[q]] for q in qids]
    assert f32["timings"]["bytes_per_vector"] == 4 * queries.shape[1]

    # float16 (the float32 output converted as the job stores it): exact over float16 vectors.
    _to_float16(tmp_path / "f32", tmp_path / "f16")
    f16 = _evaluate(mean_bert_dir, beir, tmp_path / "f16.trec", vectors=str(tmp_path / "f16"))
    ids, stored = _stored(tmp_path / "f16")
    assert stored.dtype == np.float16 and f16["timings"]["output_dtype"] == "float16"
    everyone = np.ones(len(ids), dtype=bool)
    for i, q in enumerate(qids):
        _assert_top(_read_run(tmp_path / "f16.trec")[q], ids,
                    stored.astype(np.float32) @ queries[i], everyone, everyone, eps=1e-4)
        np.testing.assert_allclose([s for _, s in _read_run(tmp_path / "f16.trec")[q]][:3],
                                   [s for _, s in expected[q]][:3], atol=2e-3)
    for name, value in direct["metrics"].items():
        assert f16["metrics"][name] == pytest.approx(value, abs=0.05), name

    # int8 in a Lance table (a real job run): exact over the dequantized vectors.
    int8 = _embed(mean_bert_dir, beir, tmp_path / "i8.lance", format="lance", output_dtype="int8")
    i8 = _evaluate(mean_bert_dir, beir, tmp_path / "i8.trec", vectors=str(tmp_path / "i8.lance"))
    ids, stored = _stored(tmp_path / "i8.lance")
    approx = dequantize(stored, "int8", np.asarray(int8["int8_ranges"], np.float32))
    assert stored.dtype == np.int8 and i8["timings"]["bytes_per_vector"] == queries.shape[1]
    assert all(0.0 <= v <= 1.0 for v in i8["metrics"].values())
    for i, q in enumerate(qids):
        _assert_top(_read_run(tmp_path / "i8.trec")[q], ids, approx @ queries[i], everyone,
                    everyone, eps=1e-4)

    # binary, Parquet (a real job run): Hamming top 11 × 2, rescored as query · (±1 bits).
    _embed(mean_bert_dir, beir, tmp_path / "bin", output_dtype="binary")
    binary = _evaluate(mean_bert_dir, beir, tmp_path / "bin.trec", vectors=str(tmp_path / "bin"),
                       rescore_multiplier=2)
    assert all(0.0 <= v <= 1.0 for v in binary["metrics"].values())
    ids, stored = _stored(tmp_path / "bin")
    dim = queries.shape[1]
    bits = np.unpackbits(stored, axis=1)[:, :dim].astype(bool)  # (N, D)
    candidates = (10 + 1) * 2  # k (+1: identical ids are dropped) × rescore_multiplier
    for i, q in enumerate(qids):
        distance = (bits != (queries[i] > 0)).sum(axis=1)  # (N,) Hamming
        cut = np.sort(distance)[candidates - 1]  # ties at the cut: any of them may be in
        job = _read_run(tmp_path / "bin.trec")[q]
        _assert_top(job, ids, (bits * 2.0 - 1.0) @ queries[i], distance < cut,
                    distance <= cut)
        at_cut = sum(distance[ids.index(d)] == cut for d, _ in job)
        assert at_cut <= candidates - (distance < cut).sum()


def _index_type(table_uri: Path) -> tuple[str, dict[str, Any]]:
    """The vector index's type and Lance's statistics of it."""
    import lance

    table = lance.dataset(str(table_uri))
    (index,) = [d for d in table.describe_indices() if "embedding" in d.field_names]
    stats = table.stats.index_stats(index.name)
    return stats["index_type"], stats


def _grow(beir: Path) -> tuple[set[str], set[str]]:
    """Append 20 documents to the corpus, edit two, delete two unjudged ones: (the ids now
    in it, the deleted ids)."""
    judged = {line.split("\t")[1] for line in
              (beir / "qrels" / "test.tsv").read_text().splitlines()[1:]}
    rows = [json.loads(line) for line in (beir / "corpus.jsonl").read_text().splitlines()]
    gone = set(sorted(r["_id"] for r in rows if r["_id"] not in judged)[:2])
    rows = [r for r in rows if r["_id"] not in gone]
    for r in rows[:2]:
        r["text"] = "an edited text corpusonly"
    rows += [{"_id": f"n{i}", "title": "", "text": f"word{i} new corpusonly"} for i in range(20)]
    (beir / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {r["_id"] for r in rows}, gone


@pytest.mark.timeout(420)
def test_index_recall_vs_exact_and_an_incremental_run_updates_the_index(
        ray_session, mean_bert_dir: Path, tmp_path: Path) -> None:
    import lance

    from pipelines.embed.lance_table import MIN_INDEX_ROWS

    beir = write_beir(tmp_path / "beir", n_docs=MIN_INDEX_ROWS + 44)
    table = tmp_path / "emb.lance"
    first = _embed(mean_bert_dir, beir, table, format="lance", index="ivf_pq")
    assert first["index"]["kind"] == "ivf_pq" and _index_type(table)[0] == "IVF_PQ"

    # Incremental: 20 new rows, 2 changed, 2 deleted; the index takes the new rows.
    ids, gone = _grow(beir)
    second = _embed(mean_bert_dir, beir, table, format="lance", index="ivf_pq", mode="incremental")
    assert second["rows_encoded_this_attempt"] == 22 and second["table_rows"] == len(ids)
    stored = lance.dataset(str(table)).to_table(columns=["_id"]).column("_id").to_pylist()
    assert sorted(stored) == sorted(ids)  # one row per current id
    kind, stats = _index_type(table)
    assert kind == "IVF_PQ" and stats["num_unindexed_rows"] == 0

    result = _evaluate(mean_bert_dir, beir, tmp_path / "pq.trec", vectors=str(table), index=True,
                       refine_factor=5)
    timings = result["timings"]
    assert 0.9 <= timings["index_recall@10_vs_exact"] <= 1.0  # PQ, refined on the vectors
    assert timings["index_query_ms_p50"] > 0 and timings["flat_query_ms_p50"] > 0
    assert all(0.0 <= v <= 1.0 for v in result["metrics"].values())
    found = {d for docs in _read_run(tmp_path / "pq.trec").values() for d, _ in docs}
    assert found <= ids and not found & gone

    # Another kind of index asked for (nothing else changed): the index is replaced.
    third = _embed(mean_bert_dir, beir, table, format="lance", index="ivf_hnsw_sq",
                   mode="incremental")
    assert third["rows_encoded_this_attempt"] == 0 and third["table_rows"] == len(ids)
    assert third["index"]["kind"] == "ivf_hnsw_sq" and _index_type(table)[0] == "IVF_HNSW_SQ"
    hnsw = _evaluate(mean_bert_dir, beir, tmp_path / "hnsw.trec", vectors=str(table), index=True)
    assert 0.8 <= hnsw["timings"]["index_recall@10_vs_exact"] <= 1.0
