"""One writer per run name: a lease object in the bucket (and in the output folder).

Two processes training the same ``--run-name`` would write the same checkpoint names and mix
their files. So a run first creates ``LEASE.json`` with a generation precondition (an
exclusive create: of two runs started together exactly one wins), renews it while it lives by
compare-and-swap on the version it last wrote, and deletes it at the end. A second run finds
a live lease and refuses with one line naming the holder. A holder that died without
releasing (a kill, a VM that lost power) is recognised by its lease: not renewed for over
``ttl_s``, or on this host and its process gone; its successor replaces that lease by
compare-and-swap, so of two successors only one takes over.

A renewal that finds the lease replaced means another run took the name over: ``lost`` says
so and the loop stops without writing more. A bucket that cannot be reached does not lose the
lease (renewals retry); only another writer's lease does.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from utils.errors import CheckpointError, StorageError, first_line
from utils.storage import ObjectExists, ObjectNotFound, Store

LEASE = "LEASE.json"
TTL_S = 60.0  # a lease not renewed for this long belongs to a run that died
RENEW_S = TTL_S / 4


@dataclass(frozen=True)
class Holder:
    """Who holds a run's lease, as written in the lease object."""

    token: str      # this process's own id: a restarted run is a new holder
    host: str
    pid: int
    started: float  # wall-clock seconds
    renewed: float
    ttl_s: float = TTL_S

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        """The holder a lease names, or None for an unreadable one (treated as expired)."""
        try:
            record = json.loads(data[:4096])
            return cls(str(record["token"]), str(record["host"]), int(record["pid"]),
                       float(record["started"]), float(record["renewed"]),
                       float(record.get("ttl_s", TTL_S)))
        except (ValueError, KeyError, TypeError, RecursionError):
            return None

    def dumps(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    def gone(self, now: float) -> bool:
        """Whether its run has died: not renewed in time, or its process is gone from here."""
        if now - self.renewed > self.ttl_s:
            return True
        return self.host == socket.gethostname() and not _alive(self.pid)

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return (f"host {self.host} pid {self.pid}, started {started}, renewed "
                f"{max(0.0, now - self.renewed):.0f} s ago")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: a process of another user holds this pid
        return True
    return True


class RunLease:
    """This process's claim on a run name in one store (acquire, renew, release)."""

    def __init__(self, store: Store, what: str, log: Callable[[str], None] = print,
                 ttl_s: float = TTL_S) -> None:
        self.store, self.what, self.log, self.ttl_s = store, what, log, ttl_s
        now = time.time()
        self.holder = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now,
                             ttl_s)
        self.version: str | None = None
        self.lost = ""  # why the lease is no longer ours ("" while it is)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{self.store.url}/{LEASE}"

    def acquire(self) -> None:
        """Take the lease, or CheckpointError naming the live holder and what to do."""
        try:
            self.version = self.store.write_bytes(LEASE, self.holder.dumps(), if_absent=True)
            return
        except ObjectExists:
            pass
        try:
            data, version = self.store.read_versioned(LEASE)
        except ObjectNotFound:  # released between our create and our read: try once more
            self.version = self.store.write_bytes(LEASE, self.holder.dumps(), if_absent=True)
            return
        now = time.time()
        theirs = Holder.parse(data)
        if theirs is not None and not theirs.gone(now):
            raise CheckpointError(
                f"{self.what} is in use by another run ({theirs.describe(now)}; lease "
                f"{self.url}): wait for it to end or pick another --run-name; if that run "
                f"crashed, its lease expires {self.ttl_s:.0f} s after its last renewal and "
                f"--resume latest then takes the run over")
        try:
            self.version = self.store.write_bytes(LEASE, self._renewed().dumps(),
                                                  if_version=version)
        except ObjectExists:
            raise CheckpointError(f"{self.what} was just taken over by another run (lease "
                                  f"{self.url}); pick another --run-name") from None
        self.log(f"took over the lease of {self.what} from a run that ended without releasing "
                 f"it ({theirs.describe(now) if theirs else 'unreadable lease'})")

    def _renewed(self) -> Holder:
        return Holder(**{**asdict(self.holder), "renewed": time.time()})

    def renew(self) -> None:
        """Rewrite the lease if it is still ours; ``lost`` says why when it is not."""
        if self.lost or self.version is None:
            return
        try:
            self.version = self.store.write_bytes(LEASE, self._renewed().dumps(),
                                                  if_version=self.version)
        except ObjectExists:
            self.lost = self._taken_by()
        except StorageError as err:  # an unreachable bucket takes nothing from us: retry
            self.log(f"could not renew the lease of {self.what} ({first_line(err)}); retrying")

    def _taken_by(self) -> str:
        try:
            theirs = Holder.parse(self.store.read_bytes(LEASE))
        except StorageError:
            theirs = None
        who = theirs.describe(time.time()) if theirs else "its lease was removed"
        return (f"{self.what} was taken over by another run ({who}; lease {self.url}); this "
                f"run stopped writing checkpoints")

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="run-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(min(RENEW_S, self.ttl_s / 4)) and not self.lost:
            self.renew()

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (never another run's)."""
        self._stop.set()
        if self.lost or self.version is None:
            return
        try:
            theirs = Holder.parse(self.store.read_bytes(LEASE))
            if theirs is not None and theirs.token == self.holder.token:
                self.store.delete(LEASE)
        except StorageError as err:
            self.log(f"could not release the lease of {self.what} ({first_line(err)}); it "
                     f"expires by itself after {self.ttl_s:.0f} s")
        self.version = None
