"""Driver of the bulk embedding job: plan, resume, run the Ray Data stream, write manifest.

The driver holds only per-file counters and the plan's exceptions (duplicate ids; in
incremental runs the changed/new rows and dropped ids), never rows or vectors.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch

from bge_core.int8 import PRECISION as INT8_PRECISION
from bge_core.precision import cpu_dtype
from bge_core.progress import Progress
from bge_core.storage import StorageError, check_reachable, find_storage_error, naming
from pipelines.common.corpus_io import Chunk, InputError, file_key, list_input_files, plan_files
from pipelines.common.encode import encode_dataset
from pipelines.common.lease import LeaseLost, OutputLease, find_lease_lost, release_quietly
from pipelines.embed.config import EmbedConfig
from pipelines.embed.output import MANIFEST, OutputState, list_parts, read_table, write_table
from pipelines.embed.plan import compute_plan
from pipelines.embed.quantize import actor_dtype, describe, vector_spec
from pipelines.embed.stages import copy_kept, first_texts, read_for_encoding, write_encoded

log = logging.getLogger("embed_corpus")
PLAN_FILE = "plan.parquet"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class EmbedJob:
    """One run of `embed_corpus` over `cfg` (see `EmbedConfig`).

    Every part and marker the run writes is fenced by its output lease (`lease`, by
    default one on `cfg.output` with `cfg.lease_timeout_s`): once the lease is lost, the
    run stops before it writes anything more.
    """

    def __init__(self, cfg: EmbedConfig, lease: OutputLease | None = None) -> None:
        self.cfg = cfg
        self.lease = lease or OutputLease(cfg.output, stale_after_s=cfg.lease_timeout_s)
        self.state = OutputState(cfg.output, fence=self.lease.fence())
        self.stats: dict[str, int] = defaultdict(int)
        self.nodes: dict[str, int] = defaultdict(int)  # rows encoded per Ray node
        self.seconds: dict[str, float] = {}  # wall time of the plan and encode stages
        self.previous_manifest: dict[str, Any] | None = None  # incremental runs
        self.vectors: dict[str, Any] = {"dtype": cfg.output_dtype}  # stored form
        self.calibration: list[str] | None = None  # int8 only: the texts every actor uses

    def run(self) -> dict[str, Any]:
        """Hold the output's lease (one live run per output) and run the job.

        Raises:
            StorageError: a read or write failed for good (a store that stays down, a full
                disk), naming the URI; work already recorded is kept for the rerun.
            LeaseLost: the run lost its lease (taken over, or not renewed in time) and
                stopped before writing more; work already recorded is kept.
        """
        for uri in (self.cfg.input, self.cfg.output, self.cfg.previous):
            if uri:
                check_reachable(uri)
        with naming(self.cfg.output, "take the lease on"):
            self.lease.acquire()
        try:
            return self._run()
        except Exception as err:
            lost = find_lease_lost(err)
            if lost is not None and lost is not err:
                raise LeaseLost(str(lost)) from err  # one line, not a Ray task's traceback
            cause = None if lost is not None else find_storage_error(err)
            if cause is None or cause is err:
                raise
            raise StorageError(str(cause)) from err
        finally:
            release_quietly(self.lease)

    def _run(self) -> dict[str, Any]:
        started = _now()
        files = list_input_files(self.cfg.input)
        required = [self.cfg.id_column, self.cfg.text_column]
        chunks = plan_files(files, self.cfg.chunk_rows, required)  # Ray tasks, one per file
        self.calibration = self._calibration(chunks)
        model = self._describe_model()
        previous = self._previous_parts(model["model_fingerprint"])
        self._claim_output(model, incremental=previous is not None)
        start = time.monotonic()
        plan = self._plan(chunks, previous)
        self.seconds["plan"] = round(time.monotonic() - start, 3)
        if previous is not None:
            self._copy_kept(previous, plan)
        done = self.state.done_markers()
        self._remove_unreferenced()
        pending = [c for c in chunks if file_key(c.path) not in done]
        self.vectors = vector_spec(self.cfg, self.state, pending, self.previous_manifest)
        log.info("%d input files, %d already done; %d rows to read",
                 len(files), len(done), sum(c.rows for c in pending))
        start = time.monotonic()
        self._encode(pending, plan)
        self.seconds["encode"] = round(time.monotonic() - start, 3)
        manifest = self._manifest(model, files, plan, started)
        self._remove_unreferenced()
        return manifest

    # --------------------------------------------------------------- model / output
    def _calibration(self, chunks: list[Chunk]) -> list[str] | None:
        """int8's calibration texts: ``--calibration``'s, else the input's first ones (in
        plan order, so a resumed run calibrates, and fingerprints, as the first did)."""
        from bge_core.int8 import CALIBRATION_TEXTS, read_calibration

        if self.cfg.encode.dtype != "int8":
            return None
        if self.cfg.encode.calibration:
            return read_calibration(self.cfg.encode.calibration)
        if self.cfg.mode == "incremental" and self.cfg.previous:
            # a scheduled refresh calibrates as the run before it did, so unchanged rows keep
            # their vectors and the model fingerprint (the input's first texts may change)
            previous = OutputState(self.cfg.previous).read_json(MANIFEST) or {}
            sample = (previous.get("int8_calibration") or {}).get("sample")
            if sample:
                log.info("int8: calibrating on the previous run's %d texts", len(sample))
                return list(sample)
        return first_texts(chunks, self.cfg.stage_dict(), CALIBRATION_TEXTS) or None

    def _describe_model(self) -> dict[str, Any]:
        from bge_core.model import Encoder

        enc = self.cfg.encode
        overrides = {"max_length": enc.max_length} if enc.max_length else {}
        encoder = Encoder.from_pretrained(enc.model, device="cpu", **overrides)
        if self.calibration:  # int8: the calibration texts are part of the fingerprint
            encoder.set_calibration(self.calibration)
        # the actors' precision is part of the fingerprint: vectors differ with it (bf16 on
        # CPU actors without native bf16 runs in fp32, as the actors will)
        dtype = cpu_dtype(enc.dtype, torch.device("cuda" if enc.gpus_per_actor else "cpu"))
        info = {"model": enc.model, "model_fingerprint": encoder.fingerprint(dtype),
                "pooling": encoder.config.pooling, "normalize": encoder.config.normalize,
                "max_length": encoder.config.max_length, "dim": encoder.dim}
        self._check_chunk_size(encoder)
        log.info("model %s (fingerprint %s): %s pooling, normalize=%s, max %d tokens, dim %d",
                 *info.values())
        info["precision"] = INT8_PRECISION if dtype == "int8" else dtype
        if self.calibration:
            info["int8_calibration"] = {"texts": len(encoder._calibration or ()),
                                        "digest": encoder.calibration_digest,
                                        "source": enc.calibration or "input",
                                        "sample": self.calibration}
        return info

    def _check_chunk_size(self, encoder: Any) -> None:
        """A window plus the special tokens (and the title) must fit the model's limit."""
        if self.cfg.chunk_tokens is None:
            return
        specials = len(encoder.tokenizer("", add_special_tokens=True)["input_ids"])
        room = encoder.config.max_length - specials
        if self.cfg.chunk_tokens > room:
            raise InputError(f"--chunk-tokens {self.cfg.chunk_tokens} does not fit the model: "
                             f"{encoder.config.max_length} tokens less {specials} special "
                             f"ones leave {room}")
        if self.cfg.title_column:
            log.info("chunking: the title prefixes every chunk; a chunk longer than %d tokens "
                     "with its title is truncated (counted in rows_truncated)", room)

    def _previous_parts(self, fingerprint: str) -> list[str] | None:
        """Parts of the previous output to diff against, or None for a full run."""
        if self.cfg.mode != "incremental":
            return None
        manifest = OutputState(self.cfg.previous or "").read_json(MANIFEST)
        if manifest is None:
            raise InputError(f"--previous {self.cfg.previous} has no {MANIFEST}: it is not a "
                             "finished output of this job")
        if manifest.get("model_fingerprint") != fingerprint:
            log.warning("model changed since the previous output (fingerprint %s, now %s): "
                        "re-embedding everything (full run)",
                        manifest.get("model_fingerprint"), fingerprint)
            return None
        stored = manifest.get("output_dtype", manifest.get("embedding_dtype", "float32"))
        if stored != self.cfg.output_dtype:
            log.warning("output dtype changed since the previous output (%s, now %s): "
                        "re-embedding everything (full run)", stored, self.cfg.output_dtype)
            return None
        self.previous_manifest = manifest
        chunking = (self.cfg.chunk_tokens, self.cfg.chunk_overlap)
        if (manifest.get("chunk_tokens"), manifest.get("chunk_overlap", 0)) != chunking:
            log.warning("chunking changed since the previous output (%s/%s tokens, now %s/%s): "
                        "re-embedding everything (full run)", manifest.get("chunk_tokens"),
                        manifest.get("chunk_overlap", 0), *chunking)
            return None
        return list_parts(self.cfg.previous or "")

    def _claim_output(self, model: dict[str, Any], incremental: bool) -> None:
        """Record what this output holds; refuse to mix runs of different settings."""
        record = {**model, "id_column": self.cfg.id_column, "text_column": self.cfg.text_column,
                  "title_column": self.cfg.title_column, "dtype": self.cfg.encode.dtype,
                  "output_dtype": self.cfg.output_dtype, "input": self.cfg.input,
                  "incremental": incremental, "previous": self.cfg.previous,
                  "chunk_tokens": self.cfg.chunk_tokens, "chunk_overlap": self.cfg.chunk_overlap}
        existing = self.state.read_json("_state", "run.json")
        if existing is not None and existing != record:
            diff = sorted(k for k in record if existing.get(k) != record[k])
            raise InputError(f"{self.cfg.output} already holds a run with other settings "
                             f"({', '.join(diff)}); choose a new --output or delete it")
        if existing is None:
            self.state.write_json(record, "_state", "run.json")
        else:
            log.info("resuming the unfinished run in %s", self.cfg.output)

    def _remove_unreferenced(self) -> None:
        """Delete parts that no marker vouches for (a killed attempt's partial writes)."""
        keep = set(self.state.marked_parts())
        for marker in [*self.state.done_markers().values(),
                       *self.state.done_markers("kept").values()]:
            keep.update(marker.get("parts", []))
        removed = self.state.remove_unreferenced(keep)
        if removed:
            log.info("removed %d part files of unfinished input files", removed)

    # ------------------------------------------------------------------------ plan
    def _plan(self, chunks: list[Chunk], previous: list[str] | None) -> dict[str, Any]:
        """Exceptions by row key / id: duplicate losers, rows to encode, ids to drop."""
        path = self.state.uri("_state", PLAN_FILE)
        if self.state.fs.exists(self.state.path("_state", PLAN_FILE)):
            table = read_table(path)
        else:
            start = time.monotonic()
            table = compute_plan(chunks, self.cfg.stage_dict(), previous)
            if table is not None:
                write_table(table, path, self.state.fence)
            log.info("planned %d rows in %.1fs", sum(c.rows for c in chunks),
                     time.monotonic() - start)
        return _plan_sets(table, incremental=previous is not None)

    # ---------------------------------------------------------------- incremental
    def _copy_kept(self, previous: list[str], plan: dict[str, Any]) -> None:
        import ray

        done = self.state.done_markers("kept")
        todo = [p for p in previous if file_key(p) not in done]
        if not todo:
            return
        ds = ray.data.from_items([{"path": p} for p in todo],
                                 override_num_blocks=len(todo)).map_batches(
            copy_kept, batch_size=1, batch_format="numpy", num_cpus=0.5,
            fn_kwargs={"output": self.cfg.output, "id_column": self.cfg.id_column,
                       "drop_ids": plan["drop_ids"], "fence": self.state.fence})
        for row in ds.iter_rows():
            self.lease.check()
            self.state.write_json({"source": row["source"], "parts": [row["part"]],
                                   "rows": row["rows"], "chunks": row["chunks"]},
                                  "_state", "kept",
                                  f"{file_key(row['source'])}.json")

    # ---------------------------------------------------------------------- encode
    def _encode(self, pending: list[Chunk], plan: dict[str, Any]) -> None:
        import ray

        if not pending:
            return
        chunks_of: dict[str, set[int]] = defaultdict(set)
        for chunk in pending:
            chunks_of[chunk.path].add(chunk.index)
        # one block per chunk, so chunks spread over the whole actor pool
        ds = ray.data.from_items([c.to_dict() for c in pending],
                                 override_num_blocks=len(pending)).map_batches(
            read_for_encoding, batch_size=1, batch_format="numpy", num_cpus=0.5,
            fn_kwargs={"cfg": self.cfg.stage_dict(), "losers": plan["losers"],
                       "to_encode": plan["to_encode"], "fence": self.state.fence})
        ds = encode_dataset(ds, self.cfg.encode,
                            embedding_dtype=actor_dtype(self.cfg.output_dtype),
                            calibration=self.calibration)
        ds = ds.map_batches(
            write_encoded, batch_format="pyarrow", batch_size=None, num_cpus=0.25,
            fn_kwargs={"output": self.cfg.output, "id_column": self.cfg.id_column,
                       "vectors": self.vectors, "fence": self.state.fence})
        tracker = _FileTracker(self.state, chunks_of)
        progress = Progress(sum(c.rows for c in pending), "rows", self.cfg.log_every_s, log)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for summary in batch.to_pylist():
                self.lease.check()  # stop at once when lost (each write is fenced too)
                progress.advance(tracker.add(summary))
                self.stats["encoded"] += summary["docs"]
                self.stats["chunks"] += summary["written"]
                if summary["written"]:
                    self.nodes[summary["node"]] += summary["written"]
        progress.finish()
        missing = tracker.unfinished()
        if missing:
            raise RuntimeError(f"the stream ended with unfinished input files: {missing}")

    # -------------------------------------------------------------------- manifest
    def _manifest(self, model: dict[str, Any], files: list[str], plan: dict[str, Any],
                  started: str) -> dict[str, Any]:
        done = self.state.done_markers()
        kept = self.state.done_markers("kept")
        totals = defaultdict(int)
        for marker in done.values():
            for key in ("rows", "written", "chunks", "rejected", "truncated", "kept_rows"):
                totals[key] += marker.get(key, 0)
        manifest = {
            **model, "dtype": self.cfg.encode.dtype, **describe(self.vectors, model["dim"]),
            "input": self.cfg.input, "output": self.cfg.output, "mode": self.cfg.mode,
            "previous": self.cfg.previous, "id_column": self.cfg.id_column,
            "rows_in": totals["rows"], "rows_rejected": totals["rejected"],
            "rows_truncated": totals["truncated"], "rows_encoded": totals["written"],
            "rows_kept": sum(m["rows"] for m in kept.values()),
            "rows_dropped": plan["dropped"],
            "rows_encoded_this_attempt": self.stats["encoded"],
            "rows_encoded_by_node_this_attempt": dict(self.nodes),
            "seconds_this_attempt": dict(self.seconds),
            "input_files_done": sorted(m["file"] for m in done.values()),
            "chunk_tokens": self.cfg.chunk_tokens, "chunk_overlap": self.cfg.chunk_overlap,
            "started_at": started, "finished_at": _now(),
        }
        manifest["rows_written"] = manifest["rows_encoded"] + manifest["rows_kept"]
        if self.cfg.chunk_tokens is not None:  # output rows are chunks; rows_* count texts
            manifest["chunks_written"] = totals["chunks"] + sum(
                m.get("chunks", m["rows"]) for m in kept.values())
            manifest["chunks_encoded_this_attempt"] = self.stats["chunks"]
        if manifest["rows_in"] != manifest["rows_written"] + manifest["rows_rejected"]:
            raise RuntimeError(f"row accounting failed: {manifest}")
        self.state.write_json(manifest, MANIFEST)
        log.info("done: %d rows in, %d written (%d encoded, %d kept), %d rejected, "
                 "%d truncated, %d dropped; %d encoded in this attempt",
                 manifest["rows_in"], manifest["rows_written"], manifest["rows_encoded"],
                 manifest["rows_kept"], manifest["rows_rejected"], manifest["rows_truncated"],
                 manifest["rows_dropped"], manifest["rows_encoded_this_attempt"])
        return manifest


class _FileTracker:
    """Counts summaries per chunk; writes a file's done marker when all its chunks finish."""

    def __init__(self, state: OutputState, chunks_of: dict[str, set[int]]) -> None:
        self.state = state
        self.waiting = {path: set(indexes) for path, indexes in chunks_of.items()}
        self.written: dict[tuple[str, int], int] = defaultdict(int)
        self.files: dict[str, dict[str, Any]] = defaultdict(
            lambda: {"rows": 0, "written": 0, "chunks": 0, "rejected": 0, "truncated": 0,
                     "kept_rows": 0, "parts": []})
        self.seen: set[tuple[str, int]] = set()

    def add(self, summary: dict[str, Any]) -> int:
        """Record one part summary; returns the input rows it accounts for."""
        key = (summary["file"], summary["chunk"])
        record = self.files[summary["file"]]
        rows = summary["docs"]  # input texts done (several output rows each when chunked)
        if key not in self.seen:  # per-chunk counts arrive with every part: take them once
            self.seen.add(key)
            record["rejected"] += summary["rejected"]
            record["kept_rows"] += summary["kept"]
            if summary["rejects_file"]:
                record["parts"].append(f"_rejects/{summary['rejects_file']}")
            # what an earlier attempt wrote of this chunk (its part markers)
            record["written"] += summary["prior_docs"]
            record["chunks"] += summary["prior_rows"]
            record["parts"] += [p for p in summary["prior_parts"].split(",") if p]
            rows += summary["rejected"] + summary["kept"] + summary["prior_docs"]
        record["written"] += summary["docs"]
        record["chunks"] += summary["written"]
        record["truncated"] += summary["truncated"]
        record["rows"] += rows
        if summary["part"]:
            record["parts"].append(summary["part"])
        self.written[key] += summary["written"]  # output rows, against the rows emitted
        if self.written[key] == summary["emit"]:
            self._chunk_done(summary["file"], summary["chunk"])
        return rows

    def _chunk_done(self, path: str, index: int) -> None:
        self.waiting[path].discard(index)
        if not self.waiting[path]:
            del self.waiting[path]
            marker = {"file": path, **self.files.pop(path)}
            self.state.write_json(marker, "_state", "done", f"{file_key(path)}.json")

    def unfinished(self) -> list[str]:
        return sorted(self.waiting)


def _plan_sets(table: pa.Table | None, incremental: bool) -> dict[str, Any]:
    def keys(*kinds: str) -> frozenset[int]:
        if table is None:
            return frozenset()
        return frozenset(table.filter(pc.is_in(table.column("kind"), pa.array(kinds)))
                         .column("key").to_pylist())

    drop = [] if table is None else table.filter(
        pc.is_in(table.column("kind"), pa.array(["drop", "change"]))).column("id").to_pylist()
    dropped = 0 if table is None else int(pc.sum(pc.equal(table.column("kind"), "drop"))
                                          .as_py() or 0)
    return {"losers": keys("dup"), "to_encode": keys("encode", "change") if incremental
            else None, "drop_ids": drop, "dropped": dropped}
