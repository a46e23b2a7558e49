"""The embed job's last word: ``_manifest.json``, built from the done markers.

The counts come from the markers of every input file (`accounting.FileTracker`) and of
every kept previous part, so a resumed run reports the whole output, not its last attempt;
the ``*_this_attempt`` fields are the attempt's own (`AttemptStats`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pipelines.embed.accounting import PartSummary
from pipelines.embed.config import EmbedConfig
from pipelines.embed.output import MANIFEST, OutputState
from pipelines.embed.quantize import describe

log = logging.getLogger("embed_corpus")
_MARKER_COUNTS = ("rows", "written", "chunks", "rejected", "truncated", "kept_rows")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class AttemptStats:
    """What this attempt did (a resumed run counts only its own work here).

    Args:
        encoded: input texts encoded. chunks: output rows encoded (windows when chunking).
        by_node: output rows encoded per Ray node. seconds: wall time per stage.
    """

    encoded: int = 0
    chunks: int = 0
    by_node: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, summary: PartSummary) -> None:
        self.encoded += summary.docs
        self.chunks += summary.written
        if summary.written:
            self.by_node[summary.node] += summary.written


def write_manifest(cfg: EmbedConfig, state: OutputState, model: dict[str, Any],
                   vectors: dict[str, Any], dropped: int, attempt: AttemptStats,
                   started: str) -> dict[str, Any]:
    """Check that every input row is accounted for (written or rejected), write the
    manifest and return it."""
    done = state.done_markers()
    kept = state.done_markers("kept")
    totals: dict[str, int] = defaultdict(int)
    for marker in done.values():
        for key in _MARKER_COUNTS:
            totals[key] += marker.get(key, 0)
    manifest = {
        **model, "dtype": cfg.encode.dtype, **describe(vectors, model["dim"]),
        "input": cfg.input, "output": cfg.output, "mode": cfg.mode,
        "previous": cfg.previous, "id_column": cfg.id_column,
        "rows_in": totals["rows"], "rows_rejected": totals["rejected"],
        "rows_truncated": totals["truncated"], "rows_encoded": totals["written"],
        "rows_kept": sum(m["rows"] for m in kept.values()),
        "rows_dropped": dropped,
        "rows_encoded_this_attempt": attempt.encoded,
        "rows_encoded_by_node_this_attempt": dict(attempt.by_node),
        "seconds_this_attempt": dict(attempt.seconds),
        "input_files_done": sorted(m["file"] for m in done.values()),
        "chunk_tokens": cfg.chunking.chunk_tokens, "chunk_overlap": cfg.chunking.chunk_overlap,
        "started_at": started, "finished_at": now(),
    }
    manifest["rows_written"] = manifest["rows_encoded"] + manifest["rows_kept"]
    if cfg.chunking.enabled:  # output rows are chunks; rows_* count texts
        manifest["chunks_written"] = totals["chunks"] + sum(
            m.get("chunks", m["rows"]) for m in kept.values())
        manifest["chunks_encoded_this_attempt"] = attempt.chunks
    if manifest["rows_in"] != manifest["rows_written"] + manifest["rows_rejected"]:
        raise RuntimeError(f"row accounting failed: {manifest}")
    state.write_json(manifest, MANIFEST)
    log.info("done: %d rows in, %d written (%d encoded, %d kept), %d rejected, "
             "%d truncated, %d dropped; %d encoded in this attempt",
             manifest["rows_in"], manifest["rows_written"], manifest["rows_encoded"],
             manifest["rows_kept"], manifest["rows_rejected"], manifest["rows_truncated"],
             manifest["rows_dropped"], manifest["rows_encoded_this_attempt"])
    return manifest
