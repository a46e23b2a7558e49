"""Lance output, compact vectors and the ANN index: quality, size, speed (BENCHMARKS.md).

    PYTHONPATH=. python bench/lance_output.py [--nfcorpus ../shared/data/nfcorpus] \\
        [--out /tmp/lance_bench] [--rows 100000]

1. NFCorpus with all-MiniLM-L6-v2: `embed_corpus.py --format lance` (float32, IVF_PQ
   index), then the same vectors stored as float16 / int8 / binary (the job's own
   quantization, `bge_core.quantize_vectors`, int8 ranges from the first 1,000 rows as the
   job calibrates) and `evaluate.py --vectors` on each: nDCG@10 and bytes per vector;
   `evaluate.py --index` for IVF_PQ and IVF_HNSW_SQ: recall@10 vs exact, ms per query.
2. Incremental cost: a `--rows` corpus (a tiny random BERT: the cost is the job's, not the
   model's) embedded into Lance, 1% of its rows changed (half edited, a quarter deleted, a
   quarter new), then `--mode incremental`: rows re-encoded, seconds, versions created.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from bge_core.quantize_vectors import bytes_per_vector, calibrate_int8, quantize
from pipelines.common.cli import make_config
from pipelines.common.encode import arrow_to_vectors, vectors_to_arrow
from pipelines.embed.lance_table import build_index, open_table
from pipelines.embed.main import EmbedConfig, run
from pipelines.search.evaluate import EvaluateConfig
from pipelines.search.evaluate import run as evaluate

MODEL = "all-MiniLM-L6-v2"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # outside the repo


def embed_nfcorpus(data: Path, out: Path) -> dict:
    return run(make_config(EmbedConfig, input=str(data / "corpus.jsonl"), output=str(out),
                           id_column="_id", title_column="title", format="lance",
                           index="ivf_pq", batch_rows=512, log_every_s=30.0))


def store_as(table_uri: Path, manifest: dict, dtype: str, out: Path) -> None:
    """The float32 vectors in `dtype`, written as an embed_corpus Parquet output."""
    table = open_table(str(table_uri)).to_table(columns=["_id", "embedding"])
    vectors = arrow_to_vectors(table.column("embedding"))  # (n, D) float32
    extra = {}
    ranges = None
    if dtype == "int8":
        ranges = calibrate_int8(vectors[:1000])
        extra = {"int8_ranges": ranges.tolist(), "int8_ranges_source": "first 1000 valid rows"}
    out.mkdir(parents=True, exist_ok=True)
    stored = quantize(vectors, dtype, ranges)
    pq.write_table(pa.table({"_id": table.column("_id"), "embedding": vectors_to_arrow(stored)}),
                   out / "part-0.parquet")
    (out / "_manifest.json").write_text(json.dumps({
        **{k: manifest[k] for k in ("model", "normalize", "id_column")}, "format": "parquet",
        "output_dtype": dtype, "bytes_per_vector": bytes_per_vector(dtype, vectors.shape[1]),
        **extra}))


def score(data: Path, vectors: Path, **extra) -> dict:
    cfg = make_config(EvaluateConfig, beir_dir=str(data), vectors=str(vectors),
                      k_values="10,100", **extra)
    return evaluate(cfg)


def nfcorpus(data: Path, root: Path) -> dict:
    table = root / "nfcorpus.lance"
    start = time.monotonic()
    manifest = embed_nfcorpus(data, table)
    results = {"embed_s": round(time.monotonic() - start, 1), "rows": manifest["table_rows"],
               "index_build": manifest["index"], "dtypes": {}}
    for dtype in ("float32", "float16", "int8", "binary"):
        where = table if dtype == "float32" else root / f"nfcorpus-{dtype}"
        if dtype != "float32":
            store_as(table, manifest, dtype, where)
        got = score(data, where)
        results["dtypes"][dtype] = {"ndcg@10": got["metrics"]["ndcg@10"],
                                    "recall@100": got["metrics"]["recall@100"],
                                    "bytes_per_vector": got["timings"]["bytes_per_vector"]}
    results["index"] = {}
    for kind in ("ivf_pq", "ivf_hnsw_sq"):
        params = build_index(open_table(str(table)), kind, normalized=True)
        got = score(data, table, index=True)
        results["index"][kind] = {"params": params, "ndcg@10": got["metrics"]["ndcg@10"],
                                  **{k: v for k, v in got["timings"].items()
                                     if k.startswith(("index_recall", "index_query",
                                                      "flat_query"))}}
    return results


def write_big_corpus(folder: Path, rows: int, files: int = 10) -> None:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(2000)]
    folder.mkdir(parents=True, exist_ok=True)
    per = rows // files
    for f in range(files):
        ids = list(range(f * per, (f + 1) * per))
        texts = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) for _ in ids]
        pq.write_table(pa.table({"id": ids, "text": texts}), folder / f"part-{f:03d}.parquet")


def change_one_percent(folder: Path, rows: int) -> dict:
    """Half of 1% edited, a quarter deleted, a quarter new (in the first file)."""
    n = rows // 100
    path = sorted(folder.glob("*.parquet"))[0]
    table = pq.read_table(path).to_pylist()
    edited, deleted = n // 2, n // 4
    for row in table[:edited]:
        row["text"] = "edited " + row["text"]
    table = table[:edited] + table[edited + deleted:]
    table += [{"id": rows + i, "text": f"new row {i}"} for i in range(n - edited - deleted)]
    pq.write_table(pa.Table.from_pylist(table), path)
    return {"edited": edited, "deleted": deleted, "new": n - edited - deleted}


def incremental(root: Path, rows: int) -> dict:
    from tests.tiny_models import make_tiny_bert

    model = make_tiny_bert(root / "tiny-bert")
    corpus, table = root / "big", root / "big.lance"
    write_big_corpus(corpus, rows)

    def job(mode: str) -> tuple[dict, float]:
        start = time.monotonic()
        result = run(make_config(EmbedConfig, input=str(corpus), output=str(table),
                                 model=str(model), format="lance", mode=mode,
                                 batch_rows=2048, log_every_s=60.0))
        return result, round(time.monotonic() - start, 1)

    full, full_s = job("full")
    change = change_one_percent(corpus, rows)
    inc, inc_s = job("incremental")
    return {"rows": rows, "full": {"seconds": full_s, "rows_encoded": full["rows_encoded"],
                                   "table_version": full["table_version"]},
            "change": change,
            "incremental": {"seconds": inc_s, "rows_encoded": inc["rows_encoded_this_attempt"],
                            "rows_dropped": inc["rows_dropped"],
                            "table_versions_created": inc["table_versions_created"],
                            "table_rows": inc["table_rows"],
                            "stages_s": inc["seconds_this_attempt"]}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nfcorpus", default=str(SHARED / "nfcorpus"))
    parser.add_argument("--out", default="/tmp/lance_bench")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--parts", default="nfcorpus,incremental",
                        help="which parts to run, comma-separated (each printed when done)")
    args = parser.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results: dict = {}
    parts = {"nfcorpus": lambda: nfcorpus(Path(args.nfcorpus), root),
             "incremental": lambda: incremental(root, args.rows)}
    for name in args.parts.split(","):
        results[name] = parts[name]()
        print(f"RESULT {name} " + json.dumps(results[name], default=str), flush=True)
        (root / "results.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
