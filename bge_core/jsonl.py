"""JSON Lines reading shared by the readers of corpora, queries and training data."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any


def iter_jsonl(lines: Iterable[str], where: str) -> Iterator[tuple[int, Any]]:
    """Parsed JSON values of the non-blank lines, with their 1-based line numbers.

    Raises:
        ValueError: a line is not valid JSON (the message names `where` and the line).
    """
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} row {number}: not valid JSON ({err.msg})") from None
