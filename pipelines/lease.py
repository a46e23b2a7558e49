"""One live run per output: a lease file with a heartbeat beside the output's state.

    with OutputLease(state_uri, stale_after_s=120):   # raises LeaseHeld if another run is live
        ...                                          # a thread renews the heartbeat

A lease is live while its heartbeat is younger than `stale_after_s`; a run that died (kill
-9, lost node) leaves a stale lease, which the next run takes over (it then resumes as
after any failure). Local paths and any fsspec URI: on object stores, which have no atomic
"create if absent", the lease is written, re-read after a short settle delay and kept only
if it still names this run, so two runs started within that delay of each other are the
remaining window.
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
from typing import Any

import fsspec

log = logging.getLogger(__name__)
LEASE_FILE = "_state/lease.json"


class LeaseHeld(RuntimeError):
    """Another live run holds the lease; the message names it and the output."""


class OutputLease:
    """The lease on one output (see the module docstring).

    Args:
        uri: the output folder (local path or fsspec URI).
        stale_after_s: a heartbeat older than this marks its run dead.
        heartbeat_s: how often this run renews its heartbeat.
        settle_s: delay before re-reading a freshly written lease (default 0.1 s on a
            local disk, 1 s on an object store, whose writes take longer to show).
    """

    def __init__(self, uri: str, stale_after_s: float = 120.0, heartbeat_s: float | None = None,
                 settle_s: float | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.fs, root = fsspec.core.url_to_fs(self.uri)
        if settle_s is None:
            settle_s = 0.1 if "file" in self.fs.protocol else 1.0
        self.path = f"{root}/{LEASE_FILE}"
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s or max(0.5, stale_after_s / 4)
        self.settle_s = settle_s
        self.owner = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict[str, Any] | None:
        try:
            with self.fs.open(self.path, "r") as handle:
                return json.load(handle)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _write(self) -> None:
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open(tmp, "w") as handle:
            json.dump({**self.owner, "heartbeat": time.time()}, handle)
        self.fs.mv(tmp, self.path)

    def acquire(self) -> None:
        """Take the lease, or raise `LeaseHeld` naming the live run that has it."""
        current = self.read()
        if current is not None:
            age = time.time() - float(current.get("heartbeat", 0))
            if age < self.stale_after_s:
                raise LeaseHeld(
                    f"{self.uri} is being written by another run (pid {current.get('pid')} on "
                    f"{current.get('host')}, heartbeat {age:.0f}s ago); wait for it to finish, "
                    f"or choose another output. A run that died leaves its lease stale after "
                    f"{self.stale_after_s:.0f}s, and the next run takes over.")
            log.warning("taking over %s: the run that held it (pid %s on %s) went silent "
                        "%.0fs ago; resuming its work", self.uri, current.get("pid"),
                        current.get("host"), age)
        self._write()
        time.sleep(self.settle_s)
        if (self.read() or {}).get("id") != self.owner["id"]:
            raise LeaseHeld(f"{self.uri}: another run took the lease at the same moment")
        self._thread = threading.Thread(target=self._beat, daemon=True, name="output-lease")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write()
            except OSError as err:  # a flaky store: the next beat retries
                log.warning("could not renew the lease on %s: %s", self.uri, err)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
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
