"""Output side of bulk embedding: part files, rejects, done markers, manifest.

Layout under ``--output`` (readers of the embeddings see only ``part-*.parquet``; names
starting with ``_`` are skipped by Parquet dataset readers)::

    part-<filekey>-c<chunk>-<key>-<n>.parquet  id, [chunk, start_char, end_char,] embedding,
                                             text_hash (chunk columns with --chunk-tokens)
    part-kept-<prevkey>.parquet              rows carried over by an incremental run
    _rejects/<filekey>-c<chunk>.parquet      id, source_file, row, reason
    _state/run.json                          model fingerprint + settings of this output
    _state/plan.parquet                      duplicate / incremental decisions (exceptions)
    _state/parts/<filekey>-c<chunk>/<part>   (row key, chunk) pairs of each part written
                                             (a write task records its part at once)
    _state/done/<filekey>.json               one marker per finished input file
    _manifest.json                           written last: what the output holds
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from bge_core.storage import as_uris, naming, write_then_move
from pipelines.common.lease import Fence

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"


class OutputState:
    """Durable progress of one output location (local path or fsspec URI).

    With a `fence` (the run's lease), every write and deletion first checks that this run
    still holds the output, and raises `pipelines.common.lease.LeaseLost` if not.
    """

    def __init__(self, uri: str, fence: Fence | None = None) -> None:
        self.uri_root = uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri_root)
        self.fence = fence

    def path(self, *parts: str) -> str:
        """Path inside `self.fs` (no protocol), for calls on the filesystem object."""
        return "/".join([self.root, *parts])

    def uri(self, *parts: str) -> str:
        """Full URI (protocol kept), for functions that open paths themselves."""
        return "/".join([self.uri_root, *parts])

    def read_json(self, *parts: str) -> dict[str, Any] | None:
        path = self.path(*parts)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "r") as handle:
            return json.load(handle)

    def write_json(self, data: dict[str, Any], *parts: str) -> None:
        """Write via a temporary name then move, so a marker is never half-written."""
        path = self.path(*parts)
        with naming(self.uri(*parts), "write"), _fenced(self.fs, path, self.fence) as tmp:
            with self.fs.open(tmp, "w") as handle:
                json.dump(data, handle, indent=2, default=str)

    def done_markers(self, kind: str = "done") -> dict[str, dict[str, Any]]:
        """Finished units (input files or previous parts): key → marker contents."""
        folder = self.path("_state", kind)
        if not self.fs.exists(folder):
            return {}
        markers = {}
        for path in self.fs.ls(folder, detail=False):
            if path.endswith(".json"):
                with self.fs.open(path, "r") as handle:
                    markers[path.rsplit("/", 1)[1][:-5]] = json.load(handle)
        return markers

    def marked_parts(self) -> list[str]:
        """Parts that a write task recorded as complete (``_state/parts/<chunk>/<part>``)."""
        folder = self.path("_state", "parts")
        if not self.fs.exists(folder):
            return []
        return [path.rsplit("/", 1)[1] for path in self.fs.find(folder)
                if path.rsplit("/", 1)[1].startswith("part-")]

    def remove_unreferenced(self, keep: set[str]) -> int:
        """Delete data and reject parts not listed in `keep` (paths relative to the output
        root): parts of unfinished input files, or left by a killed attempt."""
        removed = 0
        if self.fence is not None:
            self.fence.check(self.fs)
        for folder in ("", "_rejects"):
            path = self.path(folder) if folder else self.root
            if not self.fs.exists(path):
                continue
            for item in self.fs.ls(path, detail=False):
                name = item.rsplit("/", 1)[1]
                relative = f"{folder}/{name}" if folder else name
                if name.endswith(".parquet") and relative not in keep:
                    self.fs.rm(item)
                    removed += 1
        return removed


def _fenced(fs: fsspec.AbstractFileSystem, path: str,
            fence: Fence | None = None) -> contextlib.AbstractContextManager[str]:
    """`write_then_move`, the lease checked (with a `fence`) between the write and the
    move: the temporary file's mtime is the store's "now"."""
    check = None if fence is None else functools.partial(fence.check, fs)
    return write_then_move(fs, path, check)


def write_table(table: pa.Table, uri: str, fence: Fence | None = None) -> None:
    """Write one Parquet file to a local path or fsspec URI (temp name, then move).

    Raises:
        LeaseLost: `fence` says this run no longer holds the output (nothing is written).
        StorageError: the write failed for good (disk full, permission denied, a store
            that stays down), naming `uri` and the cause.
    """
    fs, path = fsspec.core.url_to_fs(uri)
    with naming(uri, "write"), _fenced(fs, path, fence) as tmp:
        with fs.open(tmp, "wb") as handle:
            pq.write_table(table, handle)


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = fsspec.core.url_to_fs(uri)
    with naming(uri, "read"), fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns)


def list_parts(uri: str) -> list[str]:
    """Data part files of a finished output, as URIs."""
    fs, root = fsspec.core.url_to_fs(uri.rstrip("/"))
    if not fs.exists(root):
        return []
    names = sorted(p for p in fs.ls(root, detail=False)
                   if p.rsplit("/", 1)[1].startswith("part-") and p.endswith(".parquet"))
    return as_uris(fs, names, uri)


def reject_table(ids: list[Any], source: str, rows: list[int], reasons: list[str]) -> pa.Table:
    """Rejected rows: ids as strings (input types vary), source file, row number, reason."""
    return pa.table({
        "id": pa.array([None if i is None else str(i) for i in ids], type=pa.string()),
        "source_file": pa.array([source] * len(ids), type=pa.string()),
        "row": pa.array(rows, type=pa.int64()),
        "reason": pa.array(reasons, type=pa.string()),
    })
