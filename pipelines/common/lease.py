"""One live run per output: a lease file with a heartbeat beside the output's state.

    lease = OutputLease(uri, stale_after_s=120)
    lease.acquire()            # raises LeaseHeld if another live run holds it
    lease.check()              # raises LeaseLost once this run may no longer write
    write_table(t, part_uri, fence=lease.fence())   # checks the lease before the rename

Time is the store's, never a machine's clock: a lease's age is the store's timestamp
(mtime) of a file written just now less the lease file's own mtime, so runs on machines
whose clocks disagree still agree on it.

A lease is live while it is younger than `stale_after_s`. Its holder renews it every
`heartbeat_s`; once its last renewal is `stale_after_s`/2 old (a failing store, a stalled
thread) or the lease names another run, the lease is *lost*: `check()` raises `LeaseLost`,
and so does every fenced write (`Fence.check`, run right before a part or marker gets its
final name), so a run that lost its lease writes nothing more. The half-way margin leaves
the other half for a taker to wait out.

A dead run's lease is taken over by the next run: at once when the holder ran on this
host (same boot, same PID namespace) and its process is gone, checked by PID *and* the
process's start time so a reused PID is not taken for the holder (Linux ``/proc``);
otherwise once it is stale. The taker then resumes as after any failure. Local paths and
any fsspec URI: on object stores, which have no atomic "create if absent", the lease is
written, re-read after a short settle delay and kept only if it still names this run, so
two runs started within that delay of each other are the remaining window; so is a fenced
write's rename right after its check.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import fsspec

from bge_core.storage import is_local, naming, write_then_move

log = logging.getLogger(__name__)
LEASE_FILE = "_state/lease.json"


class LeaseHeld(RuntimeError):
    """Another live run holds the lease; the message names it and the output."""


class LeaseLost(RuntimeError):
    """This run's lease lapsed or was taken over: it must not write anything more."""


# ------------------------------------------------------------------ store time
def store_time(fs: fsspec.AbstractFileSystem, path: str) -> float:
    """The store's modification time of `path`, in seconds since the epoch."""
    fs.invalidate_cache(path)  # an object store's listing cache would give an old time
    try:
        stamp: Any = fs.modified(path)
    except NotImplementedError:
        info = fs.info(path)
        stamp = next((info[k] for k in ("mtime", "LastModified", "last_modified", "updated",
                                        "modified") if info.get(k) is not None), None)
        if stamp is None:
            raise OSError(f"{fs.unstrip_protocol(path)}: the store reports no modification "
                          "time, which the output lease needs") from None
    if isinstance(stamp, str):
        stamp = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return stamp.timestamp() if isinstance(stamp, datetime) else float(stamp)


def _read_json(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _describe(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')}"


# ------------------------------------------------------------- holder liveness
def _proc_start(pid: int) -> str | None:
    """Start time of process `pid` (clock ticks since boot), None if it is gone or a
    zombie (dead, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]  # state; field 22 of proc(5)


def process_identity(pid: int) -> dict[str, str]:
    """What tells process `pid` apart on this host: boot, PID namespace, start time (Linux;
    empty elsewhere, where a dead holder is found by staleness alone)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return {}
    start = _proc_start(pid)
    return {"boot": boot, "pidns": pidns, "start": start} if start else {}


def holder_is_dead(holder: dict[str, Any]) -> bool:
    """True when `holder` ran on this host (same boot and PID namespace) and its process is
    gone, or its PID now belongs to a process started at another time."""
    here = process_identity(os.getpid())
    if not here or not holder.get("start") or holder.get("host") != socket.gethostname():
        return False
    if (holder.get("boot"), holder.get("pidns")) != (here["boot"], here["pidns"]):
        return False
    return _proc_start(int(holder.get("pid", -1))) != holder["start"]


# ------------------------------------------------------------------- the fence
@dataclass(frozen=True)
class Fence:
    """What a write (in the driver or a Ray task) checks before it gives a file its final
    name: the lease still names this run and was renewed within `max_age_s`, both measured
    by the store. Picklable, so Ray tasks get it as an argument.

    Args:
        uri: the output folder the lease guards.
        owner: the run's lease id.
        max_age_s: the oldest renewal the run may still write under.
    """

    uri: str
    owner: str
    max_age_s: float

    def check(self, fs: fsspec.AbstractFileSystem, written: str | None = None) -> None:
        """Raise `LeaseLost` unless this run may write. `written`: a file just written on
        `fs` (a temporary name) whose mtime is the store's "now"; without one, a probe file
        is written for it."""
        lease_path = f"{fsspec.core.url_to_fs(self.uri)[1]}/{LEASE_FILE}"
        if written is None:
            with _probe(fs, lease_path) as probe:
                return self.check(fs, probe)
        holder = _read_json(fs, lease_path)
        if holder is None or holder.get("id") != self.owner:
            who = f"another run ({_describe(holder)})" if holder else "no run (it was removed)"
            raise LeaseLost(f"{self.uri}: the lease is now held by {who}; this run stopped "
                            "before writing more")
        age = store_time(fs, written) - store_time(fs, lease_path)
        if age > self.max_age_s:
            raise LeaseLost(f"{self.uri}: this run's lease was last renewed {age:.0f}s ago "
                            f"(store time, limit {self.max_age_s:.0f}s), so this run stopped "
                            "before writing more (finished work is kept)")


@contextlib.contextmanager
def _probe(fs: fsspec.AbstractFileSystem, beside: str) -> Iterator[str]:
    """An empty file beside `beside` whose mtime is the store's "now", removed afterwards."""
    fs.makedirs(beside.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{beside}.tmp-{uuid.uuid4().hex[:8]}"
    fs.pipe_file(tmp, b"")
    try:
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            if fs.exists(tmp):
                fs.rm(tmp)


def find_lease_lost(err: BaseException) -> LeaseLost | None:
    """The `LeaseLost` behind `err`, raised in a Ray task and wrapped on the way (Ray
    Data's `UserCodeException` keeps only the remote traceback's text)."""
    item: BaseException | None = err
    seen: set[int] = set()
    while item is not None and id(item) not in seen:
        seen.add(id(item))
        if isinstance(item, LeaseLost):
            return item
        item = getattr(item, "cause", None) or item.__cause__ or item.__context__
    prefix = f"{LeaseLost.__module__}.{LeaseLost.__qualname__}: "
    named = [line.strip()[len(prefix):] for line in str(err).splitlines()
             if line.strip().startswith(prefix)]
    return LeaseLost(named[-1]) if named else None


# ------------------------------------------------------------------- the lease
class OutputLease:
    """The lease on one output (see the module docstring).

    Args:
        uri: the output folder (local path or fsspec URI).
        stale_after_s: a lease not renewed for this long (store time) marks its run dead.
        heartbeat_s: how often this run renews it (default `stale_after_s`/4; it must be
            under half of `stale_after_s`, the point where the run counts it lost).
        settle_s: delay before re-reading a freshly written lease (default 0.1 s on a
            local disk, 1 s on an object store, whose writes take longer to show).
        fs: the filesystem the heartbeat reads and writes the lease through (default: the
            one `uri` names).
    """

    def __init__(self, uri: str, stale_after_s: float = 120.0, heartbeat_s: float | None = None,
                 settle_s: float | None = None,
                 fs: fsspec.AbstractFileSystem | None = None) -> None:
        self.uri = uri.rstrip("/")
        default_fs, root = fsspec.core.url_to_fs(self.uri)
        self.fs = fs or default_fs
        if settle_s is None:
            settle_s = 0.1 if is_local(self.uri) else 1.0
        self.path = f"{root}/{LEASE_FILE}"
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s or stale_after_s / 4
        if self.heartbeat_s >= stale_after_s / 2:
            raise ValueError(f"heartbeat_s {self.heartbeat_s} must be under half of "
                             f"stale_after_s {stale_after_s}")
        self.settle_s = settle_s
        self.owner = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                      **process_identity(os.getpid())}
        self._renewed: float | None = None  # monotonic start of the last renewal that landed
        self._last_error: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict[str, Any] | None:
        return _read_json(self.fs, self.path)

    def fence(self) -> Fence:
        """The check writes of this run make before they land (see `Fence`)."""
        return Fence(self.uri, self.owner["id"], self.stale_after_s / 2)

    def check(self) -> None:
        """Raise `LeaseLost` once this run may no longer write (cheap: no store call)."""
        if self._lost is None:
            if self._renewed is None:
                raise LeaseLost(f"{self.uri}: this run does not hold the lease")
            late = time.monotonic() - self._renewed
            if late > self.stale_after_s / 2:
                self._lose(self._late_message(late))
        if self._lost is not None:
            raise LeaseLost(self._lost)

    def check_free(self) -> None:
        """Raise `LeaseHeld` if another live run holds the lease (before any start-up)."""
        with _probe(self.fs, self.path) as probe:
            self._judge(store_time(self.fs, probe))

    def acquire(self) -> None:
        """Take the lease, or raise `LeaseHeld` naming the live run that has it."""
        record = json.dumps({**self.owner, "heartbeat": time.time()})  # for people reading it
        with write_then_move(self.fs, self.path) as tmp:
            self.fs.pipe_file(tmp, record.encode())
            note = self._judge(store_time(self.fs, tmp))
            started = time.monotonic()
        time.sleep(self.settle_s)
        if (self.read() or {}).get("id") != self.owner["id"]:
            raise LeaseHeld(f"{self.uri}: another run took the lease at the same moment")
        if note:
            log.warning("taking over %s: %s; resuming its work", self.uri, note)
        self._renewed = started
        self._thread = threading.Thread(target=self._beat, daemon=True, name="output-lease")
        self._thread.start()

    def _judge(self, now: float) -> str | None:
        """Raise `LeaseHeld` if a live run holds the lease at store time `now`; otherwise
        say why its holder (if any) counts as dead."""
        holder = self.read()
        if holder is None:
            return None
        try:
            age = now - store_time(self.fs, self.path)
        except FileNotFoundError:  # released meanwhile
            return None
        if holder_is_dead(holder):
            return f"the run that held it ({_describe(holder)}) is gone"
        if age < self.stale_after_s:
            raise LeaseHeld(
                f"{self.uri} is being written by another run ({_describe(holder)}, "
                f"heartbeat {age:.0f}s ago); wait for it to finish, or choose another "
                f"output. A run that died on another host leaves its lease stale after "
                f"{self.stale_after_s:.0f}s, and the next run takes over.")
        return f"the run that held it ({_describe(holder)}) went silent {age:.0f}s ago"

    def _beat(self) -> None:
        wait = self.heartbeat_s
        while self._lost is None and not self._stop.wait(wait):
            # a failed renewal is retried sooner; `check` says when it is too late
            wait = self.heartbeat_s if self._renew() else self.heartbeat_s / 4

    def _renew(self) -> bool:
        """One heartbeat: write the new lease under a temporary name, then, if it is not too
        late and the lease is still ours, move it into place (a stalled write is caught
        before it can overwrite a taker's lease)."""
        started = time.monotonic()
        record = json.dumps({**self.owner, "heartbeat": time.time()})
        try:
            with naming(self.uri, "renew the lease on"), write_then_move(
                    self.fs, self.path, check=self._still_ours) as tmp:
                self.fs.pipe_file(tmp, record.encode())
        except LeaseLost as err:
            self._lose(str(err))
            return False
        except OSError as err:
            self._last_error = str(err).splitlines()[0]
            log.warning("%s (retrying)", self._last_error)
            return False
        self._renewed, self._last_error = started, None
        return True

    def _still_ours(self, written: str) -> None:
        """Raise `LeaseLost` when a renewal written to `written` must not land: it is too
        late (a taker may be on its way) or the lease names another run."""
        assert self._renewed is not None
        late = time.monotonic() - self._renewed
        if late > self.stale_after_s / 2:
            raise LeaseLost(self._late_message(late))
        holder = self.read()
        if holder is None or holder.get("id") != self.owner["id"]:
            who = f"another run ({_describe(holder)})" if holder else "no run"
            raise LeaseLost(f"{self.uri}: the lease was taken over by {who}; this run "
                            "stopped before writing more")

    def _late_message(self, late: float) -> str:
        if self._last_error:
            return (f"{self._last_error}; the lease has not been renewed for {late:.0f}s, so "
                    "this run stopped before writing more (finished work is kept)")
        return (f"{self.uri}: the lease was not renewed for {late:.0f}s (the heartbeat "
                f"stalled; limit {self.stale_after_s / 2:.0f}s), so this run stopped before "
                "writing more (finished work is kept)")

    def _lose(self, message: str) -> None:
        if self._lost is None:
            self._lost = message
            log.error("%s", message)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # a renewal still under way cannot land after this: it re-reads the lease first
            self._thread.join(timeout=min(10.0, self.stale_after_s / 2))
        if (self.read() or {}).get("id") == self.owner["id"]:
            self.fs.rm(self.path)
            folder = self.path.rsplit("/", 1)[0]
            with contextlib.suppress(OSError):  # leave no empty _state/ in a model folder
                if not self.fs.ls(folder):
                    self.fs.rmdir(folder)

    def __enter__(self) -> OutputLease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def release_quietly(lease: OutputLease) -> None:
    """Release `lease` at the end of a run; if its store is down (the likely reason the run
    is ending), say so and leave the lease to go stale, keeping the run's own error."""
    try:
        lease.release()
    except OSError as err:
        log.warning("could not release the lease on %s (%s); it goes stale after %.0fs",
                    lease.uri, str(err).splitlines()[0], lease.stale_after_s)
