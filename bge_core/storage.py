"""How every job talks to object stores: one place for retry settings and storage errors.

All our I/O goes through fsspec, so ``s3://`` is s3fs (aiobotocore) everywhere: the embed
job's read/write tasks, the lease, the model fetch, and Ray Train's checkpoints (handed to
Ray Train as a pyarrow filesystem wrapping the same s3fs, `arrow_filesystem`). The retry
settings below therefore cover every request a job makes. Two layers retry:

- botocore, per HTTP request: ``S3_ATTEMPTS`` attempts in its ``standard`` mode (503
  SlowDown and other throttling, 500/502/504, dropped connections), exponential backoff
  with jitter;
- s3fs, around each call: ``S3FS_RETRIES`` tries with 0.1 × 1.7^i s pauses on SlowDown,
  timeouts and bodies cut off mid-read (`s3fs.core._error_wrapper`).

A store that stays down therefore fails a call after at most ``S3_ATTEMPTS`` ×
``S3FS_RETRIES`` requests (about a minute at worst, seconds when nothing listens), and the
job stops with a `StorageError` naming the URI, never hangs. Settings a user passed
(``fsspec.config.conf["s3"]``, ``FSSPEC_S3_*`` variables) win over these defaults.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import fsspec
import fsspec.config
import fsspec.utils

S3_ATTEMPTS = 4  # botocore: attempts per HTTP request (standard retry mode)
S3FS_RETRIES = 4  # s3fs: tries per call, on SlowDown / timeouts / cut-off bodies
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0

# Where the store is, never who we are: the only AWS settings a Ray task may carry.
# Credentials (keys, session tokens) stay in each node's own environment or identity.
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")

S3_SETTINGS: dict[str, Any] = {  # s3fs.S3FileSystem keyword arguments
    "config_kwargs": {"retries": {"max_attempts": S3_ATTEMPTS, "mode": "standard"},
                      "connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S},
}


def configure() -> None:
    """Make `S3_SETTINGS` the defaults of every s3fs filesystem this process creates.

    Runs on import (modules doing I/O import this one, so Ray workers get it too). s3fs
    takes its own retry count only as a class attribute, set here.
    """
    try:
        import s3fs
    except ImportError:  # no S3 support installed: nothing to configure
        return
    s3fs.S3FileSystem.retries = S3FS_RETRIES
    for protocol in ("s3", "s3a"):
        current = fsspec.config.conf.setdefault(protocol, {})
        for key, value in S3_SETTINGS.items():
            current.setdefault(key, value)


configure()


LOCAL_PROTOCOLS = ("file", "local")  # fsspec's names for this machine's file system


def is_local(uri: str) -> bool:
    """True when `uri` is on this machine's file system: a plain path (absolute, relative
    or ``~``) or a ``file://`` / ``local://`` URI. Any other fsspec URI names a store, even
    one inside this process (``s3://``, ``gs://``, ``memory://``, ``simplecache::s3://``).

    The one rule every job uses to tell local paths from stores: what fsspec would open
    `uri` with (its protocol, as `fsspec.core.url_to_fs` reads it), without opening it.
    """
    return fsspec.utils.get_protocol(str(uri)) in LOCAL_PROTOCOLS


def local_path(uri: str) -> str:
    """The file-system path of a local `uri`: ``file:///data/x`` → ``/data/x``; a plain path
    as given (relative stays relative).

    Raises:
        ValueError: `uri` is not local (`is_local`).
    """
    uri = str(uri)
    if not is_local(uri):
        raise ValueError(f"{uri} is not a local path")
    return uri.split("://", 1)[1] if "://" in uri else uri


def as_uris(fs: fsspec.AbstractFileSystem, paths: list[str], uri: str) -> list[str]:
    """`paths` found on `fs` (listed under `uri`) as names to open again: plain paths when
    `uri` is local, full URIs (protocol kept) otherwise."""
    return list(paths) if is_local(uri) else [fs.unstrip_protocol(p) for p in paths]


@contextmanager
def write_then_move(fs: fsspec.AbstractFileSystem, path: str,
                    check: Callable[[str], None] | None = None,
                    tag: str = "tmp") -> Iterator[str]:
    """A temporary name beside `path` to write a file (or a folder) under; a reader never
    sees a half-written `path`. The one write-then-rename of every job::

        with write_then_move(fs, path) as tmp:
            with fs.open(tmp, "wb") as handle: ...

    When the block ends without an error, `check(tmp)` runs (it may raise to stop the
    move: the output lease's fence) and `tmp` is moved onto `path`; on any error `tmp` is
    deleted (a full disk, a dropped connection or a lost lease leaves nothing under a real
    name). The name is hidden, ``.<tag>-<name>-<random>`` in the same folder, so Parquet
    dataset readers and our listings skip it, and the move is a rename on a local disk
    (atomic, for a folder too) and one copy on an object store (whose objects appear
    whole; a folder there is moved file by file).

    Args:
        fs: the filesystem `path` is on (``fsspec.filesystem("file")`` for a local one).
        path: the final name, as `fs` spells it (no protocol).
        check: called with the temporary name before the move.
        tag: the temporary name's prefix (a killed writer's leftovers are found by it).
    """
    folder, sep, name = path.rstrip("/").rpartition("/")
    if folder:
        fs.makedirs(folder, exist_ok=True)
    tmp = f"{folder}{sep}.{tag}-{name}-{uuid.uuid4().hex[:12]}"
    try:
        yield tmp
        if check is not None:
            check(tmp)
        fs.mv(tmp, path)
    except BaseException:
        with suppress(OSError):
            fs.rm(tmp, recursive=True)
        raise


class StorageError(OSError):
    """A read or write that failed for good; the message names the URI and the cause."""


def describe(err: BaseException, remote: bool) -> str:
    """The cause of a failed storage call in words a user can act on."""
    code = getattr(err, "errno", None)
    if code == errno.ENOSPC:
        return "no space left on the device; free space, then rerun (finished work is kept)"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ("permission denied; make it writable for this user, then rerun "
                "(finished work is kept)")
    text = f"{type(err).__name__}: {err}".splitlines()[0]
    if not remote:
        return f"{text}; fix it, then rerun (finished work is kept)"
    return (f"{text} (after {S3_ATTEMPTS} attempts per request x {S3FS_RETRIES} tries); "
            "check the endpoint, credentials and network, then rerun (finished work is kept)")


@contextmanager
def naming(uri: str, action: str) -> Iterator[None]:
    """Re-raise a failed storage call as a `StorageError` naming `uri` and the cause."""
    try:
        yield
    except (StorageError, FileNotFoundError):  # a missing file names itself
        raise
    except (OSError, *_boto_errors()) as err:
        raise StorageError(f"cannot {action} {uri}: {describe(err, not is_local(uri))}") from err


def _boto_errors() -> tuple[type[BaseException], ...]:
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # no S3 support installed: only OSError can happen
        return ()
    return (BotoCoreError, ClientError)


def check_reachable(uri: str) -> None:
    """Fail fast, naming `uri`, when the store holding it does not answer.

    Local paths are not checked (their errors name themselves).
    """
    if is_local(uri):
        return
    fs, path = fsspec.core.url_to_fs(uri)
    with naming(uri, "reach"), suppress(FileNotFoundError):  # absent is fine: not written yet
        fs.info(path)


def find_storage_error(err: BaseException) -> StorageError | None:
    """The `StorageError` behind `err`, raised in a Ray task and wrapped on the way.

    Ray keeps the original as `.cause` of its `RayTaskError`; Ray Data's
    `UserCodeException` keeps only the remote traceback's text, so the last line naming a
    `StorageError` there is the fallback.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, StorageError) and getattr(item, "cause", None) is None:
            # the original, not Ray's wrapper of it (which has `.cause`); our messages are
            # one line, so what follows is what Ray Data appended (its retry advice)
            first = str(item).split("\n", 1)[0]
            return item if first == str(item) else StorageError(first)
        todo += [item.__cause__, item.__context__, getattr(item, "cause", None)]
    prefix = f"{StorageError.__module__}.{StorageError.__qualname__}: "
    named = [line.strip()[len(prefix):] for line in str(err).splitlines()
             if line.strip().startswith(prefix)]
    return StorageError(named[-1]) if named else None


def arrow_filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem or None, path) for Ray Train's storage at `uri`.

    Remote URIs get s3fs (or their fsspec filesystem) wrapped for pyarrow, so checkpoints
    use the same retry settings as everything else; local paths get (None, path).
    """
    if is_local(uri):
        return None, uri
    fs, path = fsspec.core.url_to_fs(uri)
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs)), path.rstrip("/")


def storage_runtime_env() -> dict[str, Any]:
    """Ray task options carrying where this process's store is (`STORAGE_ENV`: endpoint
    and region), so a task reaches the store the driver does even when they were set after
    Ray started; empty when there are none.

    Credentials never travel: a task's `runtime_env` is shown by the dashboard, the state
    API (`ray list tasks --detail`) and Ray's logs. Each worker takes them from its own
    node (the raylet's environment, ``~/.aws``, an instance profile or IRSA), as s3fs and
    pyarrow do by default; docs/cluster.md says how nodes get them.
    """
    env = {k: os.environ[k] for k in STORAGE_ENV if k in os.environ}
    return {"runtime_env": {"env_vars": env}} if env else {}
