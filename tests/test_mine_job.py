"""The Ray mining job equals in-process mining and writes valid finetuning input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bge_core.mining import SampleRange, mine_negatives
from bge_core.search import exact_topk
from tests.driver_spy import spy_on_driver
from tests.tiny_models import WORDS

MARKER = "corpusonly"  # in every corpus text, in no query: what reaches the driver is scanned


def _write_data(root: Path) -> tuple[Path, Path, list[dict], list[str]]:
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=8)) + f" {MARKER}" for _ in range(40)]
    examples = [{"query": " ".join(rng.choice(WORDS, size=4)),
                 "pos": [docs[2 * i], docs[2 * i + 1]], "neg": [docs[30]], "qid": i}
                for i in range(6)]
    pool = docs + [docs[0], docs[3]]  # duplicates of positives must never come out
    train, pool_file = root / "train.jsonl", root / "pool.jsonl"
    train.write_text("".join(json.dumps(e) + "\n" for e in examples))
    pool_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in pool))
    return train, pool_file, examples, docs


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_mining_job_on_s3_equals_in_process_reference(ray_session, mean_bert_dir: Path,
                                                      tmp_path: Path, s3, monkeypatch) -> None:
    """Training data and pool read from S3 by Ray tasks, mined output written there (moto on
    loopback); no corpus text reaches the driver."""
    from bge_core.data import load_examples as read_training_data
    from bge_core.model import Encoder
    from pipelines.common.cli import make_config
    from pipelines.search.mine import MineConfig, run

    train, pool, examples, docs = _write_data(tmp_path)
    s3.put(str(train), "bucket/in/train.jsonl")
    s3.put(str(pool), "bucket/in/pool.jsonl")
    with spy_on_driver(monkeypatch, MARKER) as spy:
        summary = run(make_config(MineConfig,
            model_name_or_path=str(mean_bert_dir), input_file="s3://bucket/in/train.jsonl",
            candidate_pool="s3://bucket/in/pool.jsonl", output_file="s3://bucket/out/mined.jsonl",
            range_for_sampling="1-20", negative_number=5, seed=7,
            query_instruction_for_retrieval="q: ", batch_rows=16, search_shard_rows=16,
            cpus_per_actor=0.5))
        assert spy.received > 0 and spy.leaks == []
        ray_session.data.from_items([{"text": docs[0]}]).take_all()  # the spy can see a leak
        assert spy.leaks
    assert s3.ls("bucket/out") == ["bucket/out/mined.jsonl"]  # the parts are gone
    out = tmp_path / "mined.jsonl"
    s3.get("bucket/out/mined.jsonl", str(out))
    mined = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["corpus"] == 40 and summary["examples"] == 6

    # Reference: in-process encoding (instruction on queries), full search, same seed.
    encoder = Encoder.from_pretrained(str(mean_bert_dir), device="cpu", query_instruction="q: ")
    _, ids = exact_topk(encoder.encode_queries([e["query"] for e in examples]),
                        encoder.encode_corpus(docs), k=20)
    ranked = [[docs[i] for i in row] for row in ids.tolist()]
    assert mined == mine_negatives(examples, ranked, SampleRange(1, 20), 5, seed=7, corpus=docs)

    for example, row in zip(examples, mined):
        assert len(row["neg"]) == 5
        assert not set(row["neg"]) & set(example["pos"])
        assert row["qid"] == example["qid"]
    good, bad = read_training_data(str(out), group_size=6)  # what finetune.py reads
    assert bad == 0 and len(good) == 6
    assert all(len(g["neg"]) == 5 for g in good)


@pytest.mark.timeout(180)
def test_default_pool_is_every_pos_and_neg_in_first_seen_order(ray_session,
                                                              tmp_path: Path) -> None:
    """The Ray corpus (first copy of each text, numbered by first position) equals
    `bge_core.mining.distinct_texts`, duplicates across examples included."""
    from bge_core.mining import distinct_texts as reference_corpus
    from pipelines.search.mining import corpus_dataset, examples_dataset

    examples = [{"query": "q0", "pos": ["b", "a"], "neg": ["c", "b"]},
                {"query": "q1", "pos": ["d"], "neg": ["a", "e"]},
                {"query": "q2", "pos": ["c"]}]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(e) + "\n" for e in examples))
    ds, count = examples_dataset(str(train))
    corpus, size = corpus_dataset(ds, None)
    rows = sorted((r["row"], r["text"]) for r in corpus.take_all())
    assert count == 3 and size == 5
    assert [t for _, t in rows] == reference_corpus(examples) == ["b", "a", "c", "d", "e"]
    assert [r for r, _ in rows] == list(range(5))


@pytest.mark.timeout(180)
def test_records_are_read_in_ranges_numbered_in_file_order(ray_session, tmp_path: Path) -> None:
    """Mining's input read as many line ranges (`bge_core.io`, one Ray task each): blank
    lines skipped, examples numbered 0..n-1 in file order, and of two bad records the
    one earlier in the file is reported, with its line."""
    from bge_core.records import RecordError, check_training_example
    from pipelines.search.mining import EXAMPLE_SCHEMA, _example_row
    from pipelines.search.records import number_rows, read_checked_dataset

    lines = [json.dumps({"query": f"q{i}", "pos": [f"p{i}"]}) if i % 4 else "" for i in range(23)]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines) + "\n")
    ds = read_checked_dataset(str(train), check_training_example, _example_row,
                              EXAMPLE_SCHEMA, "training data", rows_per_range=3)
    assert ds.materialize().num_blocks() == 8  # 23 lines, ranges of 3: never read whole
    rows = sorted((r["row"], r["text"]) for r in number_rows(ds, "row", by="key").take_all())
    assert rows == list(enumerate(f"q{i}" for i in range(23) if i % 4))

    lines[20] = json.dumps({"query": "", "pos": ["x"]})
    lines[9] = "{not json"
    train.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordError, match=r"train.jsonl line 10: not valid JSON"):
        read_checked_dataset(str(train), check_training_example, _example_row,
                             EXAMPLE_SCHEMA, "training data", rows_per_range=3)


def test_cli_errors_name_the_flag_or_file(tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    from pipelines.search.mine import main

    base = ["--model_name_or_path", "m", "--input_file", str(tmp_path / "missing.jsonl"),
            "--output_file", str(tmp_path / "o.jsonl")]
    assert main([*base, "--range_for_sampling", "200-2"]) == 2
    assert "range_for_sampling" in capsys.readouterr().err
    assert main([*base, "--negative_number", "0"]) == 2
    assert "negative_number" in capsys.readouterr().err
