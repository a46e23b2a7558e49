"""`embed_corpus.py --format lance`: a Lance table kept exactly in step with the corpus.

The run is the Parquet job (`EmbedJob`: plan, resume, encode, rejects, manifest) writing
its parts into a work folder inside the table, ``T/_embed/run/``, then one commit that
applies them to the table:

- full run (or no table yet, or the model / chunking / output dtype changed): the parts
  overwrite the table (``lance.write_dataset(mode="overwrite")``);
- ``--mode incremental``: the plan diffs the corpus against the table's ``(id,
  text_hash)``; the parts (new and changed rows) are merged on ``id`` (``id, chunk`` when
  chunked) and, in the same commit, rows of ids gone from the corpus, and stale chunks of
  changed ones, are deleted (``merge_insert ... when_not_matched_by_source_delete``).

A reader sees the table before or after the run, never between. Kill -9 anywhere, then
rerun: before the commit the rerun resumes the Parquet job, then commits; the commit is
atomic; after it, ``_state/applying.json`` (the version before the commit) tells the rerun
it happened, so it only finishes (index, ``T/_manifest.json``, clean-up). The work folder
is emptied when a run finishes; its ``_state/run.json`` goes first, and a work folder
without one is stale and wiped before a run starts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipelines.common.lease import LEASE_FILE
from pipelines.embed.config import EmbedConfig
from pipelines.embed.job import PLAN_FILE, EmbedJob
from pipelines.embed.lance_table import (
    build_index,
    has_vector_index,
    open_table,
    sql_in,
    storage_options,
)
from pipelines.embed.output import MANIFEST, OutputState, list_parts, read_table, write_table

log = logging.getLogger("embed_corpus")
WORK = "_embed/run"
APPLYING = "applying.json"


class LanceEmbedJob(EmbedJob):
    """One `--format lance` run (see the module docstring)."""

    def __init__(self, cfg: EmbedConfig) -> None:
        self.table_uri = cfg.output.rstrip("/")
        self.lance_cfg = cfg
        table = open_table(self.table_uri)
        incremental = cfg.mode == "incremental" and table is not None
        if cfg.mode == "incremental" and table is None:
            log.info("%s holds no table yet: this run creates it", self.table_uri)
        # the Parquet job in the work folder, diffing against the table when incremental
        super().__init__(replace(cfg, format="parquet", index="none",
                                 output=f"{self.table_uri}/{WORK}",
                                 mode="incremental" if incremental else "full",
                                 previous=self.table_uri if incremental else None))
        self.table_state = OutputState(self.table_uri)

    # ------------------------------------------------------------------ the run
    def _run(self) -> dict[str, Any]:
        if self.state.read_json("_state", "run.json") is None:
            self._wipe_work()  # a finished run's leftovers, or nothing
        staged = self.state.read_json(MANIFEST)
        if staged is None:
            staged = super()._run()  # parts + the work folder's manifest
        before = self.state.read_json("_state", APPLYING)
        if before is None or not self._committed_since(before["version"]):
            before = self._apply(staged)
        return self._finish(staged, before["version"])

    def _committed_since(self, version: int) -> bool:
        table = open_table(self.table_uri)
        return table is not None and table.latest_version > version

    def _apply(self, staged: dict[str, Any]) -> dict[str, Any]:
        """One commit: overwrite, or merge + delete; records the version it started from."""
        import lance

        table = open_table(self.table_uri)
        before = {"version": table.latest_version if table is not None else 0}
        self.state.write_json(before, "_state", APPLYING)
        start = time.monotonic()
        parts = list_parts(self.cfg.output)
        if self.state.read_json("_state", "run.json")["incremental"]:  # diffed, not re-embedded
            delete = self._plan_ids(("drop", "change"))
            if parts or delete:
                commit_merge(table, self._reader(parts), self._keys(), self.cfg.id_column,
                             delete)
        elif parts:
            lance.write_dataset(self._reader(parts), self.table_uri,
                                mode="overwrite" if table is not None else "create",
                                storage_options=storage_options(self.table_uri))
        self.attempt.seconds["commit"] = round(time.monotonic() - start, 3)
        return before

    def _finish(self, staged: dict[str, Any], version_before: int) -> dict[str, Any]:
        table = open_table(self.table_uri)
        if table is None:
            raise RuntimeError(f"{self.table_uri}: no table after the run (empty corpus?)")
        index = self._index(table, staged)
        table = open_table(self.table_uri)
        expected = staged.get("chunks_written", staged["rows_written"])
        if table.count_rows() != expected:
            raise RuntimeError(f"{self.table_uri}: the table holds {table.count_rows()} rows "
                               f"after the run, the run accounts for {expected}")
        manifest = {**staged, "format": "lance", "output": self.table_uri,
                    "mode": self.lance_cfg.mode, "previous": None,
                    "table_version": table.latest_version,
                    "table_versions_created": table.latest_version - version_before,
                    "table_rows": table.count_rows(), "index": index,
                    "seconds_this_attempt": {**staged.get("seconds_this_attempt", {}),
                                             **self.attempt.seconds}}
        self.table_state.write_json(manifest, MANIFEST)
        self._keep_rejects()
        self.state.fs.rm(self.state.path("_state", "run.json"))  # the run is finished
        self._wipe_work()
        log.info("table %s: version %d, %d rows (%d versions created by this run)",
                 self.table_uri, table.latest_version, table.count_rows(),
                 manifest["table_versions_created"])
        return manifest

    def _index(self, table: Any, staged: dict[str, Any]) -> dict[str, Any] | None:
        """Build the index (full run, or another `--index` kind than the table's), or add
        the new rows to the one the table has (incremental run)."""
        kind = self.lance_cfg.index
        # the index the previous run built (T/_manifest.json is rewritten after this)
        built = (self.table_state.read_json(MANIFEST) or {}).get("index") or {}
        indexed = has_vector_index(table)
        keep = indexed and (kind == "none" or (staged["rows_kept"] and
                                               built.get("kind", kind) == kind))
        if not keep and kind == "none":
            return None
        if not keep:
            return build_index(table, kind, bool(staged.get("normalize", True)))
        start = time.monotonic()
        table.optimize.optimize_indices()
        self.attempt.seconds["index"] = round(time.monotonic() - start, 3)
        return built or None

    # ------------------------------------------------- the Parquet job's hooks
    def _previous_parts(self, fingerprint: str) -> list[str] | None:
        """The table's (id, text_hash) as key files for the plan (none if it is cached)."""
        if super()._previous_parts(fingerprint) is None:
            return None
        if self.state.fs.exists(self.state.path("_state", PLAN_FILE)):
            return []
        table = open_table(self.table_uri)
        columns = [self.cfg.id_column, "text_hash"]
        paths = []
        for n, batch in enumerate(table.to_batches(columns=columns, batch_size=1_000_000)):
            path = self.state.uri("_state", "previous", f"keys-{n}.parquet")
            write_table(pa.Table.from_batches([batch]), path)
            paths.append(path)
        return paths

    def _copy_kept(self, previous: list[str], plan: dict[str, Any]) -> None:
        """Unchanged rows stay in the table: count them (the manifest's rows_kept)."""
        if self.state.done_markers("kept"):
            return
        table = open_table(self.table_uri)
        chunked = self.cfg.chunking.enabled
        gone = pa.array(plan["drop_ids"], table.schema.field(self.cfg.id_column).type)
        rows = docs = 0
        columns = [self.cfg.id_column] + (["chunk"] if chunked else [])
        for batch in table.to_batches(columns=columns):
            kept = pc.invert(pc.is_in(batch.column(0), value_set=gone))
            rows += pc.sum(kept).as_py() or 0
            first = pc.and_(kept, pc.equal(batch.column(1), 0)) if chunked else kept
            docs += pc.sum(first).as_py() or 0
        self.state.write_json({"source": self.table_uri, "parts": [], "rows": docs,
                               "chunks": rows}, "_state", "kept", "table.json")

    # ------------------------------------------------------------------ helpers
    def _plan_ids(self, kinds: tuple[str, ...]) -> list[Any]:
        plan = read_table(self.state.uri("_state", PLAN_FILE))
        chosen = plan.filter(pc.is_in(plan.column("kind"), pa.array(kinds)))
        return chosen.column("id").to_pylist()

    def _keys(self) -> list[str]:
        return [self.cfg.id_column] + (["chunk"] if self.cfg.chunking.enabled else [])

    def _reader(self, parts: list[str]) -> pa.RecordBatchReader:
        """The parts as one stream (the driver holds a batch at a time)."""
        fs, _ = fsspec.core.url_to_fs(self.cfg.output)
        paths = [fsspec.core.url_to_fs(p)[1] for p in parts]
        return pads.dataset(paths, format="parquet", filesystem=fs).scanner().to_reader()

    def _keep_rejects(self) -> None:
        """This run's rejects move to ``T/_rejects/`` (the previous run's are replaced)."""
        fs = self.state.fs
        target = self.table_state.path("_rejects")
        if fs.exists(target):
            fs.rm(target, recursive=True)
        source = self.state.path("_rejects")
        if fs.exists(source):
            fs.copy(source, target, recursive=True)

    def _wipe_work(self) -> None:
        """Empty the work folder, keeping only the lease this run holds."""
        fs, root = self.state.fs, self.state.root
        if not fs.exists(root):
            return
        lease = self.state.path(LEASE_FILE)
        for item in fs.find(root):
            if item.rstrip("/") != lease.rstrip("/"):
                fs.rm(item)


def commit_merge(table: Any, reader: pa.RecordBatchReader, keys: list[str], id_column: str,
                 delete_ids: list[Any]) -> None:
    """One commit: upsert `reader`'s rows on `keys`; delete the table's rows of
    `delete_ids` that the source does not match (ids gone, stale chunks of changed ids)."""
    builder = table.merge_insert(keys).when_matched_update_all().when_not_matched_insert_all()
    if delete_ids:
        builder = builder.when_not_matched_by_source_delete(sql_in(id_column, delete_ids))
    builder.execute(reader)
