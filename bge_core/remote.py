"""A model folder at an fsspec URI (``s3://bucket/ft/``), fetched once per machine.

Only what loading needs is fetched (`needed_files`): the weights (safetensors / bin),
tokenizer files and configs at the top of the folder (this project's ``bge_config.json``
included), and the sentence-transformers module folders ``modules.json`` names
(``1_Pooling/``...). A training job's ``--output_dir`` also holds its run folder
(``<run_name>/checkpoint_step_*/`` with optimizer and RNG state) and its lease: none of that
is listed, let alone fetched; nor are optimizer, scheduler or trainer-state files.

The copy lives in ``$BGE_RAY_CACHE`` (default ``~/.cache/bge-ray/models``) under a key made
of the URI and the listing of those files (names, sizes, ETags or modification times), so a
model rewritten at the same URI is fetched again and an unchanged one never is (a new
checkpoint beside it changes nothing). The copy is downloaded to a temporary folder and
renamed into place under a file lock: the encode actors of one node that start together
download it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import fsspec

from bge_core.storage import write_then_move

log = logging.getLogger(__name__)


def cache_root() -> Path:
    return Path(os.environ.get("BGE_RAY_CACHE", "~/.cache/bge-ray/models")).expanduser()


# what loading reads: weights, tokenizer (vocab.txt, merges.txt, *.model), configs
LOADING_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model", ".tiktoken")
# saved beside a model by trainers (ours, Hugging Face's, accelerate's), never read to load it
TRAINING_STATE_PREFIXES = ("optimizer", "scheduler", "scaler", "training_args",
                           "trainer_state", "training_state", "rng_state", "random_states")


def is_needed(name: str) -> bool:
    """True for a file (base name) that loading a model may read."""
    lowered = name.lower()
    return lowered.endswith(LOADING_SUFFIXES) and not lowered.startswith(TRAINING_STATE_PREFIXES)


def _tag(info: dict) -> str:
    return str(info.get("ETag") or info.get("etag") or info.get("mtime") or
               info.get("LastModified") or "")


def _files(entries: list[dict], root: str) -> list[tuple[str, int, str]]:
    """(name relative to `root`, size, version tag) of the needed files among `entries`."""
    return [(e["name"][len(root):].lstrip("/"), int(e.get("size") or 0), _tag(e))
            for e in entries
            if e.get("type") != "directory" and not e["name"].endswith("/")  # folder markers
            and is_needed(e["name"].rstrip("/").rsplit("/", 1)[-1])]


def _module_folders(fs: fsspec.AbstractFileSystem, root: str, top: list[str]) -> list[str]:
    """The folders sentence-transformers' ``modules.json`` names (``1_Pooling``...)."""
    if "modules.json" not in top:
        return []
    modules = json.loads(fs.cat_file(f"{root}/modules.json"))
    return sorted({m["path"].strip("/") for m in modules if m.get("path", "").strip("/")})


def needed_files(fs: fsspec.AbstractFileSystem, root: str) -> list[tuple[str, int, str]]:
    """(relative name, size, version tag) of every file loading the model at `root` needs,
    sorted: the needed files at the top and in the module folders, nothing else listed.
    Listed afresh: a filesystem's listing cache (s3fs keeps one per process) would hide a
    checkpoint rewritten since this process last listed it."""
    fs.invalidate_cache(root)
    entries = fs.ls(root, detail=True)
    out = _files(entries, root)
    for folder in _module_folders(fs, root, [name for name, _, _ in out]):
        fs.invalidate_cache(f"{root}/{folder}")
        found = fs.find(f"{root}/{folder}", detail=True)
        out += _files(list(found.values()), root)
    return sorted(set(out))


def fetch_folder(uri: str) -> Path:
    """A local copy of the folder at `uri` (downloaded on first use, then reused).

    Raises:
        FileNotFoundError: nothing at `uri`, naming it.
    """
    fs, root = fsspec.core.url_to_fs(uri.rstrip("/"))
    listing = needed_files(fs, root) if fs.isdir(root) else []
    if not listing:
        raise FileNotFoundError(f"model {uri!r}: no model files there (a saved model folder "
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
        with write_then_move(fsspec.filesystem("file"), str(target), tag="fetch") as tmp:
            for name, _, _ in listing:
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{root}/{name}", f"{tmp}/{name}")
    return target
