"""Input checks and corpus text assembly shared by encoding and the jobs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def check_texts(texts: Sequence[Any]) -> list[str]:
    """Return `texts` as a list, or raise `TypeError` naming the first non-string item."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(f"expected a list of strings, got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
    return list(texts)


def join_title(title: str | None, text: str) -> str:
    """BEIR/FlagEmbedding corpus text: ``title + " " + text``, no stray space if untitled."""
    return f"{title} {text}".strip() if title else text


def corpus_texts(corpus: Sequence[str | Mapping[str, Any]]) -> list[str]:
    """Strings pass through; ``{"title", "text"}`` dicts are joined with `join_title`."""
    out: list[Any] = []
    for i, item in enumerate(corpus):
        if isinstance(item, Mapping):
            if not isinstance(item.get("text"), str):
                raise TypeError(f"corpus[{i}] has no string 'text' field")
            out.append(join_title(item.get("title"), item["text"]))
        else:
            out.append(item)
    return check_texts(out)
