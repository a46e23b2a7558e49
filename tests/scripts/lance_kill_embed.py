"""`embed_corpus.py` that dies (exit 137, as under kill -9) at one point of its Lance commit.

    python tests/scripts/lance_kill_embed.py during|after  <embed_corpus.py flags>

``during``: the commit's data files are written but the commit is not (the process dies
between Lance writing fragments and its manifest); ``after``: the commit is made, then the
process dies before the run records anything more. The hook lives here, not in the job.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lance  # noqa: E402
import lance.fragment  # noqa: E402

import pipelines.embed.lance as embed_lance  # noqa: E402
from pipelines.embed.main import main  # noqa: E402

PHASE = sys.argv.pop(1)
real_write, real_merge = lance.write_dataset, embed_lance.commit_merge


def write_dataset(reader, uri, **kwargs):  # full run: overwrite / create
    if PHASE == "during":
        lance.fragment.write_fragments(reader, uri)  # data files, no manifest
    else:
        real_write(reader, uri, **kwargs)
    os._exit(137)


def commit_merge(table, reader, keys, id_column, delete_ids):  # incremental run
    if PHASE == "during":
        builder = table.merge_insert(keys).when_matched_update_all()
        builder.when_not_matched_insert_all().execute_uncommitted(reader)
    else:
        real_merge(table, reader, keys, id_column, delete_ids)
    os._exit(137)


lance.write_dataset = write_dataset
embed_lance.commit_merge = commit_merge
sys.exit(main())
