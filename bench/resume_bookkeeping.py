"""Ours or Ray's: resume bookkeeping of a read → encode → write pipeline, measured.

Ray Data 2.60's beta `CheckpointConfig(id_column=...)` against our file-level markers
(`_state/done/`, `_state/parts/`), on the same small corpus with 1% duplicate ids:

- Ray's: `read_parquet → map_batches(stand-in encoder) → write_parquet` with
  `DataContext.checkpoint_config` set; a first run, then a rerun with nothing left to do
  (what a restart costs when all is done); output rows against unique ids (duplicates);
  the checkpoint's bytes on disk; and the bytes of the sorted id array every filter actor
  holds (Ray's own `_numpy_size` on Ray's own conversion), for int64 ids and string ids,
  scaled to 10^8 ids.
- Ours: `embed_corpus` with a tiny random BERT on the same corpus, then the same rerun.

Usage: python bench/resume_bookkeeping.py [--files 20] [--rows 1000]
Prints one JSON line per measurement, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

SCALE = 10**8


def write_corpus(folder: Path, files: int, rows: int) -> int:
    """Parquet files of (id, text); 1% of the rows repeat an earlier id. Returns unique ids."""
    folder.mkdir(parents=True)
    ids_seen = 0
    for f in range(files):
        ids = list(range(f * rows, (f + 1) * rows))
        for i in range(0, rows, 100):  # every 100th row repeats the file's first id
            if i:
                ids[i] = f * rows
        ids_seen += len(set(ids))
        texts = [f"text number {i} of file {f}" for i in range(rows)]
        pq.write_table(pa.table({"id": ids, "text": texts}), folder / f"{f:03d}.parquet")
    return ids_seen


def fake_encode(batch: pa.Table) -> pa.Table:
    """Stand-in for the encoder: a 32-wide vector per row."""
    vectors = np.random.default_rng(0).standard_normal((batch.num_rows, 32)).astype("float32")
    flat = pa.array(vectors.reshape(-1))
    return batch.append_column("embedding", pa.FixedSizeListArray.from_arrays(flat, 32))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def ray_checkpoint_run(corpus: Path, out: Path, ckpt: Path) -> dict[str, Any]:
    import ray.data
    from ray.data.checkpoint import CheckpointConfig

    ctx = ray.data.DataContext.get_current()
    ctx.checkpoint_config = CheckpointConfig(id_column="id", checkpoint_path=str(ckpt),
                                             delete_checkpoint_on_success=False)
    start = time.monotonic()
    ray.data.read_parquet(str(corpus)).map_batches(
        fake_encode, batch_format="pyarrow").write_parquet(str(out))
    seconds = time.monotonic() - start
    ctx.checkpoint_config = None
    return {"seconds": round(seconds, 2), "rows_out": _rows(out)}


def _rows(folder: Path) -> int:
    return sum(pq.read_metadata(p).num_rows for p in folder.rglob("*.parquet"))


def ray_id_memory(ckpt: Path, ids: int) -> dict[str, float]:
    """Bytes per id of the sorted array each filter actor holds (Ray's own conversion)."""
    from ray.data._internal.arrow_ops import transform_pyarrow
    from ray.data.checkpoint.checkpoint_filter import _numpy_size

    table = pq.read_table(str(ckpt))
    as_int = np.sort(transform_pyarrow.to_numpy(table["id"], zero_copy_only=False))
    strings = pa.array([f"doc-{i:012d}" for i in range(ids)])
    as_str = np.sort(transform_pyarrow.to_numpy(strings, zero_copy_only=False))
    return {"int64_bytes_per_id": _numpy_size(as_int) / len(as_int),
            "string_bytes_per_id": _numpy_size(as_str) / len(as_str)}


def our_run(corpus: Path, out: Path, model: Path) -> dict[str, Any]:
    from pipelines.common.cli import make_config
    from pipelines.embed.main import EmbedConfig, run

    start = time.monotonic()
    manifest = run(make_config(EmbedConfig, input=str(corpus), output=str(out),
                               model=str(model), cpus_per_actor=0.5))
    return {"seconds": round(time.monotonic() - start, 2),
            "rows_out": manifest["rows_written"], "rejected": manifest["rows_rejected"],
            "encoded_this_attempt": manifest["rows_encoded_this_attempt"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--rows", type=int, default=1000)
    args = parser.parse_args()
    import ray

    from tests.tiny_models import make_tiny_bert

    tmp = Path(tempfile.mkdtemp(prefix="resume_bench_"))
    try:
        unique = write_corpus(tmp / "corpus", args.files, args.rows)
        rows_in = args.files * args.rows
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        results: dict[str, Any] = {"rows_in": rows_in, "unique_ids": unique}
        results["ray_first"] = ray_checkpoint_run(tmp / "corpus", tmp / "ray_out", tmp / "ckpt")
        results["ray_rerun"] = ray_checkpoint_run(tmp / "corpus", tmp / "ray_out", tmp / "ckpt")
        results["ray_checkpoint_bytes"] = folder_bytes(tmp / "ckpt")
        results["ray_memory"] = ray_id_memory(tmp / "ckpt", rows_in)
        model = make_tiny_bert(tmp / "model")
        results["ours_first"] = our_run(tmp / "corpus", tmp / "our_out", model)
        results["ours_rerun"] = our_run(tmp / "corpus", tmp / "our_out", model)
        results["ours_state_bytes"] = folder_bytes(tmp / "our_out" / "_state")
        for key, value in results.items():
            print(json.dumps({key: value}))
        print_table(results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def print_table(r: dict[str, Any]) -> None:
    mem = r["ray_memory"]
    rows = [
        ("rows in / unique ids", f"{r['rows_in']} / {r['unique_ids']}", "same"),
        ("rows written (first run)", r["ray_first"]["rows_out"],
         f"{r['ours_first']['rows_out']} (+{r['ours_first']['rejected']} rejected)"),
        ("first run, s", r["ray_first"]["seconds"], r["ours_first"]["seconds"]),
        ("rerun with nothing left, s", r["ray_rerun"]["seconds"], r["ours_rerun"]["seconds"]),
        ("rows written again by the rerun", r["ray_rerun"]["rows_out"] - r["ray_first"]
         ["rows_out"], r["ours_rerun"]["encoded_this_attempt"]),
        ("bookkeeping on disk, bytes/row", round(r["ray_checkpoint_bytes"] / r["rows_in"], 1),
         round(r["ours_state_bytes"] / r["rows_in"], 1)),
        ("ids held per filter actor at 10^8 (int64 / string)",
         f"{mem['int64_bytes_per_id'] * SCALE / 2**30:.2f} / "
         f"{mem['string_bytes_per_id'] * SCALE / 2**30:.2f} GiB", "none (per-chunk markers)"),
    ]
    print("| measure | Ray CheckpointConfig | ours |\n|---|---|---|")
    for name, ray_value, ours in rows:
        print(f"| {name} | {ray_value} | {ours} |")


if __name__ == "__main__":
    main()
