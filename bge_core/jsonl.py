"""JSON Lines from an open text stream (BEIR files, mining inputs), parsed by the same rule
as `bge_core.io` reads data files in ranges, and text files opened the same way at a local
path or any fsspec URI (``s3://...``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import IO, Any

from bge_core.io import parse_line


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


def iter_jsonl(lines: Iterable[str], where: str) -> Iterator[tuple[int, Any]]:
    """Parsed JSON values of the non-blank lines, with their 1-based line numbers.

    Raises:
        ValueError: a line is not valid JSON (the message names `where` and the line).
    """
    for number, line in enumerate(lines, start=1):
        value, error = parse_line(line)
        if error:
            raise ValueError(f"{where} line {number}: {error}")
        if error is None:  # "" is a blank line
            yield number, value
