"""Text files opened the same way at a local path or any fsspec URI (``s3://...``): the
outputs every job writes, and the TSV/CSV inputs (qrels, STS). JSONL inputs are read by
`bge_core.io`."""

from __future__ import annotations

from typing import IO


def open_text(uri: str, mode: str = "r", what: str = "file") -> IO[str]:
    """Open a local path or fsspec URI as UTF-8 text; writing creates parent folders.

    Raises:
        FileNotFoundError: reading a file that is not there (the message names `what`).
    """
    import fsspec

    uri = str(uri)
    if "r" in mode:
        fs, path = fsspec.core.url_to_fs(uri)
        if not fs.isfile(path):
            raise FileNotFoundError(f"{what} not found: {uri}")
    return fsspec.open(uri, mode, encoding="utf-8", newline="", auto_mkdir="w" in mode).open()
