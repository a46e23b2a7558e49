"""A model folder at an fsspec URI (``s3://bucket/ft/``), fetched once per machine.

The copy lives in ``$BGE_RAY_CACHE`` (default ``~/.cache/bge-ray/models``) under a key made
of the URI and the listing of the folder (names, sizes, ETags or modification times), so a
checkpoint rewritten at the same URI is fetched again and an unchanged one never is. The
copy is downloaded to a temporary folder and renamed into place under a file lock: the
encode actors of one node that start together download it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import fsspec

log = logging.getLogger(__name__)


def is_remote(name_or_path: str) -> bool:
    """True for a URI with a protocol other than the local file system."""
    return "://" in name_or_path and not name_or_path.startswith("file://")


def cache_root() -> Path:
    return Path(os.environ.get("BGE_RAY_CACHE", "~/.cache/bge-ray/models")).expanduser()


def _listing(fs: fsspec.AbstractFileSystem, root: str) -> list[tuple[str, int, str]]:
    """(relative name, size, version tag) of every file under `root`, sorted."""
    found = fs.find(root, detail=True)
    out = []
    for path, info in found.items():
        if path.endswith("/") or info.get("type") == "directory":  # folder markers
            continue
        tag = info.get("ETag") or info.get("etag") or info.get("mtime") or \
            info.get("LastModified") or ""
        out.append((path[len(root):].lstrip("/"), int(info.get("size") or 0), str(tag)))
    return sorted(out)


def fetch_folder(uri: str) -> Path:
    """A local copy of the folder at `uri` (downloaded on first use, then reused).

    Raises:
        FileNotFoundError: nothing at `uri`, naming it.
    """
    fs, root = fsspec.core.url_to_fs(uri.rstrip("/"))
    listing = _listing(fs, root) if fs.exists(root) else []
    if not listing:
        raise FileNotFoundError(f"model {uri!r}: no files there (a saved checkpoint folder "
                                "is expected)")
    key = hashlib.sha256(json.dumps([uri.rstrip("/"), listing]).encode()).hexdigest()[:24]
    target = cache_root() / key
    if target.is_dir():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_dir():  # another process fetched it while this one waited
            return target
        log.info("fetching model %s (%d files) into %s", uri, len(listing), target)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{key}-"))
        try:
            for name, _, _ in listing:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{root}/{name}", str(tmp / name))
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
