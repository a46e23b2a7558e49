"""Bulk embedding job: correctness, bad input, incremental re-runs (in-process Ray)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bge_core import Encoder
from bge_core.texts import join_title
from pipelines.common.cli import make_config
from pipelines.common.corpus_io import InputError
from pipelines.embed.main import EmbedConfig, EncodeOptions, main, run
from pipelines.embed.output import list_parts, read_table
from tests.embed_helpers import (
    assert_matches_encoder,
    manifest,
    read_output,
    write_corpus,
    write_jsonl,
)
from tests.tiny_models import WORDS, make_tiny_bert

pytestmark = pytest.mark.timeout(600)


def _cfg(tiny_bert_dir: Path, source: Path, out: Path, **extra) -> EmbedConfig:
    return make_config(EmbedConfig, input=str(source), output=str(out), model=str(tiny_bert_dir),
                       title_column="title", cpus_per_actor=0.5, batch_rows=16,
                       log_every_s=1.0, **extra)


@pytest.fixture(scope="module")
def encoder(tiny_bert_dir: Path) -> Encoder:
    return Encoder.from_pretrained(str(tiny_bert_dir), device="cpu")


def test_output_matches_encoder(ray_session, tiny_bert_dir, encoder, tmp_path) -> None:
    expected = write_corpus(tmp_path / "corpus", files=3, rows=20)
    result = run(_cfg(tiny_bert_dir, tmp_path / "corpus", tmp_path / "out"))
    assert_matches_encoder(read_output(tmp_path / "out"), expected, encoder)
    assert result == manifest(tmp_path / "out")
    assert (result["rows_in"], result["rows_written"], result["rows_rejected"]) == (60, 60, 0)
    assert result["model_fingerprint"] == encoder.fingerprint()
    assert len(result["input_files_done"]) == 3
    schema = pq.read_schema(next((tmp_path / "out").glob("part-*.parquet")))
    assert schema.field("embedding").type == pa.list_(pa.float32(), encoder.dim)
    # a second run of the same command finds everything done and encodes nothing
    again = run(_cfg(tiny_bert_dir, tmp_path / "corpus", tmp_path / "out"))
    assert again["rows_encoded_this_attempt"] == 0 and again["rows_written"] == 60


def test_float16_output_and_truncation_count(ray_session, tiny_bert_dir, tmp_path) -> None:
    write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "the cat " * 100},
                                       {"id": "b", "text": "a dog"}])
    result = run(make_config(EmbedConfig, input=str(tmp_path / "c.jsonl"),
                             output=str(tmp_path / "o"), model=str(tiny_bert_dir),
                             max_length=16, cpus_per_actor=0.5, output_dtype="float16"))
    assert result["rows_truncated"] == 1 and result["max_length"] == 16
    schema = pq.read_schema(next((tmp_path / "o").glob("part-*.parquet")))
    assert schema.field("embedding").type.value_type == pa.float16()


def test_bad_rows_are_rejected_with_reasons(ray_session, tiny_bert_dir, encoder,
                                            tmp_path) -> None:
    write_jsonl(tmp_path / "in" / "a.jsonl", [
        {"_id": "d1", "text": "the cat"}, {"_id": "d2", "text": None},
        {"_id": "d3", "text": 42}, {"_id": None, "text": "a dog"},
        {"_id": "d1", "text": "the dog again"}, {"_id": "d4"}])
    write_jsonl(tmp_path / "in" / "b.jsonl", [{"_id": "d1", "text": "cross-file duplicate"},
                                              {"_id": "d5", "text": "fish"}])
    result = run(make_config(EmbedConfig, input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                             model=str(tiny_bert_dir), id_column="_id", cpus_per_actor=0.5))
    assert result["rows_in"] == 8
    assert result["rows_in"] == result["rows_written"] + result["rows_rejected"]
    assert_matches_encoder(read_output(tmp_path / "out", "_id"),
                           {"d1": "the cat", "d5": "fish"}, encoder)
    rejects = pa.concat_tables(pq.read_table(p) for p in
                               sorted((tmp_path / "out" / "_rejects").glob("*.parquet")))
    reasons = {(r["source_file"].rsplit("/", 1)[1], r["row"]): r["reason"]
               for r in rejects.to_pylist()}
    assert len(reasons) == 6
    assert "missing 'text'" in reasons[("a.jsonl", 1)]
    assert "missing 'text'" in reasons[("a.jsonl", 5)]
    assert "int, not a string" in reasons[("a.jsonl", 2)]
    assert "missing '_id'" in reasons[("a.jsonl", 3)]
    assert "duplicate id" in reasons[("a.jsonl", 4)]
    assert "duplicate id" in reasons[("b.jsonl", 0)]


def test_missing_column_lists_columns(ray_session, tiny_bert_dir, tmp_path) -> None:
    write_corpus(tmp_path / "c", files=1, rows=4)
    with pytest.raises(InputError, match=r"\['body'\] not found; columns present: "
                                         r"\['id', 'text', 'title'\]"):
        run(make_config(EmbedConfig, input=str(tmp_path / "c"), output=str(tmp_path / "o"),
                        model=str(tiny_bert_dir), text_column="body"))


def test_corrupt_file_is_named_and_never_done(ray_session, tiny_bert_dir, tmp_path,
                                              capsys) -> None:
    write_corpus(tmp_path / "c", files=1, rows=4)
    (tmp_path / "c" / "zz-broken.parquet").write_bytes(b"not a parquet file at all")
    argv = ["--input", str(tmp_path / "c"), "--output", str(tmp_path / "o"),
            "--model", str(tiny_bert_dir)]
    assert main(argv) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert line.startswith("embed_corpus: error: ") and "zz-broken.parquet" in line
    assert not list((tmp_path / "o" / "_state" / "done").glob("*.json"))


def test_incremental_encodes_only_changed_and_new(ray_session, tiny_bert_dir, encoder,
                                                  tmp_path) -> None:
    corpus = write_corpus(tmp_path / "v1", files=4, rows=50)
    run(_cfg(tiny_bert_dir, tmp_path / "v1", tmp_path / "emb1"))
    # next night's corpus: 1% changed, 1% deleted, 1% added
    table = pa.concat_tables(pq.read_table(p) for p in sorted((tmp_path / "v1").glob("*")))
    rows = table.to_pylist()
    for row in rows[10:12]:
        row["text"] += " changed"
    rows = [r for r in rows if r["id"] not in (20, 150)] + [
        {"id": 900 + i, "title": None, "text": f"new passage {i}"} for i in range(2)]
    (tmp_path / "v2").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "v2" / "all.parquet")
    expected = {r["id"]: f"{r['title']} {r['text']}".strip() if r["title"] else r["text"]
                for r in rows}
    result = run(_cfg(tiny_bert_dir, tmp_path / "v2", tmp_path / "emb2", mode="incremental",
                      previous=str(tmp_path / "emb1")))
    assert result["rows_encoded_this_attempt"] == 4  # 2 changed + 2 new, nothing else
    assert (result["rows_kept"], result["rows_dropped"]) == (196, 2)
    assert result["rows_written"] == len(corpus) - 2 + 2
    assert_matches_encoder(read_output(tmp_path / "emb2"), expected, encoder)


def test_model_change_forces_full_run(ray_session, tiny_bert_dir, tmp_path, caplog) -> None:
    write_corpus(tmp_path / "c", files=1, rows=10)
    run(_cfg(tiny_bert_dir, tmp_path / "c", tmp_path / "e1"))
    other = make_tiny_bert(tmp_path / "other_model", seed=7)
    result = run(_cfg(other, tmp_path / "c", tmp_path / "e2", mode="incremental",
                      previous=str(tmp_path / "e1")))
    assert "model changed since the previous output" in caplog.text
    assert result["rows_encoded_this_attempt"] == 10 and result["rows_kept"] == 0


@pytest.mark.parametrize("gpus", [0.0, 1.0])
def test_tokenise_stage_stays_out_of_the_encode_actors(ray_session, gpus: float,
                                                       capsys: pytest.CaptureFixture) -> None:
    """Ray's optimized physical plan runs tokenisation as its own task stage (never fused
    into the actors, which would make GPU actors tokenise between forward passes)."""
    import ray

    from pipelines.common.encode import encode_dataset

    opts = EncodeOptions(model="m", gpus_per_actor=gpus)
    encode_dataset(ray.data.from_items([{"text": "a"}]), opts).explain()  # plans, runs nothing
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "ActorPoolMapOperator[MapBatches(EncodeActor)]" in optimized
    assert "TaskPoolMapOperator[MapBatches(tokenize_batch)]" in optimized


def _long_doc(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) + rng.choice(["", "", ",", "."]) for _ in range(words))


def _chunk_texts(output: Path) -> pa.Table:
    return pa.concat_tables(read_table(p) for p in list_parts(str(output)))


def test_chunked_documents_end_to_end_and_incremental(ray_session, tiny_bert_dir, encoder,
                                                      tmp_path) -> None:
    """Token windows: every chunk's vector is Encoder.encode(title + " " + text[span]);
    spans cover each text; a changed document re-embeds all its chunks, a deleted one
    drops them; rejects and row accounting count documents."""
    rng = random.Random(3)
    docs = [{"id": i, "title": "health study" if i % 2 else None,
             "text": _long_doc(rng, rng.randint(3, 90))} for i in range(12)]
    docs.append({"id": 99, "title": None, "text": None})  # rejected, as without chunking
    write_jsonl(tmp_path / "v1" / "c.jsonl", docs)
    chunking = {"chunk_tokens": 16, "chunk_overlap": 4}
    first = run(_cfg(tiny_bert_dir, tmp_path / "v1", tmp_path / "e1", **chunking))
    table = _chunk_texts(tmp_path / "e1")
    assert (first["rows_in"], first["rows_written"], first["rows_rejected"]) == (13, 12, 1)
    assert first["chunks_written"] == table.num_rows > 12 * 2
    by_doc: dict[int, list[dict]] = {}
    for row in sorted(table.to_pylist(), key=lambda r: (r["id"], r["chunk"])):
        by_doc.setdefault(row["id"], []).append(row)
    texts, vectors = [], []
    for doc in docs[:12]:
        rows = by_doc[doc["id"]]
        assert [r["chunk"] for r in rows] == list(range(len(rows)))
        covered = np.zeros(len(doc["text"]), dtype=bool)
        for r in rows:
            covered[r["start_char"]:r["end_char"]] = True
            texts.append(join_title(doc["title"], doc["text"][r["start_char"]:r["end_char"]]))
            vectors.append(np.asarray(r["embedding"], dtype=np.float32))
        assert covered.all()
    cosine = (np.stack(vectors) * encoder.encode(texts)).sum(1)
    assert cosine.min() >= 0.9999

    # next night: doc 1 changed, doc 2 deleted, doc 50 new; the rest unchanged
    docs2 = [d for d in docs if d["id"] != 2]
    docs2[1] = {**docs2[1], "text": docs2[1]["text"] + " and a new ending"}
    docs2.append({"id": 50, "title": None, "text": _long_doc(rng, 60)})
    write_jsonl(tmp_path / "v2" / "c.jsonl", docs2)
    second = run(_cfg(tiny_bert_dir, tmp_path / "v2", tmp_path / "e2", mode="incremental",
                      previous=str(tmp_path / "e1"), **chunking))
    table2 = _chunk_texts(tmp_path / "e2")
    ids2 = table2.column("id").to_pylist()
    assert (second["rows_encoded_this_attempt"], second["rows_dropped"]) == (2, 1)
    assert second["rows_kept"] == 10 and 2 not in ids2
    assert second["chunks_encoded_this_attempt"] == ids2.count(1) + ids2.count(50)
    assert second["chunks_written"] == table2.num_rows
    unchanged = {(r["id"], r["chunk"]): r["embedding"] for r in table.to_pylist()
                 if r["id"] not in (1, 2)}
    assert {(r["id"], r["chunk"]): r["embedding"] for r in table2.to_pylist()
            if r["id"] not in (1, 50)} == unchanged


def test_chunk_size_must_fit_the_model(ray_session, tiny_bert_dir, tmp_path) -> None:
    write_jsonl(tmp_path / "c.jsonl", [{"id": 1, "text": "a cat"}])
    with pytest.raises(InputError, match="--chunk-tokens 200 does not fit the model"):
        run(_cfg(tiny_bert_dir, tmp_path / "c.jsonl", tmp_path / "o", chunk_tokens=200))


@pytest.mark.timeout(600)
def test_int8_actors_match_the_int8_encoder_and_the_manifest_says_so(
        ray_session, tiny_bert_dir, tmp_path) -> None:
    """`--dtype int8`: both actors run the cached OpenVINO int8 model (bge_core.int8),
    calibrated on the input's first texts (the driver reads them once and hands them to
    every actor), so their vectors are the in-process int8 `Encoder`'s, which calibrates on
    the first texts it encodes; the recipe and calibration digest are in the manifest and
    the fingerprint."""
    from bge_core.int8 import PRECISION

    expected = write_corpus(tmp_path / "c", files=2, rows=12)
    result = run(_cfg(tiny_bert_dir, tmp_path / "c", tmp_path / "o", dtype="int8",
                      num_actors="2"))
    int8 = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu", dtype="int8")
    fp32 = Encoder.from_pretrained(str(tiny_bert_dir), device="cpu")
    assert_matches_encoder(read_output(tmp_path / "o"), expected, int8)  # calibrates int8
    assert (result["dtype"], result["precision"]) == ("int8", PRECISION)
    calibration = result["int8_calibration"]
    assert {k: calibration[k] for k in ("texts", "digest", "source")} == {
        "texts": 24, "digest": int8.calibration_digest, "source": "input"}
    assert sorted(calibration["sample"]) == sorted(expected.values())  # kept for refreshes
    assert result["model_fingerprint"] == int8.fingerprint() != fp32.fingerprint()
    # and not fp32's vectors
    output = read_output(tmp_path / "o")
    ids = sorted(expected)
    reference = fp32.encode([expected[i] for i in ids])
    assert np.abs(np.stack([output[i] for i in ids]) - reference).max() > 1e-5

    # next night: the first texts changed; the refresh calibrates on the kept sample, so the
    # fingerprint stays and only the changed rows are encoded again
    first = tmp_path / "c" / "part-000.parquet"
    table = pq.read_table(first).to_pylist()
    for row in table[:3]:
        row["text"] += " changed"
    pq.write_table(pa.Table.from_pylist(table), first)
    again = run(_cfg(tiny_bert_dir, tmp_path / "c", tmp_path / "o2", dtype="int8",
                     num_actors="2", mode="incremental", previous=str(tmp_path / "o")))
    assert again["model_fingerprint"] == result["model_fingerprint"]
    assert again["int8_calibration"]["digest"] == calibration["digest"]
    assert again["rows_encoded_this_attempt"] == 3
