"""A local output that fills up or refuses writes (ENOSPC, EACCES).

How it is simulated: a size-limited filesystem or a read-only mount needs root, and the
suite runs as root, where a read-only directory does not refuse anything. So the
`OSError` is injected at the one write call every output file goes through,
`pyarrow.parquet.write_table` inside `pipelines.embed.output.write_table`, after it has
written half a file (as a real ENOSPC does). The write task then fails with a message
naming the file and the cause, leaves no part or temporary file behind and marks nothing
done; a rerun after the space is freed finishes exactly-once.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bge_core.storage import StorageError
from pipelines.common.corpus_io import plan_file
from pipelines.common.encode import vectors_to_arrow
from pipelines.embed.stages import read_for_encoding, write_encoded
from tests.embed_helpers import write_corpus

CAUSES = {errno.ENOSPC: "no space left on the device", errno.EACCES: "permission denied"}


def _encoded_chunk(corpus: Path, output: Path) -> pa.Table:
    """What the write stage receives for the first chunk: rows with vectors."""
    path = str(sorted(corpus.glob("*.parquet"))[0])
    chunk = plan_file(path, 0, 100, ["id", "text"])[0]
    cfg = {"id_column": "id", "text_column": "text", "title_column": None,
           "output": str(output)}
    rows = read_for_encoding({k: [v] for k, v in chunk.to_dict().items()}, cfg,
                             frozenset(), None)
    vectors = np.random.default_rng(0).standard_normal((rows.num_rows, 4)).astype("float32")
    rows = rows.append_column("embedding", vectors_to_arrow(vectors))
    return rows.append_column("truncated", pa.array([False] * rows.num_rows))


def _fail_on_write(monkeypatch: pytest.MonkeyPatch, code: int, after: int = 0) -> None:
    """The `after`+1-th Parquet write stops halfway with OSError(`code`)."""
    real = pq.write_table
    calls = {"n": 0}

    def write(table: pa.Table, where: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] <= after:
            return real(table, where, **kwargs)
        where.write(b"PAR1" + b"\0" * 100)  # half a file reaches the disk
        raise OSError(code, "simulated")

    monkeypatch.setattr("pipelines.embed.output.pq.write_table", write)


def _files(output: Path) -> list[str]:
    return sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.is_file())


@pytest.mark.parametrize("code", sorted(CAUSES))
def test_a_failed_part_write_names_the_file_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    write_corpus(tmp_path / "c", files=1, rows=6)
    out = tmp_path / "out"
    batch = _encoded_chunk(tmp_path / "c", out)
    _fail_on_write(monkeypatch, code)
    with pytest.raises(StorageError, match=rf"^cannot write {out}/part-\S+\.parquet: "
                       rf"{CAUSES[code]}; .*then rerun"):
        write_encoded(batch, str(out), "id")
    assert _files(out) == []  # no part, no half-written temporary file, no marker


@pytest.mark.long  # a whole job: tens of seconds on the shared 2-core box
def test_a_part_without_its_marker_is_redone_exactly_once(
        ray_session, tiny_bert_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills between a part and its marker: the part is complete but not vouched
    for; once space is freed the rerun deletes it and writes every row once."""
    from pipelines.common.cli import make_config
    from pipelines.embed.main import EmbedConfig, run
    from tests.embed_helpers import read_output

    write_corpus(tmp_path / "c", files=2, rows=6)
    out = tmp_path / "out"
    batch = _encoded_chunk(tmp_path / "c", out)
    _fail_on_write(monkeypatch, errno.ENOSPC, after=1)  # the part is written, its marker not
    with pytest.raises(StorageError, match=rf"cannot write {out}/_state/parts/"):
        write_encoded(batch, str(out), "id")
    assert [f for f in _files(out) if "_state" in f] == []  # nothing marked done
    orphan = [f for f in _files(out) if f.startswith("part-")]
    assert len(orphan) == 1
    monkeypatch.undo()  # space freed
    result = run(make_config(EmbedConfig, input=str(tmp_path / "c"), output=str(out),
                             model=str(tiny_bert_dir), cpus_per_actor=0.5))
    assert result["rows_in"] == result["rows_written"] == result[
        "rows_encoded_this_attempt"] == 12
    assert len(read_output(out)) == 12  # each id once (read_output checks)
    print("FAULTS disk-full " + json.dumps({
        "rows_in": result["rows_in"], "written": result["rows_written"],
        "rejected": result["rows_rejected"],
        "encoded_by_rerun": result["rows_encoded_this_attempt"]}))
