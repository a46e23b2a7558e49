"""Driver of the bulk embedding job: plan, resume, run the Ray Data stream, write manifest.

`EmbedJob.run` reads top-down in three parts: **plan** (input files and chunks, the model's
record, the previous output to diff against, the plan of exceptions), **run** (copy kept
rows, resume from the markers, encode the pending chunks) and **finish** (the manifest,
`pipelines.embed.manifest`). The driver holds only per-file counters
(`pipelines.embed.accounting`) and the plan's exceptions (duplicate ids; in incremental
runs the changed/new rows and dropped ids), never rows or vectors.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from bge_core.progress import Progress
from bge_core.storage import StorageError, check_reachable, find_storage_error, naming
from pipelines.common.corpus_io import Chunk, InputError, file_key, list_input_files, plan_files
from pipelines.common.encode import encode_dataset
from pipelines.common.lease import LeaseLost, OutputLease, find_lease_lost, release_quietly
from pipelines.embed.accounting import FileTracker, PartSummary
from pipelines.embed.config import EmbedConfig
from pipelines.embed.manifest import AttemptStats, now, write_manifest
from pipelines.embed.model_info import calibration_texts, describe_model
from pipelines.embed.output import MANIFEST, OutputState, list_parts, read_table, write_table
from pipelines.embed.plan import compute_plan
from pipelines.embed.quantize import actor_dtype, vector_spec
from pipelines.embed.stages import copy_kept, read_for_encoding, write_encoded

log = logging.getLogger("embed_corpus")
PLAN_FILE = "plan.parquet"
T = TypeVar("T")


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
        self.attempt = AttemptStats()
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
        started = now()
        files = list_input_files(self.cfg.input)
        required = [self.cfg.id_column, self.cfg.text_column]
        chunks = plan_files(files, self.cfg.chunk_rows, required)  # Ray tasks, one per file
        model, previous = self._prepare(chunks)
        plan = self._timed("plan", self._plan, chunks, previous)
        pending = self._resume(files, chunks, previous, plan)
        self._timed("encode", self._encode, pending, plan)
        manifest = write_manifest(self.cfg, self.state, model, self.vectors, plan["dropped"],
                                  self.attempt, started)
        self._remove_unreferenced()
        return manifest

    def _timed(self, stage: str, step: Callable[..., T], *args: Any) -> T:
        start = time.monotonic()
        result = step(*args)
        self.attempt.seconds[stage] = round(time.monotonic() - start, 3)
        return result

    # ======================================================================== plan
    def _prepare(self, chunks: list[Chunk]) -> tuple[dict[str, Any], list[str] | None]:
        """The model's record and the previous output's parts (None: a full run); claims
        the output for them (a resumed run must match)."""
        self.calibration = calibration_texts(self.cfg, chunks)
        model = describe_model(self.cfg, self.calibration)
        previous = self._previous_parts(model["model_fingerprint"])
        self._claim_output(model, incremental=previous is not None)
        return model, previous

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
        chunking = (self.cfg.chunking.chunk_tokens, self.cfg.chunking.chunk_overlap)
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
                  "chunk_tokens": self.cfg.chunking.chunk_tokens,
                  "chunk_overlap": self.cfg.chunking.chunk_overlap}
        existing = self.state.read_json("_state", "run.json")
        if existing is not None and existing != record:
            diff = sorted(k for k in record if existing.get(k) != record[k])
            raise InputError(f"{self.cfg.output} already holds a run with other settings "
                             f"({', '.join(diff)}); choose a new --output or delete it")
        if existing is None:
            self.state.write_json(record, "_state", "run.json")
        else:
            log.info("resuming the unfinished run in %s", self.cfg.output)

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

    # ========================================================================= run
    def _resume(self, files: list[str], chunks: list[Chunk], previous: list[str] | None,
                plan: dict[str, Any]) -> list[Chunk]:
        """Copy the kept rows, drop a killed attempt's unvouched parts; the chunks of the
        input files not done yet."""
        if previous is not None:
            self._copy_kept(previous, plan)
        done = self.state.done_markers()
        self._remove_unreferenced()
        pending = [c for c in chunks if file_key(c.path) not in done]
        self.vectors = vector_spec(self.cfg, self.state, pending, self.previous_manifest)
        log.info("%d input files, %d already done; %d rows to read",
                 len(files), len(done), sum(c.rows for c in pending))
        return pending

    def _copy_kept(self, previous: list[str], plan: dict[str, Any]) -> None:
        """Incremental: copy the previous parts minus dropped and changed ids, one Ray task
        and one ``_state/kept`` marker per part."""
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

    def _encode(self, pending: list[Chunk], plan: dict[str, Any]) -> None:
        """Stream the pending chunks through read → encode → write; write each input
        file's done marker as its last chunk is written."""
        if not pending:
            return
        chunks_of: dict[str, set[int]] = defaultdict(set)
        for chunk in pending:
            chunks_of[chunk.path].add(chunk.index)
        tracker = FileTracker(self.state, chunks_of)
        progress = Progress(sum(c.rows for c in pending), "rows", self.cfg.log_every_s, log)
        for batch in self._stream(pending, plan).iter_batches(batch_size=None,
                                                              batch_format="pyarrow"):
            for row in batch.to_pylist():
                self.lease.check()  # stop at once when lost (each write is fenced too)
                summary = PartSummary.from_row(row)
                progress.advance(tracker.add(summary))
                self.attempt.add(summary)
        progress.finish()
        missing = tracker.unfinished()
        if missing:
            raise RuntimeError(f"the stream ended with unfinished input files: {missing}")

    def _stream(self, pending: list[Chunk], plan: dict[str, Any]) -> Any:
        """The Ray Dataset of part summaries (`accounting.SUMMARY_SCHEMA`), lazily."""
        import ray

        # one block per chunk, so chunks spread over the whole actor pool
        ds = ray.data.from_items([c.to_dict() for c in pending],
                                 override_num_blocks=len(pending)).map_batches(
            read_for_encoding, batch_size=1, batch_format="numpy", num_cpus=0.5,
            fn_kwargs={"cfg": self.cfg.stage_dict(), "losers": plan["losers"],
                       "to_encode": plan["to_encode"], "fence": self.state.fence})
        ds = encode_dataset(ds, self.cfg.encode,
                            embedding_dtype=actor_dtype(self.cfg.output_dtype),
                            calibration=self.calibration)
        return ds.map_batches(
            write_encoded, batch_format="pyarrow", batch_size=None, num_cpus=0.25,
            fn_kwargs={"output": self.cfg.output, "id_column": self.cfg.id_column,
                       "vectors": self.vectors, "fence": self.state.fence})

    # ====================================================================== finish
    def _remove_unreferenced(self) -> None:
        """Delete parts that no marker vouches for (a killed attempt's partial writes):
        before encoding (resume) and after the manifest (finish)."""
        keep = set(self.state.marked_parts())
        for marker in [*self.state.done_markers().values(),
                       *self.state.done_markers("kept").values()]:
            keep.update(marker.get("parts", []))
        removed = self.state.remove_unreferenced(keep)
        if removed:
            log.info("removed %d part files of unfinished input files", removed)


def _plan_sets(table: pa.Table | None, incremental: bool) -> dict[str, Any]:
    """The plan table as the stages use it: duplicate losers and (incremental) rows to
    encode by row key, ids to drop, and how many ids the corpus lost."""
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
